//! The self-reward judge in `generate` mode on SmolLM2-135M-Instruct, which does not write the
//! `<Score>` tag within a short budget: each judgement falls back to the expected score read
//! after its own text plus `<Score>`, and that score equals the one computed independently
//! (greedy generation again, then the log-probs of the eight digits as completions).
use selfplay_game::config::SelfRewardMode;
use selfplay_game::judge::Judge;
use selfplay_game::prompts::{judge_prompt, DEFAULT_JUDGE_PROMPT};
use selfplay_policy::{ChatMessage, Policy, SamplingConfig, Scorer};
use tch::{Device, Kind};

#[test]
fn a_judgement_without_a_score_falls_back_to_the_expected_score() {
    tch::set_num_threads(2);
    let policy = Policy::load(&selfplay_tests::smollm2_dir(), Device::Cpu, Kind::Float).unwrap();
    let budget = 24;
    let judge = Judge::new(&policy, DEFAULT_JUDGE_PROMPT.to_string(), SelfRewardMode::Generate, budget).unwrap();
    let pairs = vec![
        ("What is the capital of France?".to_string(), "Paris.".to_string()),
        ("Name a prime number greater than 10.".to_string(), "Bananas are yellow.".to_string()),
    ];
    let got = judge.judge(&policy, &pairs).unwrap();
    for (j, (q, a)) in got.iter().zip(&pairs) {
        assert!(j.fallback, "24 tokens cannot hold a justification and the tag: {:?}", j.text);
        let score = j.score.expect("the fallback gives a score");
        // Independently: the same greedy judgement, then P(digit | judgement + "\n<Score>").
        let prompt =
            policy.tokenizer.encode_chat(&[ChatMessage::user(judge_prompt(DEFAULT_JUDGE_PROMPT, q, a))], true).unwrap();
        let cfg = SamplingConfig { stop: vec!["</Score>".into()], ..SamplingConfig::greedy(budget) };
        let c = policy.generate(&[prompt], &cfg).unwrap().remove(0);
        assert_eq!(c.text, j.text);
        let tag = policy.tokenizer.encode("\n<Score>", false).unwrap();
        let context = [c.prompt_ids, c.completion_ids, tag].concat();
        let digits: Vec<(Vec<i64>, Vec<i64>)> =
            (0..=7).map(|d| (context.clone(), policy.tokenizer.encode(&d.to_string(), false).unwrap())).collect();
        assert!(digits.iter().all(|(_, d)| d.len() == 1));
        let lp = tch::no_grad(|| Scorer::new(&policy.model).score(&digits)).unwrap();
        let lp: Vec<f64> = Vec::<Vec<f32>>::try_from(lp.logprobs).unwrap().iter().map(|r| r[0] as f64).collect();
        let z: f64 = lp.iter().map(|v| v.exp()).sum();
        let want: f64 = lp.iter().enumerate().map(|(k, v)| k as f64 * v.exp() / z).sum();
        eprintln!("{q:?} / {a:?}: fallback {score:.4}, independent {want:.4}; judgement {:?}", j.text);
        assert!((score - want).abs() < 1e-3, "fallback {score} vs independent {want}");
    }
}
