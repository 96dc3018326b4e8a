//! Rewards and advantages of the three modes (docs/method.md), on plain numbers.
//!
//! LSP-Zero: solver reward R, challenger reward -V(q) with V(q) = mean_j R(q, a_j).
//! LSP:      solver reward R + R_Q, challenger reward -V(q) + V_Q(q).
//! GRPO:     no challenger; solver advantage (R - mean) / (std + eps) within the group.
//! Solver advantage (LSP, LSP-Zero): reward minus its mean over the group's answers.
//! Challenger advantage: reward minus its mean over the step's queries. No std division.
//! A query whose answers were all dropped has no value V(q): its challenger gets no reward, no
//! advantage and no gradient, and stays out of the other queries' baseline.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    LspZero,
    Lsp,
    Grpo,
}

impl Mode {
    pub fn has_challenger(self) -> bool {
        self != Mode::Grpo
    }
    pub fn uses_self_reward(self) -> bool {
        self == Mode::Lsp
    }
    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            Mode::LspZero => "lsp-zero",
            Mode::Lsp => "lsp",
            Mode::Grpo => "grpo",
        }
    }
}

/// Per-answer rewards of one group, as the learner sees them.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupRewards {
    /// R(q, a_j), possibly already reduced by a KL penalty (reward-penalty KL mode).
    pub reward: Vec<f64>,
    /// R_Q(q, a_j) (LSP only; ignored otherwise).
    pub self_reward: Vec<f64>,
    /// false: the answer is left out (an unparsable judgement with the `drop` policy).
    pub keep: Vec<bool>,
    /// Subtracted from each solver reward (beta * detached KL in reward-penalty mode).
    pub solver_penalty: Vec<f64>,
    /// Subtracted from the challenger's reward (beta * detached KL in reward-penalty mode).
    pub challenger_penalty: f64,
}

