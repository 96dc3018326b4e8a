//! The remote reward: a `Reward` gRPC client usable as a [`RewardSource`], and the server
//! side (`selfplay reward-server`) that serves the built-in reward model.
use selfplay_game::reward::{RewardModel, RewardSource};
use selfplay_game::{GameError, Result};
use selfplay_policy::Policy;
use selfplay_proto::client::AuthChannel;
use selfplay_proto::v1::reward_client::RewardClient;
use selfplay_proto::v1::reward_server::Reward;
use selfplay_proto::v1::{ScorePair, ScoreRequest, ScoreResponse};
use std::sync::Mutex;
use tonic::{Request, Response, Status};

/// Scores pairs on a remote reward server. Blocking: call it from the actor's play thread.
pub struct RemoteReward {
    client: RewardClient<AuthChannel>,
    rt: tokio::runtime::Handle,
}

impl RemoteReward {
    pub fn new(client: RewardClient<AuthChannel>, rt: tokio::runtime::Handle) -> Self {
        RemoteReward { client, rt }
    }
}

impl RewardSource for RemoteReward {
    fn name(&self) -> &str {
        "remote"
    }
    fn score(&mut self, pairs: &[(String, String)], _reference: &Policy) -> Result<Vec<f64>> {
        let req = ScoreRequest {
            pairs: pairs.iter().map(|(q, a)| ScorePair { query: q.clone(), answer: a.clone() }).collect(),
        };
        let mut c = self.client.clone();
        let resp = self
            .rt
            .block_on(async move { c.score(req).await })
            .map_err(|s| GameError::Reward(format!("reward server: {}", s.message())))?
            .into_inner();
        if resp.scores.len() != pairs.len() {
            return Err(GameError::Reward(format!(
                "reward server returned {} scores for {} pairs",
                resp.scores.len(),
                pairs.len()
            )));
        }
        if let Some(s) = resp.scores.iter().find(|s| !s.is_finite()) {
            return Err(GameError::Reward(format!("reward server returned a non-finite score {s}")));
        }
        Ok(resp.scores.into_iter().map(f64::from).collect())
    }
}

/// Serves a reward model. The model is not `Sync`, so requests take turns on it.
pub struct RewardService {
    model: Mutex<RewardModel>,
    pub max_pairs: usize,
    /// The most bytes of one query or answer (the model truncates to its context anyway;
    /// this bounds what a request can make the server tokenize).
    pub max_text_bytes: usize,
}

impl RewardService {
    pub fn new(model: RewardModel) -> Self {
        RewardService { model: Mutex::new(model), max_pairs: 256, max_text_bytes: 256 * 1024 }
    }
}

#[tonic::async_trait]
impl Reward for RewardService {
    async fn score(&self, request: Request<ScoreRequest>) -> std::result::Result<Response<ScoreResponse>, Status> {
        let pairs: Vec<(String, String)> =
            request.into_inner().pairs.into_iter().map(|p| (p.query, p.answer)).collect();
        if pairs.len() > self.max_pairs {
            return Err(Status::invalid_argument(format!(
                "pairs: {} pairs, at most {} per request",
                pairs.len(),
                self.max_pairs
            )));
        }
        if let Some((i, (q, a))) =
            pairs.iter().enumerate().find(|(_, (q, a))| q.len() > self.max_text_bytes || a.len() > self.max_text_bytes)
        {
            return Err(Status::invalid_argument(format!(
                "pairs[{i}]: query of {} bytes, answer of {} bytes; at most {} each",
                q.len(),
                a.len(),
                self.max_text_bytes
            )));
        }
        // A panic while scoring (a kernel error, a bug) fails this request only: the model's
        // weights are not mutated by scoring, so the lock stays usable.
        let health = selfplay_proto::health::health();
        health.progress("reward", true);
        let scored = tokio::task::block_in_place(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.model.lock().unwrap_or_else(|p| p.into_inner()).score_pairs(&pairs)
            }))
        });
        health.progress("reward", false);
        let scores = match scored {
            Ok(r) => r.map_err(|e| Status::internal(e.to_string()))?,
            Err(_) => {
                metrics::counter!("selfplay_reward_panics_total").increment(1);
                tracing::error!("scoring panicked; the request fails, the server goes on");
                return Err(Status::internal("scoring failed (panic); see the reward server's log"));
            }
        };
        Ok(Response::new(ScoreResponse { scores: scores.into_iter().map(|s| s as f32).collect() }))
    }
}
