//! ggml tensor types and their dequantization to `f32`, following ggml's reference (scalar)
//! formulas exactly, so results are bit-identical to ggml's and to the `gguf` Python package's.

use std::fmt;

use half::f16;

use crate::error::{GgufError, Result};

/// Super-block size of the K-quants.
const QK_K: usize = 256;

// ggml tensor types
// ---------------------------------------------------------------------------------------------

/// A ggml tensor type, by its id in the GGUF tensor info.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
    /// An id this module does not know (removed or newer than this code).
    Unknown(u32),
}

/// (id, type, elements per block, bytes per block)
const TYPE_TABLE: &[(u32, GgmlType, usize, usize)] = &[
    (0, GgmlType::F32, 1, 4),
    (1, GgmlType::F16, 1, 2),
    (2, GgmlType::Q4_0, 32, 18),
    (3, GgmlType::Q4_1, 32, 20),
    (6, GgmlType::Q5_0, 32, 22),
    (7, GgmlType::Q5_1, 32, 24),
    (8, GgmlType::Q8_0, 32, 34),
    (9, GgmlType::Q8_1, 32, 40),
    (10, GgmlType::Q2_K, QK_K, 84),
    (11, GgmlType::Q3_K, QK_K, 110),
    (12, GgmlType::Q4_K, QK_K, 144),
    (13, GgmlType::Q5_K, QK_K, 176),
    (14, GgmlType::Q6_K, QK_K, 210),
    (15, GgmlType::Q8_K, QK_K, 292),
    (16, GgmlType::IQ2_XXS, QK_K, 66),
    (17, GgmlType::IQ2_XS, QK_K, 74),
    (18, GgmlType::IQ3_XXS, QK_K, 98),
    (19, GgmlType::IQ1_S, QK_K, 50),
    (20, GgmlType::IQ4_NL, 32, 18),
    (21, GgmlType::IQ3_S, QK_K, 110),
    (22, GgmlType::IQ2_S, QK_K, 82),
    (23, GgmlType::IQ4_XS, QK_K, 136),
    (24, GgmlType::I8, 1, 1),
    (25, GgmlType::I16, 1, 2),
    (26, GgmlType::I32, 1, 4),
    (27, GgmlType::I64, 1, 8),
    (28, GgmlType::F64, 1, 8),
    (29, GgmlType::IQ1_M, QK_K, 56),
    (30, GgmlType::BF16, 1, 2),
    (34, GgmlType::TQ1_0, QK_K, 54),
    (35, GgmlType::TQ2_0, QK_K, 66),
    (39, GgmlType::MXFP4, 32, 17),
    (40, GgmlType::NVFP4, 64, 36),
    (41, GgmlType::Q1_0, 128, 18),
];

/// The types [`dequantize`] implements.
pub const SUPPORTED_TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

impl GgmlType {
    /// The type with this GGUF id ([`GgmlType::Unknown`] for ids not in ggml's table).
    pub fn from_id(id: u32) -> Self {
        TYPE_TABLE.iter().find(|(i, ..)| *i == id).map(|(_, t, ..)| *t).unwrap_or(GgmlType::Unknown(id))
    }

