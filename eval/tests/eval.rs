//! End-to-end runs of `selfplay_eval::evaluate` on tiny random models, the stratified sample,
//! and bad input.
use selfplay_eval::judge::Detail;
use selfplay_eval::{evaluate, sample, EvalConfig, JudgeSpec, Outcome, ProgressMode};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Tiny models made once for every test of this file: two policies (different seeds), a
/// reward model, and a judge LM whose vocabulary has the words "A" and "B".
struct Fixture {
    _dir: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
    rm: PathBuf,
    lm: PathBuf,
    prompts: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let (a, b, rm, lm) = (p("a"), p("b"), p("rm"), p("lm"));
        // Four Python start-ups: run them side by side.
        std::thread::scope(|s| {
            s.spawn(|| selfplay_tests::tiny_model(&a, "gqa_tied", 1));
            s.spawn(|| selfplay_tests::tiny_model(&b, "gqa_tied", 2));
            s.spawn(|| selfplay_tests::tiny_reward_model(&rm, "gqa_tied", 3));
            s.spawn(|| selfplay_tests::tiny_model(&lm, "gqa_tied", 4));
        });
        // The judge LM's tokenizer spells t5 as "A" and t6 as "B".
        let tok_path = lm.join("tokenizer.json");
        let mut tok: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&tok_path).unwrap()).unwrap();
        let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
        vocab.remove("t5");
        vocab.remove("t6");
        vocab.insert("A".into(), 5.into());
        vocab.insert("B".into(), 6.into());
        std::fs::write(&tok_path, tok.to_string()).unwrap();
        let prompts = p("prompts.json");
        let rows: Vec<serde_json::Value> = (0..7)
            .map(|i| {
                let subset = ["koala", "oasst", "vicuna"][i % 3];
                serde_json::json!({"instruction": format!("t{} t{} t{} please", 10 + i, 30 + 2 * i, 50 + i), "dataset": subset})
            })
            .collect();
        std::fs::write(&prompts, serde_json::to_string(&rows).unwrap()).unwrap();
        Fixture { _dir: dir, a, b, rm, lm, prompts }
    })
}

