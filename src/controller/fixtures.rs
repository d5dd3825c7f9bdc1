//! Scenario tests without a server, in the manner of kube-rs/controller-rs `fixtures.rs`:
//! a [`Context`] (and its gateway) over a mock API server that checks every request a
//! reconcile or a handler makes, in order, and answers it; caches filled directly.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use kube::runtime::watcher;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

use crate::api::agent::AllowedPlans;
use crate::events::{EventQueue, QueuedEvent};
use crate::gateway::auth::{NodePolicy, TokenReviewer};
use crate::gateway::jobs::JobSigner;
use crate::gateway::limits::UnauthenticatedLimits;
use crate::gateway::{Gateway, GatewayConfig};

use super::caches::{Caches, TestWriters};
use super::context::{Context, Settings};
use super::metrics::Metrics;

pub const NAMESPACE: &str = "fleetpatch-system";
pub const KEY: &[u8] = b"test signing key";

/// The mock API server: each call takes the next request the code under test made.
pub struct ApiServer(Handle<Request<Body>, Response<Body>>);

impl ApiServer {
    /// Takes the next request, checks its method and path (and that its query contains
    /// `query`), answers `status` with `reply`, and returns the request's JSON body.
    pub async fn answer(&mut self, method: &str, path: &str, status: u16, reply: Value) -> Value {
        self.answer_query(method, path, "", status, reply).await
    }

    pub async fn answer_query(
        &mut self,
        method: &str,
        path: &str,
        query: &str,
        status: u16,
        reply: Value,
    ) -> Value {
        self.answer_with(method, path, query, status, |_| reply)
            .await
    }

    /// Like [`Self::answer_query`], with the reply made from the request's body (an
    /// apply answered with what it applied, say).
    pub async fn answer_with(
        &mut self,
        method: &str,
        path: &str,
        query: &str,
        status: u16,
        reply: impl FnOnce(&Value) -> Value,
    ) -> Value {
        let (request, send) = tokio::time::timeout(Duration::from_secs(5), self.0.next_request())
            .await
            .unwrap_or_else(|_| panic!("expected {method} {path}, but no request came"))
            .expect("the client is gone");
        let shown = format!("{} {}", request.method(), request.uri());
        assert_eq!(request.method().as_str(), method, "{shown}");
        assert_eq!(request.uri().path(), path, "{shown}");
        assert!(
            request.uri().query().unwrap_or_default().contains(query),
            "{shown}: no {query:?} in the query"
        );
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        send.send_response(
            Response::builder()
                .status(status)
                .header("Content-Type", "application/json")
                .body(Body::from(serde_json::to_vec(&reply(&body)).unwrap()))
                .unwrap(),
        );
        body
    }

    /// Asserts that nothing more is asked.
    pub async fn done(mut self) {
        if let Ok(Some((request, _))) =
            tokio::time::timeout(Duration::from_millis(50), self.0.next_request()).await
        {
            panic!("unexpected {} {}", request.method(), request.uri());
        }
    }
}

/// A TokenReviewer that answers from a table (token → status).
pub struct FakeReviewer(
    pub  Vec<(
        String,
        k8s_openapi::api::authentication::v1::TokenReviewStatus,
    )>,
);

impl TokenReviewer for FakeReviewer {
    fn review<'a>(
        &'a self,
        token: &'a str,
        _audience: &'a str,
    ) -> futures::future::BoxFuture<
        'a,
        Result<k8s_openapi::api::authentication::v1::TokenReviewStatus, kube::Error>,
    > {
        let status = self
            .0
            .iter()
            .find(|(t, _)| t == token)
            .map(|(_, s)| s.clone())
            .unwrap_or_default();
        Box::pin(async move { Ok(status) })
    }
}

/// A controller's world without a server.
pub struct Fixture {
    pub ctx: Arc<Context>,
    pub server: ApiServer,
    pub writers: TestWriters,
    /// Events the gateway queued (no task records them here).
    pub queued_events: tokio::sync::mpsc::Receiver<QueuedEvent>,
}

