//! Who may call what: every selfplay service sits behind a [`RoleGuard`], which finds the
//! caller's role from its bearer token ([`Verifier`]) and lets the call through only when the
//! service's [`Policy`] allows that role that RPC. A missing or unknown token gets
//! `UNAUTHENTICATED` (counted in `selfplay_rpc_rejected_total`); a known token calling outside
//! its role gets `PERMISSION_DENIED`, counted in the service's `*_permission_denied_total`
//! by `role` and `rpc`. Unknown methods are denied too (deny by default).
//!
//! The guard hands the service a [`Caller`] in the request's extensions: the role and the
//! client's instance id ([`INSTANCE_HEADER`]), which the coordinator binds actor ids to.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::Status;

use crate::auth::{Role, Verifier, AUTHORIZATION, INSTANCE_HEADER, MAX_INSTANCE_BYTES, REJECTED_METRIC};

/// Which roles may call which RPC of one service.
#[derive(Debug)]
pub struct Policy {
    /// The server's name in logs and in `selfplay_rpc_rejected_total{role}`.
    pub server: &'static str,
    /// Counter of calls outside the caller's role, labelled `role` and `rpc`.
    pub denied_metric: &'static str,
    /// (method, roles allowed). A method not listed is denied to everyone.
    pub rules: &'static [(&'static str, &'static [Role])],
}

const ACTOR: &[Role] = &[Role::Actor];
const LEARNER: &[Role] = &[Role::Learner];

/// `selfplay.v1.Coordinator`: actors do their work, the learner drives steps and weights,
/// operators read status (the learner reads it too: it checks the stored weights' epoch).
pub static COORDINATOR: Policy = Policy {
    server: "coordinator",
    denied_metric: "selfplay_coordinator_permission_denied_total",
    rules: &[
        ("Join", ACTOR),
        ("Heartbeat", ACTOR),
        ("Leave", ACTOR),
        ("LeaseWork", ACTOR),
        ("CompleteWork", ACTOR),
        ("FetchWeights", ACTOR),
        ("OpenStep", LEARNER),
        ("PublishWeights", LEARNER),
        ("BeginEpoch", LEARNER),
        ("Status", &[Role::Operator, Role::Learner]),
    ],
};

/// `selfplay.v1.Learner`: actors submit rollouts; operators read its status.
pub static LEARNER_SERVICE: Policy = Policy {
    server: "learner",
    denied_metric: "selfplay_learner_permission_denied_total",
    rules: &[("SubmitRollouts", ACTOR), ("LearnerStatus", &[Role::Operator])],
};

/// `selfplay.v1.Reward`: reward clients score.
pub static REWARD: Policy = Policy {
    server: "reward",
    denied_metric: "selfplay_reward_permission_denied_total",
    rules: &[("Score", &[Role::RewardClient])],
};

impl Policy {
    /// The roles allowed `method`, `None` for a method the policy does not know.
    pub fn allowed(&self, method: &str) -> Option<&'static [Role]> {
        self.rules.iter().find(|(m, _)| *m == method).map(|(_, r)| *r)
    }

    /// `method` as a metric label: the policy's own string, or `unknown` (a label never takes
    /// a caller-chosen value).
    pub fn rpc_label(&self, method: &str) -> &'static str {
        self.rules.iter().find(|(m, _)| *m == method).map(|(m, _)| *m).unwrap_or("unknown")
    }

    /// Counts one call of `role` refused on `rpc` (also used by services for calls that touch
    /// another actor's lease).
    pub fn count_denied(&self, role: Role, rpc: &str) {
        metrics::counter!(self.denied_metric, "role" => role.as_str(), "rpc" => self.rpc_label(rpc)).increment(1);
    }

    /// Registers the counters at 0 for every role and RPC that can be refused, so that they
    /// exist (and rate() works) before the first refusal.
    pub fn register_metrics(&self, roles: impl Iterator<Item = Role>) {
        metrics::counter!(REJECTED_METRIC, "role" => self.server, "reason" => "unauthenticated").increment(0);
        for role in roles {
            for (rpc, allowed) in self.rules {
                if !allowed.contains(&role) {
                    metrics::counter!(self.denied_metric, "role" => role.as_str(), "rpc" => *rpc).increment(0);
                }
            }
        }
    }

    /// Registers the description of [`denied_metric`](Self::denied_metric).
    pub fn describe_metrics(&self) {
        metrics::describe_counter!(
            self.denied_metric,
            metrics::Unit::Count,
            "Calls refused with PERMISSION_DENIED, by the caller's role and the rpc: outside the role, or on another actor's lease"
        );
    }
}