impl GroupRewards {
    pub fn new(reward: Vec<f64>, self_reward: Vec<f64>) -> Self {
        let n = reward.len();
        GroupRewards { reward, self_reward, keep: vec![true; n], solver_penalty: vec![0.0; n], challenger_penalty: 0.0 }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Advantages {
    /// [N][G] solver advantages (0 for dropped answers).
    pub solver: Vec<Vec<f64>>,
    /// [N] challenger advantages (empty in GRPO mode).
    pub challenger: Vec<f64>,
    /// [N][G] solver rewards before the baseline.
    pub solver_reward: Vec<Vec<f64>>,
    /// [N] challenger rewards before the baseline (0 for a query left out).
    pub challenger_reward: Vec<f64>,
    /// [N] false: every answer to the query was dropped, so its challenger is left out.
    pub challenger_keep: Vec<bool>,
}

fn mean_kept(x: &[f64], keep: &[bool]) -> Option<f64> {
    let (s, n) = x.iter().zip(keep).filter(|(_, &k)| k).fold((0.0, 0usize), |(s, n), (v, _)| (s + v, n + 1));
    (n > 0).then(|| s / n as f64)
}

/// Sample standard deviation (n - 1), as torch.std and TRL's GRPO use.
fn std_kept(x: &[f64], keep: &[bool], mean: f64) -> f64 {
    let vals: Vec<f64> = x.iter().zip(keep).filter(|(_, &k)| k).map(|(v, _)| *v).collect();
    if vals.len() < 2 {
        return 0.0;
    }
    let ss: f64 = vals.iter().map(|v| (v - mean).powi(2)).sum();
    (ss / (vals.len() - 1) as f64).sqrt()
}

/// Computes every advantage of one step from its N groups.
pub fn advantages(mode: Mode, groups: &[GroupRewards], grpo_eps: f64) -> Advantages {
    let mut solver = Vec::with_capacity(groups.len());
    let mut solver_reward = Vec::with_capacity(groups.len());
    let mut challenger_reward = Vec::with_capacity(groups.len());
    let mut challenger_keep = Vec::with_capacity(groups.len());
    for g in groups {
        let r: Vec<f64> = match mode {
            Mode::Lsp => g.reward.iter().zip(&g.self_reward).map(|(r, q)| r + q).collect(),
            Mode::LspZero | Mode::Grpo => g.reward.clone(),
        };
        let r: Vec<f64> = r.iter().zip(&g.solver_penalty).map(|(r, p)| r - p).collect();
        let base = mean_kept(&r, &g.keep);
        let adv: Vec<f64> = match (mode, base) {
            (_, None) => vec![0.0; r.len()],
            (Mode::Grpo, Some(m)) => {
                let sd = std_kept(&r, &g.keep, m);
                r.iter().zip(&g.keep).map(|(v, &k)| if k { (v - m) / (sd + grpo_eps) } else { 0.0 }).collect()
            }
            (_, Some(m)) => r.iter().zip(&g.keep).map(|(v, &k)| if k { v - m } else { 0.0 }).collect(),
        };
        let c = match (mean_kept(&g.reward, &g.keep), mean_kept(&g.self_reward, &g.keep)) {
            (Some(v), Some(vq)) => Some(
                match mode {
                    Mode::LspZero => -v,
                    Mode::Lsp => -v + vq,
                    Mode::Grpo => 0.0,
                } - g.challenger_penalty,
            ),
            _ => None,
        };
        challenger_keep.push(c.is_some());
        challenger_reward.push(c.unwrap_or(0.0));
        solver.push(adv);
        solver_reward.push(r);
    }
    let kept: Vec<f64> = challenger_reward.iter().zip(&challenger_keep).filter(|(_, &k)| k).map(|(r, _)| *r).collect();
    let challenger = if mode.has_challenger() && !kept.is_empty() {
        let m = kept.iter().sum::<f64>() / kept.len() as f64;
        challenger_reward.iter().zip(&challenger_keep).map(|(r, &k)| if k { r - m } else { 0.0 }).collect()
    } else if mode.has_challenger() {
        vec![0.0; groups.len()]
    } else {
        vec![]
    };
    Advantages { solver, challenger, solver_reward, challenger_reward, challenger_keep }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(reward: &[f64], self_reward: &[f64]) -> GroupRewards {
        GroupRewards::new(reward.to_vec(), self_reward.to_vec())
    }

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-12, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn lsp_zero_by_hand() {
        // Query 1: R = 1, 3 -> V = 2; query 2: R = 0, 4 -> V = 2... make them differ:
        // query 2: R = 5, 7 -> V = 6. Challenger rewards -2, -6, mean -4 -> advantages 2, -2.
        let a = advantages(Mode::LspZero, &[g(&[1.0, 3.0], &[7.0, 0.0]), g(&[5.0, 7.0], &[0.0, 0.0])], 1e-4);
        close(&a.solver[0], &[-1.0, 1.0]);
        close(&a.solver[1], &[-1.0, 1.0]);
        close(&a.challenger_reward, &[-2.0, -6.0]);
        close(&a.challenger, &[2.0, -2.0]);
    }

    #[test]
    fn lsp_by_hand() {
        // Query 1: R = 1, 3; R_Q = 7, 1 -> solver rewards 8, 4 -> advantages 2, -2.
        //          V = 2, V_Q = 4 -> challenger reward -2 + 4 = 2.
        // Query 2: R = 5, 7; R_Q = 2, 2 -> solver rewards 7, 9 -> advantages -1, 1.
        //          V = 6, V_Q = 2 -> challenger reward -4. Mean -1 -> advantages 3, -3.
        let a = advantages(Mode::Lsp, &[g(&[1.0, 3.0], &[7.0, 1.0]), g(&[5.0, 7.0], &[2.0, 2.0])], 1e-4);
        close(&a.solver_reward[0], &[8.0, 4.0]);
        close(&a.solver[0], &[2.0, -2.0]);
        close(&a.solver[1], &[-1.0, 1.0]);
        close(&a.challenger_reward, &[2.0, -4.0]);
        close(&a.challenger, &[3.0, -3.0]);
    }

    #[test]
    fn grpo_by_hand() {
        // R = 1, 2, 3: mean 2, sample std 1 -> (-1, 0, 1) / (1 + eps).
        let a = advantages(Mode::Grpo, &[g(&[1.0, 2.0, 3.0], &[0.0; 3])], 0.0);
        close(&a.solver[0], &[-1.0, 0.0, 1.0]);
        assert!(a.challenger.is_empty());
        // Equal rewards: zero advantages, no division by zero.
        let a = advantages(Mode::Grpo, &[g(&[4.0, 4.0], &[0.0; 2])], 1e-4);
        close(&a.solver[0], &[0.0, 0.0]);
    }

    #[test]
    fn dropped_answers_leave_the_baseline() {
        let mut grp = g(&[1.0, 3.0, 100.0], &[1.0, 1.0, 1.0]);
        grp.keep[2] = false;
        let a = advantages(Mode::Lsp, &[grp], 1e-4);
        close(&a.solver[0], &[-1.0, 1.0, 0.0]);
        close(&a.challenger, &[0.0]);
    }

    #[test]
    fn an_all_dropped_group_gives_its_challenger_nothing() {
        // Query 0: both answers dropped -> no V, no challenger reward, not in the baseline.
        // Queries 1, 2 (LSP-Zero): V = 2 and 6 -> rewards -2, -6, mean -4 -> advantages 2, -2.
        let mut dropped = g(&[100.0, -100.0], &[0.0, 0.0]);
        dropped.keep = vec![false, false];
        let a = advantages(Mode::LspZero, &[dropped, g(&[1.0, 3.0], &[0.0, 0.0]), g(&[5.0, 7.0], &[0.0, 0.0])], 1e-4);
        assert_eq!(a.challenger_keep, vec![false, true, true]);
        close(&a.solver[0], &[0.0, 0.0]);
        close(&a.challenger, &[0.0, 2.0, -2.0]);
        close(&a.challenger_reward, &[0.0, -2.0, -6.0]);
        // Every group dropped: no challenger advantage at all, and no NaN.
        let mut d = g(&[1.0, 2.0], &[0.0, 0.0]);
        d.keep = vec![false, false];
        let a = advantages(Mode::Lsp, &[d], 1e-4);
        close(&a.challenger, &[0.0]);
        assert_eq!(a.challenger_keep, vec![false]);
    }

    #[test]
    fn penalties_come_off_before_the_baselines() {
        // LSP-Zero, solver rewards 1, 3 with penalties 0.5, 0 -> 0.5, 3 -> advantages -1.25, 1.25.
        // Challenger rewards -2 - 1 = -3 and -6 - 0 = -6 -> advantages 1.5, -1.5.
        let mut a0 = g(&[1.0, 3.0], &[0.0, 0.0]);
        a0.solver_penalty = vec![0.5, 0.0];
        a0.challenger_penalty = 1.0;
        let a = advantages(Mode::LspZero, &[a0, g(&[5.0, 7.0], &[0.0, 0.0])], 1e-4);
        close(&a.solver[0], &[-1.25, 1.25]);
        close(&a.challenger, &[1.5, -1.5]);
    }
}
