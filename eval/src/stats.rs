//! Win-rate arithmetic: pairwise outcomes, ties counted half, and 95% confidence intervals
//! over prompts (Wilson score interval, or a seeded percentile bootstrap).
use selfplay_policy::generate::SplitMix64;
use serde::{Deserialize, Serialize};

/// The 0.975 quantile of the standard normal: a two-sided 95% interval.
pub const Z95: f64 = 1.959_963_984_540_054;

/// Resamples of the bootstrap interval.
pub const BOOTSTRAP_RESAMPLES: usize = 10_000;

/// One prompt's verdict, from the evaluated model's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Win,
    Tie,
    Loss,
}

impl Outcome {
    /// 1 for a win, 1/2 for a tie, 0 for a loss.
    pub fn score(self) -> f64 {
        match self {
            Outcome::Win => 1.0,
            Outcome::Tie => 0.5,
            Outcome::Loss => 0.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CiMethod {
    /// Wilson score interval on p = (wins + ties/2) / n with n = prompts.
    Wilson,
    /// Percentile bootstrap over prompts (10,000 seeded resamples of the per-prompt scores).
    Bootstrap,
}

impl std::str::FromStr for CiMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "wilson" => Ok(CiMethod::Wilson),
            "bootstrap" => Ok(CiMethod::Bootstrap),
            other => Err(format!("unknown CI method {other:?} (wilson or bootstrap)")),
        }
    }
}

impl CiMethod {
    pub fn describe(self) -> &'static str {
        match self {
            CiMethod::Wilson => "Wilson score interval over prompts, ties count half",
            CiMethod::Bootstrap => "percentile bootstrap over prompts (10000 resamples), ties count half",
        }
    }
}

/// Counts, win rate and interval of one group of prompts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub n: usize,
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
    /// (wins + ties / 2) / n.
    pub win_rate: f64,
    pub ci_low: f64,
    pub ci_high: f64,
}

impl Tally {
    pub fn of(outcomes: &[Outcome], method: CiMethod, seed: u64) -> Tally {
        let n = outcomes.len();
        let count = |o: Outcome| outcomes.iter().filter(|x| **x == o).count();
        let (wins, ties, losses) = (count(Outcome::Win), count(Outcome::Tie), count(Outcome::Loss));
        let win_rate = if n == 0 { f64::NAN } else { (wins as f64 + 0.5 * ties as f64) / n as f64 };
        let (ci_low, ci_high) = match method {
            CiMethod::Wilson => wilson(win_rate, n, Z95),
            CiMethod::Bootstrap => {
                let scores: Vec<f64> = outcomes.iter().map(|o| o.score()).collect();
                bootstrap(&scores, BOOTSTRAP_RESAMPLES, 0.95, seed)
            }
        };
        Tally { n, wins, ties, losses, win_rate, ci_low, ci_high }
    }
}

/// Wilson score interval for a proportion `p` observed on `n` trials (fractional successes
/// allowed: ties add 1/2). Returns (0, 1) when n is 0.
pub fn wilson(p: f64, n: usize, z: f64) -> (f64, f64) {
    if n == 0 || !p.is_finite() {
        return (0.0, 1.0);
    }
    let n = n as f64;
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let center = (p + z2 / (2.0 * n)) / denom;
    let half = z / denom * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).max(0.0).sqrt();
    ((center - half).max(0.0), (center + half).min(1.0))
}

