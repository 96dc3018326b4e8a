//! The learner's metrics: names, descriptions, and recording of one step's statistics.
use metrics::{describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use selfplay_game::{Refusal, StepStats};

pub fn describe_metrics() {
    selfplay_proto::guard::LEARNER_SERVICE.describe_metrics();
    describe_counter!("selfplay_learner_steps_total", "Optimizer steps taken.");
    describe_histogram!(
        "selfplay_learner_step_seconds",
        Unit::Seconds,
        "Time of one optimizer step (forward, backward, update)."
    );
    describe_gauge!("selfplay_learner_loss", "Loss of the last step, per role (solver, challenger, total).");
    describe_gauge!("selfplay_learner_kl", "Mean per-sequence k3 KL to the reference model, per role.");
    describe_gauge!("selfplay_learner_entropy", "Mean per-token policy entropy on the sampled positions, per role.");
    describe_gauge!("selfplay_learner_advantage_mean", "Mean advantage of the last step, per role.");
    describe_gauge!(
        "selfplay_learner_advantage_std",
        "Standard deviation of the advantages of the last step, per role."
    );
    describe_gauge!(
        "selfplay_learner_reward_mean",
        "Mean reward of the last step, per kind (reward, self_reward, solver, challenger)."
    );
    describe_gauge!("selfplay_learner_reward_std", "Standard deviation of the rewards of the last step, per kind.");
    describe_counter!("selfplay_learner_groups_received_total", "Rollout groups received.");
    describe_counter!("selfplay_learner_groups_accepted_total", "Rollout groups stored for a step.");
    describe_counter!(
        "selfplay_learner_groups_rejected_total",
        "Rollout groups refused, by reason (invalid, stale, duplicate, unleased: no valid lease ticket for the unit and actor, corrupt: log-probs that disagree with the learner's at its step)."
    );
    describe_counter!(
        "selfplay_learner_groups_corrupt_total",
        "Groups refused at their step because their log-probs disagree with the learner's own, by actor and by which log-probs (behaviour: synchronous mode; reference: learner.reference_check_fraction)."
    );
    describe_gauge!(
        "selfplay_learner_logprob_mismatch_mean_nats",
        "Mean over the last step's completion tokens of |learner log-prob - behaviour log-prob|."
    );
    describe_gauge!(
        "selfplay_learner_logprob_mismatch_max_nats",
        "Largest per-token |learner log-prob - behaviour log-prob| of the last step."
    );
    describe_histogram!(
        "selfplay_learner_staleness_steps",
        "Learner version minus the version that sampled each trained group."
    );
    describe_histogram!("selfplay_learner_checkpoint_seconds", Unit::Seconds, "Time to write one checkpoint.");
    describe_histogram!(
        "selfplay_learner_weight_publish_seconds",
        Unit::Seconds,
        "Time to publish one weights version to the coordinator."
    );
    describe_counter!(
        "selfplay_learner_weight_publish_bytes_total",
        Unit::Bytes,
        "Weight payload bytes uploaded to the coordinator."
    );
    describe_counter!(
        "selfplay_learner_republish_total",
        "Times the learner began a new epoch because the coordinator had lost its epoch or weights."
    );
    describe_counter!(
        "selfplay_learner_steps_skipped_total",
        "Steps whose loss or gradient was not finite: consumed, weights unchanged."
    );
    describe_counter!(
        "selfplay_learner_reopened_total",
        "Times the learner reopened its steps because no unit was left to play while it lacked groups."
    );
    describe_gauge!("selfplay_learner_epoch", "The learner epoch the coordinator gave this learner.");
    describe_gauge!(
        "selfplay_learner_idle_fraction",
        "Share of the wall time since the previous step spent waiting for groups."
    );
    describe_gauge!("selfplay_learner_weights_version", "Weights version the learner holds (completed steps).");
    describe_gauge!("selfplay_learner_grad_norm", "Global gradient norm of the last step before clipping.");
    describe_gauge!(
        "selfplay_learner_tokens_per_second",
        "Tokens through forward and backward per second in the last step."
    );
    describe_counter!("selfplay_learner_parse_failures_total", "Unparsable self-reward judgements in trained groups.");
    // Counters exist from the start (at 0), so dashboards and rate() see them before events.
    for name in [
        "selfplay_learner_steps_total",
        "selfplay_learner_groups_received_total",
        "selfplay_learner_groups_accepted_total",
        "selfplay_learner_weight_publish_bytes_total",
        "selfplay_learner_parse_failures_total",
        "selfplay_learner_republish_total",
        "selfplay_learner_steps_skipped_total",
        "selfplay_learner_reopened_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    for reason in ["invalid", "stale", "duplicate", "unleased", "corrupt"] {
        metrics::counter!("selfplay_learner_groups_rejected_total", "reason" => reason).increment(0);
    }
}

pub fn record_step(s: &StepStats) {
    metrics::counter!("selfplay_learner_steps_total").increment(1);
    metrics::histogram!("selfplay_learner_step_seconds").record(s.step_seconds);
    for (role, v) in [("solver", s.loss_solver), ("challenger", s.loss_challenger), ("total", s.loss)] {
        gauge!("selfplay_learner_loss", "role" => role).set(v);
    }
    for (role, kl, ent, adv) in [
        ("solver", s.kl_solver, s.entropy_solver, s.solver_advantage),
        ("challenger", s.kl_challenger, s.entropy_challenger, s.challenger_advantage),
    ] {
        gauge!("selfplay_learner_kl", "role" => role).set(kl);
        gauge!("selfplay_learner_entropy", "role" => role).set(ent);
        gauge!("selfplay_learner_advantage_mean", "role" => role).set(adv.mean);
        gauge!("selfplay_learner_advantage_std", "role" => role).set(adv.std);
    }
    for (kind, m) in [
        ("reward", s.reward),
        ("self_reward", s.self_reward),
        ("solver", s.solver_reward),
        ("challenger", s.challenger_reward),
    ] {
        gauge!("selfplay_learner_reward_mean", "kind" => kind).set(m.mean);
        gauge!("selfplay_learner_reward_std", "kind" => kind).set(m.std);
    }
    gauge!("selfplay_learner_weights_version").set(s.step as f64);
    gauge!("selfplay_learner_grad_norm").set(s.grad_norm);
    gauge!("selfplay_learner_tokens_per_second").set(s.tokens_per_second);
    gauge!("selfplay_learner_logprob_mismatch_mean_nats").set(s.logprob_mismatch_mean);
    gauge!("selfplay_learner_logprob_mismatch_max_nats").set(s.logprob_mismatch_max);
    metrics::counter!("selfplay_learner_parse_failures_total").increment(s.parse_failures);
}

/// Counts and logs the groups a step refused as corrupt.
pub fn record_refused(refused: &[Refusal]) {
    for r in refused {
        metrics::counter!("selfplay_learner_groups_rejected_total", "reason" => "corrupt").increment(1);
        metrics::counter!("selfplay_learner_groups_corrupt_total", "actor" => r.actor_id.clone(), "logprobs" => r.which.as_str())
            .increment(1);
        tracing::warn!(
            unit = %r.unit_id,
            actor = %r.actor_id,
            logprobs = r.which.as_str(),
            mismatch_mean = r.mean,
            mismatch_max = r.max,
            bound = r.bound,
            "rollout group refused as corrupt: its log-probs disagree with the learner's own; the step waits for its unit to be played again"
        );
    }
}