    /// The GGUF id of this type.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::Unknown(id) => id,
            t => TYPE_TABLE.iter().find(|(_, tt, ..)| *tt == t).map(|(i, ..)| *i).unwrap_or(u32::MAX),
        }
    }

    /// ggml's name for the type, e.g. `Q4_1`.
    pub fn name(self) -> String {
        match self {
            GgmlType::Unknown(id) => format!("unknown (id {id})"),
            t => format!("{t:?}"),
        }
    }

    /// `(elements per block, bytes per block)`, or `None` for an unknown type.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        TYPE_TABLE.iter().find(|(_, t, ..)| *t == self).map(|(_, _, b, s)| (*b, *s))
    }

    /// Whether [`dequantize`] implements this type.
    pub fn is_supported(self) -> bool {
        SUPPORTED_TYPES.contains(&self)
    }

    /// Bytes taken by `n_elements` values of this type, if the type is known and `n_elements`
    /// is a whole number of blocks.
    pub fn byte_size(self, n_elements: u64) -> Option<u64> {
        let (block, size) = self.block_layout()?;
        if n_elements % block as u64 != 0 {
            return None;
        }
        (n_elements / block as u64).checked_mul(size as u64)
    }

    pub(crate) fn supported_names() -> String {
        SUPPORTED_TYPES.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

// ---------------------------------------------------------------------------------------------
// Dequantization
// ---------------------------------------------------------------------------------------------

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Dequantize `n_elements` values of type `ty` stored in `data` to `f32`.
///
/// `data` must hold exactly the bytes of those elements (a whole number of blocks). The results
/// are bit-identical to ggml's reference `dequantize_row_*` functions.
pub fn dequantize(ty: GgmlType, data: &[u8], n_elements: usize) -> Result<Vec<f32>> {
    if !ty.is_supported() {
        return Err(GgufError::UnsupportedType { ty });
    }
    let bad = |what: String| GgufError::BadTensorData { ty, n_elements, what };
    let (block, size) = ty.block_layout().ok_or(GgufError::UnsupportedType { ty })?;
    if n_elements % block != 0 {
        return Err(bad(format!("the element count is not a multiple of the block size {block}")));
    }
    let n_blocks = n_elements / block;
    let expected = n_blocks.checked_mul(size).ok_or_else(|| bad("the byte size overflows".to_string()))?;
    if data.len() != expected {
        return Err(bad(format!("expected {expected} bytes of data, got {}", data.len())));
    }
    let mut out = vec![0f32; n_elements];
    if n_elements == 0 {
        return Ok(out);
    }
    let blocks = data.chunks_exact(size).zip(out.chunks_exact_mut(block));
    match ty {
        GgmlType::F32 => {
            for (b, y) in blocks {
                y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (b, y) in blocks {
                y[0] = f16_at(b, 0);
            }
        }
        GgmlType::BF16 => {
            for (b, y) in blocks {
                let bits = u16::from_le_bytes([b[0], b[1]]) as u32;
                y[0] = f32::from_bits(bits << 16);
            }
        }
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| dequant_q8_0(b, y)),
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| dequant_q4_0(b, y)),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| dequant_q4_1(b, y)),
        GgmlType::Q5_0 => blocks.for_each(|(b, y)| dequant_q5_0(b, y)),
        GgmlType::Q5_1 => blocks.for_each(|(b, y)| dequant_q5_1(b, y)),
        GgmlType::Q4_K => blocks.for_each(|(b, y)| dequant_q4_k(b, y)),
        GgmlType::Q5_K => blocks.for_each(|(b, y)| dequant_q5_k(b, y)),
        GgmlType::Q6_K => blocks.for_each(|(b, y)| dequant_q6_k(b, y)),
        _ => return Err(GgufError::UnsupportedType { ty }),
    }
    Ok(out)
}

/// Q8_0: `d: f16, qs: [i8; 32]`, `y = qs * d`.
fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, v) in y.iter_mut().enumerate() {
        *v = (b[2 + j] as i8) as f32 * d;
    }
}

/// Q4_0: `d: f16, qs: [u8; 16]`; element j is the low nibble of qs[j], j+16 the high nibble;
/// `y = (q - 8) * d`.
fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        let x0 = (qs[j] & 0x0f) as i32 - 8;
        let x1 = (qs[j] >> 4) as i32 - 8;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// Q4_1: `d: f16, m: f16, qs: [u8; 16]`; `y = q * d + m`.
fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        let x0 = (qs[j] & 0x0f) as f32;
        let x1 = (qs[j] >> 4) as f32;
        y[j] = x0 * d + m;
        y[j + 16] = x1 * d + m;
    }
}

/// Q5_0: `d: f16, qh: u32, qs: [u8; 16]`; bit j of qh is the fifth bit of element j;
/// `y = (q - 16) * d`.
fn dequant_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        let x0 = ((qs[j] & 0x0f) as u32 | h0) as i32 - 16;
        let x1 = ((qs[j] >> 4) as u32 | h1) as i32 - 16;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// Q5_1: `d: f16, m: f16, qh: u32, qs: [u8; 16]`; `y = q * d + m`.
fn dequant_q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        let x0 = ((qs[j] & 0x0f) as u32 | h0) as f32;
        let x1 = ((qs[j] >> 4) as u32 | h1) as f32;
        y[j] = x0 * d + m;
        y[j + 16] = x1 * d + m;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K super-block.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Q4_K: `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`; eight sub-blocks of 32;
/// `y = (d * sc) * q - (dmin * m)`.
fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for chunk in 0..4 {
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let d1 = d * sc1 as f32;
        let m1 = dmin * m1 as f32;
        let d2 = d * sc2 as f32;
        let m2 = dmin * m2 as f32;
        let y = &mut y[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0x0f) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Q5_K: `d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`; bit k of qh[l] is
/// the fifth bit of element l of sub-block k.
fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for chunk in 0..4 {
        let ql = &qs[chunk * 32..chunk * 32 + 32];
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let d1 = d * sc1 as f32;
        let m1 = dmin * m1 as f32;
        let d2 = d * sc2 as f32;
        let m2 = dmin * m2 as f32;
        let s1 = 2 * chunk;
        let s2 = 2 * chunk + 1;
        let y = &mut y[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            let h1 = ((qh[l] >> s1) & 1) << 4;
            let h2 = ((qh[l] >> s2) & 1) << 4;
            y[l] = d1 * ((ql[l] & 0x0f) | h1) as f32 - m1;
            y[l + 32] = d2 * ((ql[l] >> 4) | h2) as f32 - m2;
        }
    }
}

