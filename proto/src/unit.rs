//! Work units, defined once for every role: the id on the wire (`s{step}-u{index}`) and the
//! seed a unit samples with. The coordinator, the learner and the in-process driver all use
//! these, so a unit played by any of them draws the same tokens.

/// A unit by step and index within the step.
pub type UnitKey = (u64, u32);

/// The id of a unit: `s{step}-u{index}`.
pub fn unit_id(step: u64, index: u32) -> String {
    format!("s{step}-u{index}")
}

/// Inverse of [`unit_id`]; `None` for anything else, including non-canonical spellings
/// (leading zeros, signs): one unit, one id.
pub fn parse_unit_id(id: &str) -> Option<UnitKey> {
    let rest = id.strip_prefix('s')?;
    let (step, index) = rest.split_once("-u")?;
    let canonical = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    if !canonical(step) || !canonical(index) {
        return None;
    }
    let key = (step.parse().ok()?, index.parse().ok()?);
    (unit_id(key.0, key.1) == id).then_some(key)
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The sampling seed of unit `index` of `step` in a run: a fixed function of the three, so a
/// re-issued unit (or a restarted coordinator) reproduces the same draws.
pub fn unit_seed(run_seed: u64, step: u64, index: u32) -> u64 {
    splitmix64(splitmix64(splitmix64(run_seed) ^ step) ^ u64::from(index))
}

/// A splitmix64 step, for deterministic pseudo-random streams derived from a seed.
pub fn mix(z: u64) -> u64 {
    splitmix64(z)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn ids_round_trip_and_reject_garbage() {
        assert_eq!(unit_id(12, 3), "s12-u3");
        assert_eq!(parse_unit_id("s12-u3"), Some((12, 3)));
        for bad in ["", "s", "s1-u", "s-u1", "x1-u2", "s01-u2", "s1-u+2", "s1-u2-", "s1u2", "s1-u99999999999"] {
            assert_eq!(parse_unit_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn seeds_are_deterministic_and_distinct() {
        assert_eq!(unit_seed(7, 3, 1), unit_seed(7, 3, 1));
        let mut seen = BTreeSet::new();
        for run in 0..3 {
            for step in 0..20 {
                for i in 0..20 {
                    assert!(seen.insert(unit_seed(run, step, i)));
                }
            }
        }
    }
}