fn config(model: &Path, baseline: &Path, judge: JudgeSpec, work: &Path) -> EvalConfig {
    let f = fixture();
    let mut cfg = EvalConfig::new(model, baseline, &f.prompts, judge, &work.join("out"), &work.join("cache"));
    cfg.max_new_tokens = 6;
    cfg.batch = 3;
    cfg.temperature = 1.0;
    cfg.progress = ProgressMode::Quiet;
    cfg
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn reward_model_judge_end_to_end_with_cache() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let cfg = config(&f.a, &f.b, JudgeSpec::RewardModel(f.rm.clone()), work.path());
    let r1 = evaluate(&cfg).unwrap();
    assert_eq!((r1.stats.model_generated, r1.stats.baseline_generated), (7, 7));
    assert_eq!((r1.stats.model_cached, r1.stats.baseline_cached), (0, 0));
    assert_eq!(r1.overall.n, 7);
    assert_eq!(r1.overall.wins + r1.overall.ties + r1.overall.losses, 7);
    assert!(r1.overall.ci_low <= r1.overall.win_rate && r1.overall.win_rate <= r1.overall.ci_high);
    // Every verdict follows the reward-model rule.
    for p in &r1.pairs {
        match p.verdict.detail {
            Detail::RewardModel { model_score, baseline_score } => {
                let want = selfplay_eval::judge::reward_outcome(model_score, baseline_score);
                assert_eq!(p.verdict.outcome, want);
            }
            Detail::Identical => assert_eq!(p.model_answer, p.baseline_answer),
            ref d => panic!("unexpected detail {d:?}"),
        }
    }

    // results.json: the fields a reader needs.
    let j = read_json(&work.path().join("out/results.json"));
    assert_eq!(j["judge"]["kind"], "reward-model");
    assert_eq!(j["ci"]["method"], "wilson");
    assert_eq!(j["ci"]["level"], 0.95);
    assert_eq!(j["prompts"]["evaluated"], 7);
    assert_eq!(j["sampling"]["temperature"], 1.0);
    assert_eq!(j["model"]["checksum"].as_str().unwrap().len(), 64);
    assert_ne!(j["model"]["checksum"], j["baseline"]["checksum"]);
    let subsets: Vec<&str> = j["subsets"].as_array().unwrap().iter().map(|s| s["subset"].as_str().unwrap()).collect();
    assert_eq!(subsets, ["koala", "oasst", "vicuna"]);
    let sizes: Vec<u64> = j["subsets"].as_array().unwrap().iter().map(|s| s["n"].as_u64().unwrap()).collect();
    assert_eq!(sizes, [3, 2, 2]);
    for s in j["subsets"].as_array().unwrap().iter().chain([&j["overall"]]) {
        for k in ["win_rate", "ci_low", "ci_high", "wins", "ties", "losses"] {
            assert!(s[k].is_number(), "{k} missing in {s}");
        }
    }
    assert_eq!(j["pairs"].as_array().unwrap().len(), 7);
    assert!(j["pairs"][0]["outcome"].is_string() && j["pairs"][0]["by"].is_string());
    let png = std::fs::read(work.path().join("out/winrate.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // Again, with the same cache: nothing is generated, the answers and verdicts are the same.
    let r2 = evaluate(&cfg).unwrap();
    assert_eq!(r2.stats.generated(), 0);
    assert_eq!((r2.stats.model_cached, r2.stats.baseline_cached), (7, 7));
    assert_eq!(r2.pairs, r1.pairs);
    assert_eq!(r2.overall, r1.overall);

    // A different sampling setting is a different cache entry.
    let mut cfg3 = cfg.clone();
    cfg3.max_new_tokens = 5;
    cfg3.limit = Some(2);
    let r3 = evaluate(&cfg3).unwrap();
    assert_eq!((r3.stats.model_generated, r3.stats.baseline_generated), (2, 2));
}

#[test]
fn same_model_greedy_is_one_half() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let mut cfg = config(&f.a, &f.a, JudgeSpec::RewardModel(f.rm.clone()), work.path());
    cfg.temperature = 0.0;
    let r = evaluate(&cfg).unwrap();
    assert_eq!(r.overall.ties, 7);
    assert_eq!(r.overall.win_rate, 0.5);
    assert_eq!(r.stats.identical, 7);
    assert_eq!(r.stats.judged, 0);
    // The same checksum: the baseline's answers are the model's, from the cache.
    assert_eq!((r.stats.model_generated, r.stats.baseline_generated, r.stats.baseline_cached), (7, 0, 7));
    for s in &r.subsets {
        assert_eq!(s.tally.win_rate, 0.5);
    }
}

#[test]
fn judge_lm_both_orders() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let cfg = config(&f.a, &f.b, JudgeSpec::JudgeLm(f.lm.clone()), work.path());
    let r = evaluate(&cfg).unwrap();
    assert_eq!(r.overall.n, 7);
    let mut judged = 0;
    for p in &r.pairs {
        if let Detail::JudgeLm { p_model_first, p_model_second } = p.verdict.detail {
            judged += 1;
            assert!((0.0..=1.0).contains(&p_model_first) && (0.0..=1.0).contains(&p_model_second));
            let want = if p_model_first > 0.5 && p_model_second > 0.5 {
                Outcome::Win
            } else if p_model_first < 0.5 && p_model_second < 0.5 {
                Outcome::Loss
            } else {
                Outcome::Tie
            };
            assert_eq!(p.verdict.outcome, want);
        }
    }
    assert_eq!(judged, r.stats.judged);
    if judged > 0 {
        let m = r.stats.mean_preference.unwrap();
        assert!((0.0..=1.0).contains(&m));
    }
    assert!(r.judge.prompt.as_deref().unwrap().contains("A or B"));

    // The calibrated rule on the same pairs (answers from the cache): the model's log-odds
    // summed over both orders decide, so no judged pair is a tie and the judge says the same.
    let mut cfg = config(&f.a, &f.b, JudgeSpec::JudgeLm(f.lm.clone()), work.path());
    cfg.pairwise_rule = selfplay_eval::judge::PairwiseRule::Calibrated;
    let c = evaluate(&cfg).unwrap();
    assert_eq!(c.stats.model_generated + c.stats.baseline_generated, 0, "answers come from the cache");
    assert!(c.judge.rule.contains("summed"), "{}", c.judge.rule);
    let logit = |p: f64| (p / (1.0 - p)).ln();
    for (p, before) in c.pairs.iter().zip(&r.pairs) {
        assert_eq!(p.verdict.detail, before.verdict.detail, "the same judge, the same numbers");
        if let Detail::JudgeLm { p_model_first, p_model_second } = p.verdict.detail {
            let margin = logit(p_model_first) + logit(p_model_second);
            let want = if margin > 0.0 { Outcome::Win } else { Outcome::Loss };
            assert_eq!(p.verdict.outcome, want, "margin {margin}");
        }
    }

    // Identical answers put to the judge anyway: both orders are the same question, so the
    // judge names the same letter twice and every pair is a tie by position.
    let mut cfg = config(&f.a, &f.a, JudgeSpec::JudgeLm(f.lm.clone()), work.path());
    cfg.judge_identical = true;
    let r = evaluate(&cfg).unwrap();
    assert_eq!((r.stats.judged, r.overall.ties, r.stats.position_bias_ties), (7, 7, Some(7)));
    assert_eq!(r.overall.win_rate, 0.5);
    // The same question twice: P(model) is p as A and 1 - p as B, 1/2 on average.
    assert!((r.stats.mean_preference.unwrap() - 0.5).abs() < 1e-9);
}