/// Q6_K: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`; sixteen sub-blocks of 16;
/// `y = (d * sc) * (q - 32)`.
fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &ql_all[half * 64..half * 64 + 64];
        let qh = &qh_all[half * 32..half * 32 + 32];
        let sc = &sc_all[half * 8..half * 8 + 8];
        let y = &mut y[half * 128..half * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| d * (sc[k] as i8) as f32;
            y[l] = s(is) * q1 as f32;
            y[l + 32] = s(is + 2) * q2 as f32;
            y[l + 64] = s(is + 4) * q3 as f32;
            y[l + 96] = s(is + 6) * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_bits().to_le_bytes()
    }

    #[test]
    fn f32_f16_bf16() {
        let data: Vec<u8> = [1.5f32, -2.25, 0.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(dequantize(GgmlType::F32, &data, 3).unwrap(), vec![1.5, -2.25, 0.0]);

        let data: Vec<u8> = [h(1.5), h(-0.125), [0x00, 0x7c], [0x01, 0x00]].concat();
        let y = dequantize(GgmlType::F16, &data, 4).unwrap();
        assert_eq!(y[..3], [1.5, -0.125, f32::INFINITY]);
        assert_eq!(y[3], 2f32.powi(-24)); // smallest f16 subnormal

        // bf16 is the top half of an f32
        let bits = (3.0f32).to_bits() >> 16;
        let data = (bits as u16).to_le_bytes();
        assert_eq!(dequantize(GgmlType::BF16, &data, 1).unwrap(), vec![3.0]);
    }

    #[test]
    fn q8_0() {
        let mut b = h(0.5).to_vec();
        b.extend((0..32).map(|j| (j as i8 - 16) as u8));
        let y = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        for (j, v) in y.iter().enumerate() {
            assert_eq!(*v, (j as f32 - 16.0) * 0.5);
        }
    }

    #[test]
    fn q4_0() {
        let mut b = h(2.0).to_vec();
        // low nibble j, high nibble 15 - j
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let y = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(y[j], (j as f32 - 8.0) * 2.0);
            assert_eq!(y[j + 16], ((15 - j) as f32 - 8.0) * 2.0);
        }
    }

    #[test]
    fn q4_1() {
        let mut b = [h(0.25), h(-1.0)].concat();
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let y = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(y[j], j as f32 * 0.25 - 1.0);
            assert_eq!(y[j + 16], (15 - j) as f32 * 0.25 - 1.0);
        }
    }

    #[test]
    fn q5_0_and_q5_1() {
        // fifth bit set for odd j (both halves)
        let qh: u32 = 0xAAAA_AAAA;
        let qs: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
        let expect_q = |j: usize| -> u32 {
            let low = if j < 16 { j as u32 } else { 15 - (j as u32 - 16) };
            low | if j % 2 == 1 { 16 } else { 0 }
        };
        let mut b = h(0.5).to_vec();
        b.extend(qh.to_le_bytes());
        b.extend(&qs);
        let y = dequantize(GgmlType::Q5_0, &b, 32).unwrap();
        for (j, v) in y.iter().enumerate() {
            assert_eq!(*v, (expect_q(j) as f32 - 16.0) * 0.5, "Q5_0 element {j}");
        }
        let mut b = [h(0.5), h(3.0)].concat();
        b.extend(qh.to_le_bytes());
        b.extend(&qs);
        let y = dequantize(GgmlType::Q5_1, &b, 32).unwrap();
        for (j, v) in y.iter().enumerate() {
            assert_eq!(*v, expect_q(j) as f32 * 0.5 + 3.0, "Q5_1 element {j}");
        }
    }

    /// Pack eight 6-bit (scale, min) pairs the way Q4_K/Q5_K store them.
    fn pack_k4_scales(sc: [u8; 8], m: [u8; 8]) -> [u8; 12] {
        let mut q = [0u8; 12];
        for j in 0..4 {
            q[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            q[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
            q[j + 8] = (sc[j + 4] & 0x0f) | ((m[j + 4] & 0x0f) << 4);
        }
        q
    }

    #[test]
    fn k4_scale_packing_round_trips() {
        let sc = [1, 63, 17, 32, 45, 2, 60, 33];
        let m = [0, 5, 62, 31, 16, 48, 7, 63];
        let q = pack_k4_scales(sc, m);
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &q), (sc[j], m[j]));
        }
    }

    #[test]
    fn q4_k_and_q5_k() {
        let sc = [1, 2, 3, 4, 40, 50, 60, 63];
        let m = [0, 1, 2, 3, 20, 30, 40, 63];
        let (d, dmin) = (0.5f32, 0.25f32);
        let qs: Vec<u8> = (0..128u32).map(|i| ((i * 7) % 256) as u8).collect();
        let qh: Vec<u8> = (0..32u32).map(|i| ((i * 37) % 256) as u8).collect();
        let elem = |k: usize, l: usize, with_high: bool| -> f32 {
            // sub-block k (0..8), element l (0..32)
            let byte = qs[(k / 2) * 32 + l];
            let mut q = if k % 2 == 0 { byte & 0x0f } else { byte >> 4 };
            if with_high {
                q |= ((qh[l] >> k) & 1) << 4;
            }
            (d * sc[k] as f32) * q as f32 - dmin * m[k] as f32
        };
        let mut b = [h(d), h(dmin)].concat();
        b.extend(pack_k4_scales(sc, m));
        b.extend(&qs);
        let y = dequantize(GgmlType::Q4_K, &b, 256).unwrap();
        for k in 0..8 {
            for l in 0..32 {
                assert_eq!(y[k * 32 + l], elem(k, l, false), "Q4_K sub-block {k} element {l}");
            }
        }
        let mut b = [h(d), h(dmin)].concat();
        b.extend(pack_k4_scales(sc, m));
        b.extend(&qh);
        b.extend(&qs);
        let y = dequantize(GgmlType::Q5_K, &b, 256).unwrap();
        for k in 0..8 {
            for l in 0..32 {
                assert_eq!(y[k * 32 + l], elem(k, l, true), "Q5_K sub-block {k} element {l}");
            }
        }
    }

    #[test]
    fn q6_k() {
        // Build from wanted 6-bit values q[0..256] and sixteen scales.
        let q: Vec<u8> = (0..256u32).map(|i| ((i * 13 + 5) % 64) as u8).collect();
        let scales: Vec<i8> = (0..16).map(|i| (i as i8 - 8) * 9).collect();
        let d = 0.125f32;
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for half in 0..2 {
            for l in 0..32 {
                let base = half * 128;
                let (a, b2, c, e) = (q[base + l], q[base + l + 32], q[base + l + 64], q[base + l + 96]);
                ql[half * 64 + l] = (a & 0x0f) | ((c & 0x0f) << 4);
                ql[half * 64 + l + 32] = (b2 & 0x0f) | ((e & 0x0f) << 4);
                qh[half * 32 + l] = (a >> 4) | ((b2 >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6);
            }
        }
        let mut b = ql.to_vec();
        b.extend(qh);
        b.extend(scales.iter().map(|&s| s as u8));
        b.extend(h(d));
        let y = dequantize(GgmlType::Q6_K, &b, 256).unwrap();
        for i in 0..256 {
            let want = (d * scales[i / 16] as f32) * (q[i] as i32 - 32) as f32;
            assert_eq!(y[i], want, "Q6_K element {i}");
        }
    }

    #[test]
    fn dequantize_rejects_bad_sizes_and_types() {
        assert!(matches!(dequantize(GgmlType::Q4_0, &[0u8; 17], 32), Err(GgufError::BadTensorData { .. })));
        assert!(matches!(dequantize(GgmlType::Q4_0, &[0u8; 18], 31), Err(GgufError::BadTensorData { .. })));
        let e = dequantize(GgmlType::IQ2_XXS, &[0u8; 66], 256).unwrap_err();
        assert!(matches!(e, GgufError::UnsupportedType { ty: GgmlType::IQ2_XXS }));
        assert!(e.to_string().contains("IQ2_XXS"), "{e}");
        let e = dequantize(GgmlType::from_id(99), &[], 0).unwrap_err();
        assert!(e.to_string().contains("99"), "{e}");
    }

    #[test]
    fn type_ids_round_trip() {
        for &(id, ty, ..) in TYPE_TABLE {
            assert_eq!(GgmlType::from_id(id), ty);
            assert_eq!(ty.id(), id);
        }
        assert_eq!(GgmlType::from_id(4), GgmlType::Unknown(4));
        assert_eq!(GgmlType::Q4_1.to_string(), "Q4_1");
    }
}
