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
}

impl RewardService {
    pub fn new(model: RewardModel) -> Self {
        RewardService { model: Mutex::new(model), max_pairs: 256 }
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
        let scores = tokio::task::block_in_place(|| self.model.lock().expect("model lock").score_pairs(&pairs))
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(ScoreResponse { scores: scores.into_iter().map(|s| s as f32).collect() }))
    }
}