impl Fixture {
    /// Its parts, in one line: context, API server, cache writers and the Event queue.
    pub fn into_parts(
        self,
    ) -> (
        Arc<Context>,
        ApiServer,
        TestWriters,
        tokio::sync::mpsc::Receiver<QueuedEvent>,
    ) {
        (self.ctx, self.server, self.writers, self.queued_events)
    }
}

/// The next Event queued (within 5 s), as the API would see its reason, type and note.
pub async fn next_event(queued: &mut tokio::sync::mpsc::Receiver<QueuedEvent>) -> Value {
    let queued = tokio::time::timeout(Duration::from_secs(5), queued.recv())
        .await
        .expect("an Event is queued")
        .expect("the queue is open");
    json!({
        "reason": queued.event.reason,
        "type": format!("{:?}", queued.event.type_),
        "note": queued.event.note,
        "regarding": {"kind": queued.regarding.kind, "name": queued.regarding.name, "namespace": queued.regarding.namespace},
    })
}

impl Fixture {
    /// Reasons of the Events queued so far, in order.
    pub fn queued_reasons(&mut self) -> Vec<String> {
        let mut reasons = Vec::new();
        while let Ok(queued) = self.queued_events.try_recv() {
            reasons.push(queued.event.reason);
        }
        reasons
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

impl Fixture {
    pub fn new() -> Self {
        Self::with_reviewer(FakeReviewer(vec![]))
    }

    pub fn with_reviewer(reviewer: FakeReviewer) -> Self {
        Self::build(reviewer, Duration::from_millis(200))
    }

    /// A fixture whose gateway holds long-polls up to `max_wait`.
    pub fn with_max_wait(max_wait: Duration) -> Self {
        Self::build(FakeReviewer(vec![]), max_wait)
    }

    fn build(reviewer: FakeReviewer, max_wait: Duration) -> Self {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let (caches, writers) = Caches::for_tests();
        let signer = JobSigner::new(KEY);
        let (events, queued_events) = EventQueue::new(64);
        let gateway = Gateway::new(
            client.clone(),
            GatewayConfig {
                namespace: NAMESPACE.into(),
                node_policy: NodePolicy {
                    audience: "fleetpatch-gateway".into(),
                    username: format!("system:serviceaccount:{NAMESPACE}:fleetpatch-node-agent"),
                },
                node_agent_plans: AllowedPlans::all(),
                max_wait,
                write_interval: Duration::from_secs(1),
                write_concurrency: 4,
                unauthenticated: UnauthenticatedLimits::default(),
            },
            caches.for_gateway(),
            Box::new(reviewer),
            signer.clone(),
            caches.job_signals.clone(),
            Arc::default(),
            events,
        );
        let ctx = Arc::new(Context {
            eviction_client: client.clone(),
            client,
            caches,
            settings: Settings {
                namespace: NAMESPACE.into(),
                limits: Default::default(),
                job_ttl: Duration::from_secs(3600),
                heartbeat_timeout: Duration::from_secs(45),
                default_job_deadline: Duration::from_secs(3600),
                max_node_reboots: 1,
                workers: 4,
            },
            metrics: Arc::new(Metrics::new()),
            gateway,
            signer,
            drain_lock: tokio::sync::Mutex::new(()),
        });
        Self {
            ctx,
            server: ApiServer(handle),
            writers,
            queued_events,
        }
    }
}

/// Puts `object` into a cache through its writer.
pub fn cache<K>(writer: &mut kube::runtime::reflector::store::Writer<K>, object: K)
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    writer.apply_watcher_event(&watcher::Event::Apply(object));
}

/// Metadata of a stored object: namespace (if any), uid, resourceVersion, generation 1.
pub fn stored(name: &str, namespace: Option<&str>) -> kube::api::ObjectMeta {
    kube::api::ObjectMeta {
        name: Some(name.into()),
        namespace: namespace.map(String::from),
        uid: Some(format!("uid-{name}")),
        resource_version: Some("7".into()),
        generation: Some(1),
        creation_timestamp: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        )),
        ..Default::default()
    }
}