/// Percentile bootstrap of the mean of `scores`: `resamples` seeded draws with replacement,
/// the (1 - level)/2 and (1 + level)/2 quantiles of their means (nearest rank). (0, 1) when
/// there are no scores.
pub fn bootstrap(scores: &[f64], resamples: usize, level: f64, seed: u64) -> (f64, f64) {
    if scores.is_empty() || resamples == 0 {
        return (0.0, 1.0);
    }
    let n = scores.len();
    let mut rng = SplitMix64::new(seed);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| {
            let s: f64 = (0..n).map(|_| scores[(rng.next_u64() % n as u64) as usize]).sum();
            s / n as f64
        })
        .collect();
    means.sort_by(|a, b| a.total_cmp(b));
    let q = |f: f64| means[((f * (resamples - 1) as f64).round() as usize).min(resamples - 1)];
    (q((1.0 - level) / 2.0), q((1.0 + level) / 2.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use Outcome::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn win_rate_counts_ties_half() {
        // 3 wins, 2 ties, 5 losses: (3 + 1) / 10.
        let o = [Win, Win, Win, Tie, Tie, Loss, Loss, Loss, Loss, Loss];
        let t = Tally::of(&o, CiMethod::Wilson, 0);
        assert_eq!((t.n, t.wins, t.ties, t.losses), (10, 3, 2, 5));
        assert!(close(t.win_rate, 0.4));
        // Wilson at p = 0.4, n = 10, z = 1.96 (computed by hand / in Python).
        assert!(close(t.ci_low, 0.168_180_329_706_236_14), "{}", t.ci_low);
        assert!(close(t.ci_high, 0.687_326_230_266_341_7), "{}", t.ci_high);
    }

    #[test]
    fn wilson_hand_computed() {
        let (lo, hi) = wilson(0.5, 10, Z95);
        assert!(close(lo, 0.236_593_090_512_564) && close(hi, 0.763_406_909_487_436_1));
        // All wins: the upper end is 1 and the lower end stays well below it.
        let (lo, hi) = wilson(1.0, 10, Z95);
        assert!(close(lo, 0.722_467_200_137_110_7) && close(hi, 1.0));
        let (lo, hi) = wilson(0.0, 1, Z95);
        assert!(close(lo, 0.0) && close(hi, 0.793_450_685_622_762_6));
        let (lo, hi) = wilson(0.75, 4, Z95);
        assert!(close(lo, 0.300_641_842_582_401_84) && close(hi, 0.954_412_739_190_299_5));
        assert_eq!(wilson(0.5, 0, Z95), (0.0, 1.0));
    }

    #[test]
    fn all_ties_is_one_half() {
        let t = Tally::of(&[Tie; 8], CiMethod::Wilson, 0);
        assert!(close(t.win_rate, 0.5));
        assert!(t.ci_low < 0.5 && t.ci_high > 0.5);
        // The bootstrap sees no spread at all in all-tie data.
        let t = Tally::of(&[Tie; 8], CiMethod::Bootstrap, 0);
        assert!(close(t.ci_low, 0.5) && close(t.ci_high, 0.5));
    }

    #[test]
    fn bootstrap_is_seeded_and_near_the_normal_interval() {
        let o: Vec<Outcome> = (0..400).map(|i| [Win, Loss, Tie, Win, Loss][i % 5]).collect();
        let a = Tally::of(&o, CiMethod::Bootstrap, 7);
        let b = Tally::of(&o, CiMethod::Bootstrap, 7);
        assert_eq!(a, b);
        assert!(close(a.win_rate, 0.5));
        // Per-prompt scores 1,0,.5,1,0: mean of squares 0.45, variance 0.45 - 0.25 = 0.2;
        // normal half-width 1.96 * sqrt(0.2 / 400) = 0.04383.
        let half = (a.ci_high - a.ci_low) / 2.0;
        assert!((half - 0.043_83).abs() < 0.003, "{half}");
        assert!(a.ci_low < 0.5 && a.ci_high > 0.5);
        let (lo, hi) = bootstrap(&[1.0; 5], 100, 0.95, 1);
        assert!(close(lo, 1.0) && close(hi, 1.0));
    }

    #[test]
    fn ci_method_parses() {
        assert_eq!("wilson".parse::<CiMethod>().unwrap(), CiMethod::Wilson);
        assert_eq!("bootstrap".parse::<CiMethod>().unwrap(), CiMethod::Bootstrap);
        assert!("normal".parse::<CiMethod>().is_err());
    }
}
