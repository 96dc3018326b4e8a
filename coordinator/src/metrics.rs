//! The coordinator's metrics (names, and their descriptions for the Prometheus exporter).
//! They are recorded where the events happen, in [`crate::service`]; `docs/metrics.md`
//! documents each.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

pub const ACTORS_ALIVE: &str = "selfplay_coordinator_actors_alive";
pub const LEASES_EXPIRED: &str = "selfplay_coordinator_leases_expired_total";
pub const UNITS_ISSUED: &str = "selfplay_coordinator_units_issued_total";
pub const UNITS_REISSUED: &str = "selfplay_coordinator_units_reissued_total";
pub const UNITS_DONE: &str = "selfplay_coordinator_units_done_total";
pub const UNITS_PENDING: &str = "selfplay_coordinator_units_pending";
pub const WEIGHT_BYTES_SERVED: &str = "selfplay_coordinator_weight_bytes_served_total";
pub const WEIGHT_VERSIONS_PUBLISHED: &str = "selfplay_coordinator_weight_versions_published_total";
pub const WEIGHTS_VERSION: &str = "selfplay_coordinator_weights_version";
pub const RPC_SECONDS: &str = "selfplay_coordinator_rpc_seconds";
pub const LEARNER_EPOCHS: &str = "selfplay_coordinator_learner_epochs_total";
pub const LEARNER_EPOCH: &str = "selfplay_coordinator_learner_epoch";

/// Registers every coordinator metric's unit and help text with the installed recorder (and
/// the shared `selfplay_rpc_rejected_total`, and `selfplay_coordinator_permission_denied_total`). Call once after installing the exporter.
pub fn describe_metrics() {
    describe_gauge!(ACTORS_ALIVE, Unit::Count, "Actors holding a live lease");
    describe_counter!(LEASES_EXPIRED, Unit::Count, "Actors dropped because their lease expired without a heartbeat");
    describe_counter!(UNITS_ISSUED, Unit::Count, "Work units handed to actors, re-issues included");
    describe_counter!(
        UNITS_REISSUED,
        Unit::Count,
        "Work units handed out again after an expired lease, a give-back or a restart"
    );
    describe_counter!(UNITS_DONE, Unit::Count, "Work units reported done (group accepted by the learner)");
    describe_gauge!(UNITS_PENDING, Unit::Count, "Work units waiting for an actor");
    describe_counter!(WEIGHT_BYTES_SERVED, Unit::Bytes, "Weight payload bytes sent to actors by FetchWeights");
    describe_counter!(
        WEIGHT_VERSIONS_PUBLISHED,
        Unit::Count,
        "Weight versions accepted from the learner (verified and stored)"
    );
    describe_gauge!(WEIGHTS_VERSION, Unit::Count, "Newest stored weights version (0 = none)");
    describe_histogram!(
        RPC_SECONDS,
        Unit::Seconds,
        "Time to handle one Coordinator RPC, by rpc (PublishWeights: the whole upload; FetchWeights: until the stream starts)"
    );
    describe_counter!(
        LEARNER_EPOCHS,
        Unit::Count,
        "Learner epochs begun (a learner started or restarted from its checkpoint)"
    );
    describe_gauge!(LEARNER_EPOCH, Unit::Count, "The current learner epoch (0 = none yet)");
    selfplay_proto::auth::describe_metrics();
    selfplay_proto::guard::COORDINATOR.describe_metrics();
    // Counters exist from the start (at 0), so dashboards and rate() see them before events.
    for name in [
        LEASES_EXPIRED,
        UNITS_ISSUED,
        UNITS_REISSUED,
        UNITS_DONE,
        WEIGHT_BYTES_SERVED,
        WEIGHT_VERSIONS_PUBLISHED,
        LEARNER_EPOCHS,
    ] {
        metrics::counter!(name).increment(0);
    }
}
