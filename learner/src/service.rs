//! The `Learner` gRPC service: a stream of rollout groups in, one ack per group out.
use crate::inbox::{Inbox, RejectKind, Verdict};
use selfplay_proto::auth::Role;
use selfplay_proto::guard::LEARNER_SERVICE;
use selfplay_proto::ticket::{Lease, LeaseTickets};
use selfplay_proto::v1::learner_server::Learner;
use selfplay_proto::v1::{LearnerStatusRequest, LearnerStatusResponse, RolloutAck, RolloutGroup};
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// The inbox shared between the gRPC handlers and the training thread.
pub struct Shared {
    pub inbox: Mutex<Inbox>,
    /// Signalled when a group is stored or the learner stops.
    pub ready: Condvar,
}

#[derive(Clone)]
pub struct LearnerService {
    pub shared: Arc<Shared>,
    /// Checks that each group comes from the actor its unit was leased to.
    pub tickets: LeaseTickets,
}

impl LearnerService {
    /// Takes one group off the wire: the lease ticket, then the inbox (validation, dedup,
    /// staleness). The ack says what happened.
    pub fn offer(&self, g: RolloutGroup) -> RolloutAck {
        metrics::counter!("selfplay_learner_groups_received_total").increment(1);
        let unit_id = g.unit_id.clone();
        // Before anything else (even the duplicate check): a group for a unit leased to
        // another actor, or to nobody, is neither stored nor compared with anything.
        let lease = LeaseTickets::incarnation(&g.ticket).map(|incarnation| Lease {
            unit_id: &g.unit_id,
            epoch: g.epoch,
            incarnation,
            actor_id: &g.actor_id,
        });
        if !lease.is_some_and(|l| self.tickets.verify(&l, &g.ticket)) {
            metrics::counter!("selfplay_learner_groups_rejected_total", "reason" => "unleased").increment(1);
            LEARNER_SERVICE.count_denied(Role::Actor, "SubmitRollouts");
            tracing::warn!(unit = %unit_id, actor = %g.actor_id, "refused a group without a valid lease ticket for its unit and actor");
            let step = self.shared.inbox.lock().expect("inbox lock").version;
            return RolloutAck {
                unit_id,
                learner_step: step,
                reason: format!(
                    "no valid lease ticket: unit {:?} was not leased to actor {:?} in epoch {}",
                    g.unit_id, g.actor_id, g.epoch
                ),
                ..Default::default()
            };
        }
        let group: selfplay_game::RolloutGroup = g.into();
        let mut inbox = self.shared.inbox.lock().expect("inbox lock");
        let verdict = inbox.offer(group);
        let step = inbox.version;
        drop(inbox);
        let mut ack = RolloutAck { unit_id: unit_id.clone(), learner_step: step, ..Default::default() };
        match verdict {
            Verdict::Accepted => {
                metrics::counter!("selfplay_learner_groups_accepted_total").increment(1);
                self.shared.ready.notify_all();
                ack.accepted = true;
            }
            Verdict::Duplicate => {
                metrics::counter!("selfplay_learner_groups_rejected_total", "reason" => "duplicate").increment(1);
                ack.duplicate = true;
                ack.reason = format!("unit {unit_id} was already received");
            }
            Verdict::Rejected { reason, kind } => {
                metrics::counter!("selfplay_learner_groups_rejected_total", "reason" => kind.as_str()).increment(1);
                match kind {
                    // A group of an earlier learner epoch or too old a version is the normal
                    // aftermath of a restart or of asynchrony: its unit is played again.
                    RejectKind::Stale => tracing::info!(unit = %unit_id, %reason, "rollout group not taken (stale)"),
                    RejectKind::Invalid => tracing::warn!(unit = %unit_id, %reason, "rollout group rejected"),
                }
                ack.reason = reason;
            }
        }
        ack
    }
}

type AckStream = Pin<Box<dyn Stream<Item = Result<RolloutAck, Status>> + Send>>;

#[tonic::async_trait]
impl Learner for LearnerService {
    type SubmitRolloutsStream = AckStream;

    async fn submit_rollouts(
        &self,
        request: Request<Streaming<RolloutGroup>>,
    ) -> Result<Response<Self::SubmitRolloutsStream>, Status> {
        let mut inbound = request.into_inner();
        let this = self.clone();
        let out = async_stream_acks(move |tx| async move {
            while let Some(item) = inbound.next().await {
                let reply = match item {
                    // Validation takes locks and walks token ids: keep it off the reactor.
                    Ok(g) => {
                        let svc = this.clone();
                        tokio::task::spawn_blocking(move || svc.offer(g))
                            .await
                            .map_err(|e| Status::internal(e.to_string()))
                    }
                    Err(status) => Err(status),
                };
                let stop = reply.is_err();
                if tx.send(reply).await.is_err() || stop {
                    break;
                }
            }
        });
        Ok(Response::new(out))
    }

    async fn learner_status(
        &self,
        _request: Request<LearnerStatusRequest>,
    ) -> Result<Response<LearnerStatusResponse>, Status> {
        let inbox = self.shared.inbox.lock().expect("inbox lock");
        Ok(Response::new(LearnerStatusResponse {
            step: inbox.version,
            weights_version: inbox.version,
            groups_pending: inbox.pending_len() as u32,
            groups_accepted: inbox.accepted_total,
            groups_rejected: inbox.rejected_total,
        }))
    }
}

/// Runs `f` with a sender and returns the receiving side as a stream.
fn async_stream_acks<F, Fut>(f: F) -> AckStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<RolloutAck, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