/// The authenticated caller, in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub role: Role,
    /// The client's [`INSTANCE_HEADER`], when it sent a usable one.
    pub instance: Option<String>,
}

impl Caller {
    /// The caller of a request that passed a [`RoleGuard`].
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&Caller> {
        request.extensions().get::<Caller>()
    }
}

/// A service behind the role check. See the module docs.
#[derive(Clone)]
pub struct RoleGuard<S> {
    inner: S,
    verifier: Verifier,
    policy: &'static Policy,
}

impl<S> RoleGuard<S> {
    pub fn new(inner: S, verifier: Verifier, policy: &'static Policy) -> Self {
        policy.register_metrics(verifier.roles());
        Self { inner, verifier, policy }
    }

    /// The caller, or the status that refuses the request.
    fn decide<B>(&self, req: &http::Request<B>) -> Result<Caller, Status> {
        let method = req.uri().path().rsplit('/').next().unwrap_or("");
        let peer = || {
            use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
            let ext = req.extensions();
            ext.get::<TcpConnectInfo>()
                .and_then(|i| i.remote_addr())
                .or_else(|| ext.get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|i| i.get_ref().remote_addr()))
                .map(|a| a.to_string())
                .unwrap_or_else(|| "unknown".into())
        };
        let role = match self.verifier.identify_header(req.headers().get(AUTHORIZATION).map(|v| v.as_bytes())) {
            Ok(role) => role,
            Err(why) => {
                tracing::warn!(server = self.policy.server, peer = %peer(), reason = why, rpc = self.policy.rpc_label(method), "rejected an unauthenticated RPC");
                metrics::counter!(REJECTED_METRIC, "role" => self.policy.server, "reason" => "unauthenticated")
                    .increment(1);
                return Err(Status::unauthenticated(
                    "a valid bearer token is required (authorization: Bearer <token>)",
                ));
            }
        };
        if !self.policy.allowed(method).is_some_and(|roles| roles.contains(&role)) {
            tracing::warn!(server = self.policy.server, peer = %peer(), %role, rpc = self.policy.rpc_label(method), "refused an RPC outside the caller's role");
            self.policy.count_denied(role, method);
            return Err(Status::permission_denied(format!(
                "the {role} credential may not call {}.{}",
                self.policy.server,
                self.policy.rpc_label(method)
            )));
        }
        let instance = req
            .headers()
            .get(INSTANCE_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|s| !s.is_empty() && s.len() <= MAX_INSTANCE_BYTES)
            .map(str::to_string);
        Ok(Caller { role, instance })
    }
}

impl<S: NamedService> NamedService for RoleGuard<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send>>;