#[test]
fn stratified_sample_is_reproducible_and_proportional() {
    // AlpacaEval's subset sizes, interleaved.
    let sizes = [("helpful_base", 129), ("koala", 156), ("oasst", 188), ("selfinstruct", 252), ("vicuna", 80)];
    let mut subsets: Vec<String> = vec![];
    for (k, (name, n)) in sizes.iter().enumerate() {
        subsets.extend((0..*n).map(|_| name.to_string()));
        subsets.rotate_left(k * 7);
    }
    let a = sample::select(&subsets, Some(100), true, 42).unwrap();
    assert_eq!(a, sample::select(&subsets, Some(100), true, 42).unwrap());
    assert_ne!(a, sample::select(&subsets, Some(100), true, 43).unwrap());
    assert_eq!(a.len(), 100);
    assert!(a.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
    let mut got: BTreeMap<&str, usize> = BTreeMap::new();
    for &i in &a {
        *got.entry(subsets[i].as_str()).or_default() += 1;
    }
    // In proportion: 100 * n / 805, rounded by largest remainder.
    let want: BTreeMap<&str, usize> =
        [("helpful_base", 16), ("koala", 20), ("oasst", 23), ("selfinstruct", 31), ("vicuna", 10)].into();
    assert_eq!(got, want);
    // At least one per subset even when proportion says less.
    let small = sample::select(&subsets, Some(5), true, 1).unwrap();
    let names: std::collections::BTreeSet<&str> = small.iter().map(|&i| subsets[i].as_str()).collect();
    assert_eq!(names.len(), 5);
    // Bigger samples are not supersets by construction, but each is fixed by its seed.
    assert!(sample::select(&subsets, Some(4), true, 1).unwrap_err().to_string().contains("5 subsets"));
    // Without --stratified: the first N; past the end: everything.
    assert_eq!(sample::select(&subsets, Some(3), false, 9).unwrap(), vec![0, 1, 2]);
    assert_eq!(sample::select(&subsets, Some(10_000), true, 9).unwrap().len(), 805);
    assert!(sample::select(&subsets, Some(0), true, 9).is_err());
}

#[test]
fn stratified_sample_of_alpaca_eval() {
    let path = selfplay_tests::shared_data_file("alpaca_eval/alpaca_eval.json");
    let rows = selfplay_game::data::load_prompt_rows(&path).unwrap();
    let subsets: Vec<String> = rows.iter().map(|r| r.subset.clone()).collect();
    let pick = sample::select(&subsets, Some(10), true, 0).unwrap();
    let mut got: BTreeMap<&str, usize> = BTreeMap::new();
    for &i in &pick {
        *got.entry(subsets[i].as_str()).or_default() += 1;
    }
    let want: BTreeMap<&str, usize> =
        [("helpful_base", 2), ("koala", 2), ("oasst", 2), ("selfinstruct", 3), ("vicuna", 1)].into();
    assert_eq!(got, want);
}

#[test]
fn bad_input_gives_clear_errors() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let err = |cfg: &EvalConfig| evaluate(cfg).unwrap_err().to_string();

    let e = "gpt-4:/x".parse::<JudgeSpec>().unwrap_err().to_string();
    assert!(e.contains("unknown judge") && e.contains("judge-lm:DIR"), "{e}");

    let empty = work.path().join("empty.json");
    std::fs::write(&empty, "").unwrap();
    let mut cfg = config(&f.a, &f.b, JudgeSpec::RewardModel(f.rm.clone()), work.path());
    cfg.prompts = empty.clone();
    assert!(err(&cfg).contains("holds no prompts"), "{}", err(&cfg));
    std::fs::write(&empty, "[]").unwrap();
    assert!(err(&cfg).contains("holds no prompts"));
    cfg.prompts = work.path().join("missing.json");
    assert!(err(&cfg).contains("missing.json"));

    // A model directory that does not exist, one without weights, one with broken weights.
    let cfg = config(&work.path().join("nope"), &f.b, JudgeSpec::RewardModel(f.rm.clone()), work.path());
    let e = err(&cfg);
    assert!(e.contains("the model") && e.contains("not found"), "{e}");
    let broken = work.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(f.a.join(name), broken.join(name)).unwrap();
    }
    let cfg = config(&f.a, &broken, JudgeSpec::RewardModel(f.rm.clone()), work.path());
    let e = err(&cfg);
    assert!(e.contains("the baseline") && e.contains("model.safetensors"), "{e}");
    std::fs::write(broken.join("model.safetensors"), b"not a safetensors file").unwrap();
    let e = err(&cfg);
    assert!(e.contains("cannot load the baseline") && e.contains("broken"), "{e}");
    // The reward model is not a policy.
    let e = err(&config(&f.rm, &f.b, JudgeSpec::RewardModel(f.rm.clone()), work.path()));
    assert!(e.contains("not a language model"), "{e}");

    // Judges of the wrong kind, or missing, fail before any generation.
    let cache = work.path().join("cache2");
    let mut cfg = config(&f.a, &f.b, JudgeSpec::RewardModel(f.a.clone()), work.path());
    cfg.cache_dir = cache.clone();
    assert!(err(&cfg).contains("not a reward model"), "{}", err(&cfg));
    cfg.judge = JudgeSpec::JudgeLm(f.rm.clone());
    assert!(err(&cfg).contains("is a reward model"), "{}", err(&cfg));
    cfg.judge = JudgeSpec::JudgeLm(work.path().join("no-judge"));
    assert!(err(&cfg).contains("not found"));
    assert!(!cache.join("answers").exists(), "nothing was generated");
    // A judge LM whose tokenizer cannot say "A" or "B" (the plain tiny tokenizer maps both
    // to its unknown token).
    cfg.judge = JudgeSpec::JudgeLm(f.b.clone());
    let e = err(&cfg);
    assert!(e.contains("distinct single tokens"), "{e}");

    let mut cfg = config(&f.a, &f.b, JudgeSpec::RewardModel(f.rm.clone()), work.path());
    cfg.batch = 0;
    assert!(err(&cfg).contains("--batch"));
    cfg.batch = 2;
    cfg.temperature = -1.0;
    assert!(err(&cfg).contains("temperature"));
}

