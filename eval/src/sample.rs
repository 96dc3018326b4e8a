//! Which prompts to evaluate: all of them, the first N, or a fixed stratified sample of N
//! spread over the subsets in proportion to their sizes (at least one each), chosen by a
//! seeded shuffle within each subset, so that the same seed always gives the same sample.
use crate::error::{EvalError, Result};
use selfplay_policy::generate::SplitMix64;
use std::collections::BTreeMap;

/// Indices (ascending) of the prompts to evaluate, given each prompt's subset.
pub fn select(subsets: &[String], limit: Option<usize>, stratified: bool, seed: u64) -> Result<Vec<usize>> {
    let n = subsets.len();
    let limit = match limit {
        None => return Ok((0..n).collect()),
        Some(0) => return Err(EvalError::Input("--limit must be at least 1".into())),
        Some(l) if l >= n => return Ok((0..n).collect()),
        Some(l) => l,
    };
    if !stratified {
        return Ok((0..limit).collect());
    }
    let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, s) in subsets.iter().enumerate() {
        groups.entry(s.as_str()).or_default().push(i);
    }
    let sizes: Vec<usize> = groups.values().map(|g| g.len()).collect();
    let alloc = allocate(&sizes, limit).ok_or_else(|| {
        EvalError::Input(format!(
            "--limit {limit} with --stratified needs at least one prompt per subset, and the file has {} subsets",
            sizes.len()
        ))
    })?;
    let mut out = Vec::with_capacity(limit);
    for ((name, members), take) in groups.into_iter().zip(alloc) {
        let mut members = members;
        shuffle(&mut members, seed ^ fnv1a(name.as_bytes()));
        out.extend_from_slice(&members[..take]);
    }
    out.sort_unstable();
    Ok(out)
}

/// Splits `total` over groups of the given sizes in proportion to them (largest remainder),
/// at least one per group and at most the group's size. None when total < groups.
pub fn allocate(sizes: &[usize], total: usize) -> Option<Vec<usize>> {
    let k = sizes.len();
    let all: usize = sizes.iter().sum();
    if k == 0 || total < k || sizes.contains(&0) {
        return None;
    }
    let total = total.min(all);
    let target: Vec<f64> = sizes.iter().map(|&s| total as f64 * s as f64 / all as f64).collect();
    let mut alloc: Vec<usize> = target.iter().zip(sizes).map(|(t, &s)| (t.floor() as usize).clamp(1, s)).collect();
    let mut sum: usize = alloc.iter().sum();
    // Ties go to the bigger group, then the earlier one: deterministic.
    let key = |i: usize, a: &[usize]| (target[i] - a[i] as f64, sizes[i], std::cmp::Reverse(i));
    while sum < total {
        let i = (0..k)
            .filter(|&i| alloc[i] < sizes[i])
            .max_by(|&a, &b| key(a, &alloc).partial_cmp(&key(b, &alloc)).unwrap())?;
        alloc[i] += 1;
        sum += 1;
    }
    while sum > total {
        let i =
            (0..k).filter(|&i| alloc[i] > 1).min_by(|&a, &b| key(a, &alloc).partial_cmp(&key(b, &alloc)).unwrap())?;
        alloc[i] -= 1;
        sum -= 1;
    }
    Some(alloc)
}

/// Fisher-Yates with SplitMix64.
pub fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut rng = SplitMix64::new(seed);
    for i in (1..v.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_is_proportional_with_a_floor_of_one() {
        // AlpacaEval's subsets (alphabetical): helpful_base, koala, oasst, selfinstruct, vicuna.
        let sizes = [129, 156, 188, 252, 80];
        // Targets 16.02 19.38 23.35 31.30 9.94: floors 16 19 23 31 9, the two largest
        // remainders (vicuna .94, koala .38) get the last two.
        assert_eq!(allocate(&sizes, 100).unwrap(), vec![16, 20, 23, 31, 10]);
        // 10: targets 1.60 1.94 2.34 3.13 0.99 -> floors 1 1 2 3 1 (vicuna raised to 1) = 8,
        // then koala (.94) and helpful_base (.60).
        assert_eq!(allocate(&sizes, 10).unwrap(), vec![2, 2, 2, 3, 1]);
        assert_eq!(allocate(&sizes, 5).unwrap(), vec![1; 5]);
        assert!(allocate(&sizes, 4).is_none());
        // A tiny subset is not over-drawn: the floor of one is paid for by the largest.
        assert_eq!(allocate(&[1, 99], 10).unwrap(), vec![1, 9]);
        assert_eq!(allocate(&[2, 3], 100).unwrap(), vec![2, 3]);
    }
}