impl<S, B> tonic::codegen::Service<http::Request<B>> for RoleGuard<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<http::Response<Body>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        match self.decide(&req) {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                Box::pin(self.inner.call(req))
            }
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{BearerToken, Credential};
    use std::sync::Arc;

    /// A service that answers OK with the caller's role in a header.
    #[derive(Clone)]
    struct Echo;

    impl tonic::codegen::Service<http::Request<()>> for Echo {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = BoxFuture<http::Response<Body>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: http::Request<()>) -> Self::Future {
            let caller = req.extensions().get::<Caller>().cloned();
            Box::pin(async move {
                let mut r = http::Response::new(Body::empty());
                r.headers_mut().insert("x-role", caller.unwrap().role.as_str().parse().unwrap());
                Ok(r)
            })
        }
    }

    fn request(method: &str, token: Option<&str>) -> http::Request<()> {
        let mut b = http::Request::builder().uri(format!("http://x/selfplay.v1.Coordinator/{method}"));
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.header(INSTANCE_HEADER, "abc").body(()).unwrap()
    }

    fn grpc_status(r: &http::Response<Body>) -> tonic::Code {
        r.headers().get("grpc-status").map(|v| tonic::Code::from_bytes(v.as_bytes())).unwrap_or(tonic::Code::Ok)
    }

    fn call(guard: &mut RoleGuard<Echo>, req: http::Request<()>) -> http::Response<Body> {
        use tonic::codegen::Service;
        futures_executor(guard.call(req)).unwrap_or_else(|e| match e {})
    }

    fn futures_executor<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    fn guard() -> RoleGuard<Echo> {
        let v = Verifier::new()
            .with(Role::Learner, BearerToken::new("L").unwrap().into())
            .with(Role::Actor, BearerToken::new("A").unwrap().into())
            .with(Role::Operator, BearerToken::new("O").unwrap().into())
            .with(Role::RewardClient, Credential::from(BearerToken::new("R").unwrap()));
        RoleGuard::new(Echo, v, &COORDINATOR)
    }

    #[test]
    fn each_role_reaches_exactly_its_rpcs() {
        let mut g = guard();
        for (token, role) in
            [("L", Role::Learner), ("A", Role::Actor), ("O", Role::Operator), ("R", Role::RewardClient)]
        {
            for (method, allowed) in COORDINATOR.rules {
                let r = call(&mut g, request(method, Some(token)));
                if allowed.contains(&role) {
                    assert_eq!(grpc_status(&r), tonic::Code::Ok, "{role} {method}");
                    assert_eq!(r.headers()["x-role"], role.as_str());
                } else {
                    assert_eq!(grpc_status(&r), tonic::Code::PermissionDenied, "{role} {method}");
                }
            }
            let r = call(&mut g, request("NoSuchRpc", Some(token)));
            assert_eq!(grpc_status(&r), tonic::Code::PermissionDenied, "unknown methods are denied");
        }
        for bad in [None, Some("nope")] {
            assert_eq!(grpc_status(&call(&mut g, request("Status", bad))), tonic::Code::Unauthenticated);
        }
    }

    /// A recorder that writes down every counter increment as `name{label=value,...} +n`.
    #[derive(Clone, Default)]
    struct Capture(Arc<std::sync::Mutex<Vec<String>>>);

    struct CaptureCounter(String, Capture);

    impl metrics::CounterFn for CaptureCounter {
        fn increment(&self, n: u64) {
            if n > 0 {
                self.1 .0.lock().unwrap().push(format!("{} +{n}", self.0));
            }
        }
        fn absolute(&self, _: u64) {}
    }

    impl metrics::Recorder for Capture {
        fn describe_counter(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
        fn describe_gauge(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
        fn describe_histogram(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
        fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
            let labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
            let name = format!("{}{{{}}}", key.name(), labels.join(","));
            metrics::Counter::from_arc(Arc::new(CaptureCounter(name, self.clone())))
        }
        fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
            metrics::Gauge::noop()
        }
        fn register_histogram(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Histogram {
            metrics::Histogram::noop()
        }
    }

    #[test]
    fn refusals_are_counted_by_role_and_rpc() {
        let capture = Capture::default();
        let mut g = guard();
        metrics::with_local_recorder(&capture, || {
            call(&mut g, request("Status", Some("O")));
            call(&mut g, request("PublishWeights", Some("A")));
            call(&mut g, request("OpenStep", Some("O")));
            call(&mut g, request("../../weird{label}", Some("A")));
            call(&mut g, request("Status", None));
        });
        let seen = capture.0.lock().unwrap().clone();
        assert_eq!(
            seen,
            [
                "selfplay_coordinator_permission_denied_total{role=actor,rpc=PublishWeights} +1",
                "selfplay_coordinator_permission_denied_total{role=operator,rpc=OpenStep} +1",
                "selfplay_coordinator_permission_denied_total{role=actor,rpc=unknown} +1",
                "selfplay_rpc_rejected_total{role=coordinator,reason=unauthenticated} +1",
            ]
        );
    }

    #[test]
    fn the_instance_id_reaches_the_service_when_usable() {
        let g = guard();
        let caller = g.decide(&request("Join", Some("A"))).unwrap();
        assert_eq!(caller, Caller { role: Role::Actor, instance: Some("abc".into()) });
        let mut long = request("Join", Some("A"));
        long.headers_mut().insert(INSTANCE_HEADER, "x".repeat(MAX_INSTANCE_BYTES + 1).parse().unwrap());
        assert_eq!(g.decide(&long).unwrap().instance, None);
    }
}