#[test]
fn rules_give_both_pass_rates_as_the_rule_reward_scores_them() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let rules = work.path().join("rules.toml");
    // Passes with 2 to 4 words and no "t9".
    std::fs::write(
        &rules,
        "[reward]\nkind = \"rule\"\nrules = [\n  { rule = \"length\", words = 3, tolerance = 1, weight = 2.0 },\n  { rule = \"contains\", text = \"t9\", weight = -1.0 },\n]\n",
    )
    .unwrap();
    let mut cfg = config(&f.a, &f.b, JudgeSpec::RewardModel(f.rm.clone()), work.path());
    cfg.rules = Some(rules.clone());
    let r = evaluate(&cfg).unwrap();
    let rep = r.rules.clone().expect("a rule report");
    let expect = |answer: &str| {
        let words = answer.split_whitespace().count();
        let score = if (2..=4).contains(&words) { 2.0 } else { 0.0 } - if answer.contains("t9") { 1.0 } else { 0.0 };
        (score, score == 2.0)
    };
    let mut passes = (0, 0);
    for p in &r.pairs {
        let (a, b) = (expect(&p.model_answer), expect(&p.baseline_answer));
        assert_eq!(p.model_rule_score, Some(a.0), "{p:?}");
        assert_eq!(p.baseline_rule_score, Some(b.0), "{p:?}");
        passes.0 += a.1 as usize;
        passes.1 += b.1 as usize;
    }
    assert_eq!((rep.model.passes, rep.baseline.passes), passes);
    assert_eq!((rep.model.n, rep.baseline.n), (7, 7));
    assert_eq!(rep.pass_score, 2.0);
    assert!((rep.difference - (passes.0 as f64 - passes.1 as f64) / 7.0).abs() < 1e-12);
    assert!(rep.model.ci_low <= rep.model.rate && rep.model.rate <= rep.model.ci_high);
    let j = read_json(&work.path().join("out/results.json"));
    assert_eq!(j["rules"]["model"]["passes"].as_u64(), Some(passes.0 as u64));
    assert!(selfplay_eval::format_table(&r).contains("rule pass rate"));

    // A config without rules, or a missing file, fails before anything is generated.
    let bad = work.path().join("judge.toml");
    std::fs::write(&bad, "[reward]\nkind = \"judge\"\n").unwrap();
    for file in [bad, work.path().join("missing.toml")] {
        let mut c = cfg.clone();
        c.rules = Some(file);
        c.cache_dir = work.path().join("cache2");
        assert!(evaluate(&c).is_err());
        assert!(!work.path().join("cache2").exists(), "generated before failing");
    }
}
