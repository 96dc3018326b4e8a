//! Fuzzing the decode-and-validate path of OpenStep (and the epoch and membership requests
//! around it) into the coordinator's state machine: requests decoded from arbitrary bytes, and
//! valid ones with numeric fields at the edges of their types. Nothing may panic, the state's
//! invariants hold after every request, and what the open steps hold stays within the bounds.
//! A fixed number of cases (PROPTEST_CASES overrides), so the run takes seconds in CI.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use prost::Message;
use selfplay_coordinator::state::{MAX_OPEN_UNITS, MAX_UNITS_PER_STEP};
use selfplay_coordinator::{State, StepSpec};
use selfplay_proto::v1::OpenStepRequest;

fn spec(r: OpenStepRequest) -> StepSpec {
    StepSpec {
        step: r.step,
        units: r.units,
        min_weights_version: r.min_weights_version,
        prompts: r.prompts,
        tasks: r.tasks,
        discard_older: r.discard_older,
        reopen: r.reopen,
        epoch: r.epoch,
    }
}

fn edgy_u64() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), Just(1), Just(u64::MAX), Just(u64::MAX - 1), 0u64..8, any::<u64>()]
}

/// Mostly small unit counts (each allocates), with the edges now and then.
fn edgy_units() -> impl Strategy<Value = u32> {
    prop_oneof![
        8 => 0u32..8,
        1 => Just(MAX_UNITS_PER_STEP),
        1 => Just(MAX_UNITS_PER_STEP + 1),
        1 => Just(u32::MAX),
        1 => any::<u32>(),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Open(OpenStepRequest),
    Raw(Vec<u8>),
    Epoch(u64),
    Lease,
    Complete(bool),
}

fn op() -> impl Strategy<Value = Op> {
    let open = (edgy_u64(), edgy_units(), edgy_u64(), 0usize..4, 0usize..4, any::<bool>(), any::<bool>(), edgy_u64())
        .prop_map(|(step, units, v, np, nt, discard_older, reopen, epoch)| {
            Op::Open(OpenStepRequest {
                step: step % 16,
                units,
                min_weights_version: v,
                prompts: (0..np).map(|i| format!("p{i}")).collect(),
                tasks: (0..nt).map(|i| format!("t{i}")).collect(),
                discard_older,
                reopen,
                epoch: epoch % 3,
            })
        });
    prop_oneof![
        4 => open,
        2 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Op::Raw),
        1 => edgy_u64().prop_map(Op::Epoch),
        2 => Just(Op::Lease),
        2 => any::<bool>().prop_map(Op::Complete),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn hostile_step_openings_keep_the_state_sound(ops in proptest::collection::vec(op(), 1..12)) {
        let t0 = Instant::now();
        let mut s = State::new(7, Duration::from_secs(10), t0);
        s.join("a", "cpu", "i", t0).unwrap();
        let mut leased = vec![];
        for op in ops {
            match op {
                Op::Open(r) => {
                    let r = OpenStepRequest::decode(r.encode_to_vec().as_slice()).unwrap();
                    let _ = s.open_step(spec(r));
                }
                Op::Raw(bytes) => {
                    if let Ok(r) = OpenStepRequest::decode(bytes.as_slice()) {
                        let _ = s.open_step(spec(r));
                    }
                }
                Op::Epoch(last) => {
                    let before = s.epoch();
                    match s.begin_epoch(last, "run", 1) {
                        Ok(o) => prop_assert!(o.epoch > before && o.epoch > last),
                        Err(_) => prop_assert_eq!(s.epoch(), before),
                    }
                }
                Op::Lease => {
                    if let Ok(Some(u)) = s.lease("a", t0) {
                        leased.push(u);
                    }
                }
                Op::Complete(done) => {
                    if let Some(u) = leased.pop() {
                        let _ = s.complete_at("a", &u.unit_id, done, u.epoch, Some(u.incarnation), t0);
                    }
                }
            }
            s.check_invariants();
            let open: usize = s.steps().iter().map(|&(_, units, _)| units as usize).sum();
            prop_assert!(open <= MAX_OPEN_UNITS, "{} units open", open);
        }
    }
}
