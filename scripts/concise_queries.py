"""Usage: concise_queries.py SAMPLES WINDOW OUT PASS_REWARD

The challenger's queries of a run's first and last WINDOW steps, from its samples.jsonl
(run.log_samples): writes OUT/first.jsonl and OUT/last.jsonl (one {"prompt": ...} per query,
for `selfplay eval --prompts`) and OUT/summary.json (their word lengths, and the share of the
training answers to them that passed, R >= PASS_REWARD)."""
import json
import statistics
import sys
from pathlib import Path


def main(samples: str, window: int, out: str, pass_reward: float) -> None:
    rows = [json.loads(l) for l in Path(samples).read_text().splitlines() if l.strip()]
    rows = [r for r in rows if r.get("query") and r["query"].strip()]
    if not rows:
        sys.exit(f"{samples}: no challenger queries (a GRPO run, or run.log_samples off)")
    steps = sorted({r["step"] for r in rows})
    parts = {"first": set(steps[:window]), "last": set(steps[-window:])}
    best = pass_reward
    Path(out).mkdir(parents=True, exist_ok=True)
    summary = {"samples": samples, "window_steps": window, "steps_logged": len(steps), "pass_reward": best}
    for name, chosen in parts.items():
        part = [r for r in rows if r["step"] in chosen]
        with open(Path(out) / f"{name}.jsonl", "w") as f:
            for r in part:
                f.write(json.dumps({"prompt": r["query"].strip()}) + "\n")
        words = [len(r["query"].split()) for r in part]
        answers = [a for r in part for a in r["answers"]]
        summary[name] = {
            "steps": [min(chosen), max(chosen)],
            "queries": len(part),
            "query_words_mean": statistics.fmean(words),
            "query_words_median": statistics.median(words),
            "answer_tokens_mean": statistics.fmean(a["tokens"] for a in answers),
            "training_pass_share": sum(a["reward"] >= best for a in answers) / len(answers),
        }
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]))
