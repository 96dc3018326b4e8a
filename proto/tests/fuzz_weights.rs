//! Fuzzing the decode-and-validate path of weights (what the coordinator runs on a publish and
//! an actor on a fetch): WeightChunk bytes off the wire, decoded, fed to the assembler and the
//! payload verifier. Nothing may panic or abort, and whatever is accepted must be a payload
//! that agrees with its manifest. A fixed number of cases (PROPTEST_CASES overrides), so the
//! run takes seconds in CI.

use proptest::prelude::*;
use prost::Message;
use selfplay_proto::v1::{weight_chunk, TensorInfo, WeightChunk, WeightManifest};
use selfplay_proto::weights::{sha256_hex, validate_manifest, ManifestBuilder, PayloadVerifier, WeightAssembler};

fn sample() -> (WeightManifest, Vec<u8>) {
    let mut b = ManifestBuilder::new();
    b.push("a", &[2, 3], "f32", &[1u8; 24]);
    b.push("empty", &[0], "bf16", &[]);
    b.push("b", &[5], "bf16", &[7u8; 10]);
    b.finish(3, 9).unwrap()
}

/// Numbers where bugs live: the edges of the types and their neighbours.
fn edgy_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX - 1),
        Just(i64::MAX as u64),
        Just(1 << 32),
        Just(1 << 40),
        0u64..64,
        any::<u64>(),
    ]
}

fn edgy_i64() -> impl Strategy<Value = i64> {
    prop_oneof![Just(0i64), Just(-1), Just(i64::MIN), Just(i64::MAX), Just(1 << 31), 0i64..8, any::<i64>()]
}

/// Feeds chunks to an assembler and, separately, to a payload verifier as the coordinator's
/// store does; checks that an accepted version is consistent.
fn feed(chunks: Vec<WeightChunk>, limit: u64) {
    let mut asm = WeightAssembler::new().with_limit(limit);
    if chunks.iter().cloned().all(|c| asm.push(c).is_ok()) {
        if let Ok((m, payload)) = asm.finish() {
            validate_manifest(&m).expect("an accepted manifest validates");
            assert_eq!(payload.len() as u64, m.total_bytes);
            for t in &m.tensors {
                let bytes = &payload[t.offset as usize..(t.offset + t.nbytes) as usize];
                assert_eq!(sha256_hex(bytes), t.sha256.to_ascii_lowercase(), "tensor {}", t.name);
            }
        }
    }
    // The store's path: the manifest first, then the data through the verifier.
    let mut it = chunks.into_iter();
    if let Some(WeightChunk { part: Some(weight_chunk::Part::Manifest(m)) }) = it.next() {
        if let Ok(mut v) = PayloadVerifier::new(&m) {
            for c in it {
                if let Some(weight_chunk::Part::Data(d)) = c.part {
                    if v.update(&d).is_err() {
                        return;
                    }
                }
            }
            let _ = v.finish();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Arbitrary bytes as WeightChunks: decoding fails cleanly or yields chunks the checks
    /// refuse or accept consistently.
    #[test]
    fn arbitrary_bytes_decode_and_validate_without_panicking(
        frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..256), 0..6),
        limit in prop_oneof![Just(0u64), Just(64u64), Just(1 << 20)],
    ) {
        let chunks: Vec<WeightChunk> = frames.iter().filter_map(|f| WeightChunk::decode(f.as_slice()).ok()).collect();
        feed(chunks, limit);
    }

    /// A valid version with one numeric field of the manifest set to an edge value, and the
    /// payload cut at arbitrary places: only a version that agrees with itself is accepted,
    /// and a manifest announcing more than the machine holds is an error, not an abort.
    #[test]
    fn hostile_manifest_numbers_are_refused_cleanly(
        field in 0usize..7,
        tensor in 0usize..3,
        n in edgy_u64(),
        d in edgy_i64(),
        cuts in proptest::collection::vec(0usize..34, 0..4),
        limit in prop_oneof![Just(0u64), Just(1 << 20)],
    ) {
        let (mut m, payload) = sample();
        let t: &mut TensorInfo = &mut m.tensors[tensor];
        match field {
            0 => m.total_bytes = n,
            1 => t.offset = n,
            2 => t.nbytes = n,
            3 => t.shape = vec![d],
            4 => t.shape.push(d),
            5 => {
                t.shape = vec![d, d];
                t.nbytes = n;
            }
            _ => m.version = n,
        }
        // Encoded and decoded, as it travels.
        let m = WeightManifest::decode(m.encode_to_vec().as_slice()).unwrap();
        let mut cuts = cuts;
        cuts.sort();
        let mut data = vec![];
        let mut at = 0;
        for c in cuts.into_iter().chain([payload.len()]) {
            let c = c.min(payload.len()).max(at);
            data.push(WeightChunk { part: Some(weight_chunk::Part::Data(payload[at..c].to_vec().into())) });
            at = c;
        }
        let chunks: Vec<WeightChunk> =
            std::iter::once(WeightChunk { part: Some(weight_chunk::Part::Manifest(m)) }).chain(data).collect();
        feed(chunks, limit);
    }
}

/// A self-consistent manifest announcing a payload no machine has: an error, not an abort.
#[test]
fn an_absurd_but_consistent_manifest_is_an_error() {
    let mut m = sample().0;
    let huge = 1u64 << 61;
    m.tensors = vec![TensorInfo {
        name: "w".into(),
        shape: vec![(huge / 4) as i64],
        dtype: "f32".into(),
        offset: 0,
        nbytes: huge,
        sha256: "0".repeat(64),
    }];
    m.total_bytes = huge;
    m.sha256 = selfplay_proto::weights::manifest_digest(&m.tensors);
    validate_manifest(&m).unwrap();
    let mut asm = WeightAssembler::new();
    let err = asm.push(WeightChunk { part: Some(weight_chunk::Part::Manifest(m)) }).unwrap_err();
    assert!(err.to_string().contains("cannot reserve"), "{err}");
}
