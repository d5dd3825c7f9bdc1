//! Every gateway handler over a mock API server: the answers a caller gets, and the
//! exact requests (often none) the gateway makes for it.

use std::net::SocketAddr;

use axum::body::Body as HttpBody;
use axum::http::{Request, StatusCode};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::api::agent::Agent;
use crate::api::patchjob::PatchJob;
use crate::controller::fixtures::{ApiServer, Fixture, NAMESPACE, cache, stored};

use super::credentials;
use super::jobs::SIGNATURE_ANNOTATION;
use super::progress::strip_for_cache;

const BEARER: &str = "Bearer web-1.s3cret";

fn typed<K: serde::de::DeserializeOwned>(value: Value) -> K {
    serde_json::from_value(value).unwrap()
}

/// An external host the caches know, with its credential.
fn known_host(fixture: &mut Fixture) {
    let mut agent: Agent = typed(
        json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "Agent",
        "metadata": {"name": "web-1"}, "spec": {"mode": "External", "os": "Linux", "allowedPlans": {"namespaces": {"from": "All"}}}}),
    );
    agent.metadata = stored("web-1", None);
    cache(&mut fixture.writers.agents, agent);
    let secret = Secret {
        metadata: stored("fleetpatch-agent-web-1", Some(NAMESPACE)),
        data: Some(
            [(
                credentials::CREDENTIAL_HASH_KEY.to_string(),
                ByteString(credentials::hash("s3cret").into_bytes()),
            )]
            .into(),
        ),
        ..Default::default()
    };
    cache(&mut fixture.writers.credentials, secret);
}

/// A signed job of web-1, as the API holds it (with its script body).
fn full_job(fixture: &Fixture) -> PatchJob {
    let mut job: PatchJob = typed(
        json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "PatchJob",
        "metadata": {"name": "weekly-m1-web-1"},
        "spec": {"agent": "web-1", "plan": "weekly", "run": "m1", "os": "Linux",
                 "preActions": [{"name": "hello", "task": {"name": "hello"}, "type": "RunScript", "timeoutMinutes": 1, "successExitCodes": [0],
                                 "script": {"source": {"name": "hello"}, "language": "Bash", "content": "echo hi",
                                            "sha256": crate::api::resolve::content_sha256("echo hi")}}]}}),
    );
    job.metadata = stored("weekly-m1-web-1", Some("team"));
    let signature = fixture
        .ctx
        .signer
        .sign("team", "weekly-m1-web-1", &job.spec);
    job.metadata.annotations = Some([(SIGNATURE_ANNOTATION.to_string(), signature)].into());
    job
}

/// The job as the cache keeps it (no bodies), indexed for its agent.
fn cached_job(fixture: &mut Fixture, job: &PatchJob) {
    let mut stripped = job.clone();
    strip_for_cache(&mut stripped);
    cache(&mut fixture.writers.jobs, stripped.clone());
    fixture.ctx.caches.job_signals.observe(&stripped);
}

async fn call(
    gateway: &std::sync::Arc<super::Gateway>,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Value,
) -> (StatusCode, Value) {
    let headers: Vec<(&str, &str)> = bearer.map(|b| ("Authorization", b)).into_iter().collect();
    call_with(gateway, method, path, &headers, body).await
}

async fn call_with(
    gateway: &std::sync::Arc<super::Gateway>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> (StatusCode, Value) {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("Content-Type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut request = request
        .body(HttpBody::from(serde_json::to_vec(&body).unwrap()))
        .unwrap();
    request
        .extensions_mut()
        .insert(axum::extract::ConnectInfo(SocketAddr::from((
            [192, 0, 2, 1],
            40000,
        ))));
    // A handler that asked the API something nobody answers would wait: it must not.
    let response = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        gateway.router().oneshot(request),
    )
    .await
    .expect("the handler is waiting for an API answer")
    .unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn registration_creates_the_agent_and_its_credential_and_only_then_spends_the_token() {
    let mut fixture = Fixture::new();
    cache_one_time_token(&mut fixture);
    let request = json!({"name": "web-1", "os": "Linux", "bootstrapToken": "only-once"});
    let mut answer = register_in_background(&fixture, request);
    let server = &mut fixture.server;
    let (agent, stored_credential, spent) = answer_registration(server, "web-1", "once").await;
    assert_eq!(agent["spec"]["mode"], "External");
    assert_eq!(
        spent["metadata"]["resourceVersion"], "7",
        "spent over the version read"
    );
    assert_eq!(
        spent["metadata"]["annotations"][credentials::USED_BY_ANNOTATION],
        "web-1"
    );
    // The answer waits until this replica's watches show the Agent and the credential,
    // or the host's first request would be refused.
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(300), &mut answer)
            .await
            .is_err(),
        "answered before the caches held the registration"
    );
    cache_registration(&mut fixture, "web-1", agent, stored_credential.clone());
    let (status, body) = answer.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    let credential = body["credential"].as_str().unwrap();
    assert_eq!(
        stored_credential["data"][credentials::CREDENTIAL_HASH_KEY],
        json!(base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            credentials::hash(credential)
        )),
        "only the hash is stored"
    );
    fixture.server.done().await;
}

#[tokio::test]
async fn refused_registrations_cost_no_api_request() {
    let mut fixture = Fixture::new();
    known_host(&mut fixture);
    let token = multi_use_token("multi", &[]);
    cache(&mut fixture.writers.tokens, token);
    let register =
        |name: &str, token: &str| json!({"name": name, "os": "Linux", "bootstrapToken": token});
    let (status, _) = call(
        &fixture.ctx.gateway,
        "POST",
        "/agent/v1/register",
        None,
        register("web-1", "t"),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "an existing agent is never replaced"
    );
    let (status, body) = call(
        &fixture.ctx.gateway,
        "POST",
        "/agent/v1/register",
        None,
        register("web-2", "guess"),
    )
    .await;
    assert_eq!(
        (status, body),
        (StatusCode::UNAUTHORIZED, json!({"error": "unauthorized"}))
    );
    let (status, _) = call(
        &fixture.ctx.gateway,
        "POST",
        "/agent/v1/register",
        None,
        register(&"a".repeat(64), "t"),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    fixture.server.done().await;
}

#[tokio::test]
async fn a_heartbeat_costs_nothing_and_names_the_deleted_job_to_stop() {
    let mut fixture = Fixture::new();
    known_host(&mut fixture);
    let mut job = full_job(&fixture);
    job.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
    cached_job(&mut fixture, &job);
    let (status, answer) = call(
        &fixture.ctx.gateway,
        "POST",
        "/agent/v1/heartbeat",
        Some(BEARER),
        json!({"version": "1"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["cancel"], json!(["uid-weekly-m1-web-1"]));
    assert!(fixture.ctx.gateway.heartbeats.lock().contains_key("web-1"));
    let (status, _) = call(
        &fixture.ctx.gateway,
        "POST",
        "/agent/v1/heartbeat",
        Some("Bearer web-1.wrong"),
        json!({"version": "1"}),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    fixture.server.done().await;
}

#[tokio::test]
async fn an_assignment_fetches_the_full_job_once_and_hands_out_its_scripts() {
    let mut fixture = Fixture::new();
    known_host(&mut fixture);
    let job = full_job(&fixture);
    cached_job(&mut fixture, &job);
    let gateway = fixture.ctx.gateway.clone();
    let asked = tokio::spawn(async move {
        call(
            &gateway,
            "GET",
            "/agent/v1/assignments",
            Some(BEARER),
            Value::Null,
        )
        .await
    });
    fixture
        .server
        .answer(
            "GET",
            "/apis/fleetpatch.io/v1alpha1/namespaces/team/patchjobs/weekly-m1-web-1",
            200,
            serde_json::to_value(&job).unwrap(),
        )
        .await;
    let (status, body) = asked.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    let script = &body["jobs"][0]["spec"]["preActions"][0]["script"];
    assert_eq!(
        script["content"],
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "echo hi")
    );
    // Asked again: from what it fetched, no second read.
    let (status, body) = get_as_host(&fixture, "/agent/v1/assignments").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(
        fixture.queued_reasons(),
        ["Assigned"],
        "the hand-out is told once, however often the agent asks"
    );
    fixture.server.done().await;
}

#[tokio::test]
async fn a_report_is_checked_and_written_over_the_version_it_was_checked_against() {
    let mut fixture = Fixture::new();
    known_host(&mut fixture);
    let job = full_job(&fixture);
    cached_job(&mut fixture, &job);
    let path = "/agent/v1/jobs/uid-weekly-m1-web-1/progress";
    let (status, _) = call(
        &fixture.ctx.gateway,
        "POST",
        path,
        Some(BEARER),
        json!({"sequence": 1, "status": {"phase": "Unknown"}}),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "a phase only the controller sets"
    );
    let (status, ack) = call(&fixture.ctx.gateway, "POST", path, Some(BEARER),
        json!({"sequence": 2, "status": {"phase": "Succeeded", "preActions": [{"name": "hello", "phase": "Succeeded", "exitCode": 0}]}})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        ack["acknowledgedSequence"], 0,
        "nothing acknowledged before it is written"
    );
    assert!(
        fixture.queued_reasons().is_empty(),
        "nothing is told before it is written"
    );
    let gateway = fixture.ctx.gateway.clone();
    let flush = tokio::spawn(async move { gateway.flush().await });
    let written = fixture
        .server
        .answer("PATCH", "/apis/fleetpatch.io/v1alpha1/namespaces/team/patchjobs/weekly-m1-web-1/status", 200,
            json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "PatchJob", "metadata": {"name": "weekly-m1-web-1", "resourceVersion": "8"}, "spec": {"agent": "web-1", "os": "Linux"}}))
        .await;
    flush.await.unwrap();
    assert_eq!(written["metadata"]["resourceVersion"], "7");
    assert_eq!(written["status"]["phase"], "Succeeded");
    assert_eq!(written["status"]["lastSequence"], 2);
    assert!(
        written["status"]["completionTime"].is_string(),
        "the gateway stamps it"
    );
    assert_eq!(
        fixture.queued_reasons(),
        ["Started", "Succeeded"],
        "the written transitions are told, in order, without a request of their own"
    );
    let (_, ack) = call(
        &fixture.ctx.gateway,
        "POST",
        path,
        Some(BEARER),
        json!({"sequence": 2, "status": {"phase": "Succeeded"}}),
    )
    .await;
    assert_eq!(ack["acknowledgedSequence"], 2);
    fixture.server.done().await;
}

#[tokio::test]
async fn an_external_host_may_reboot_for_its_own_running_job_and_a_stranger_may_not_ask() {
    let mut fixture = Fixture::new();
    known_host(&mut fixture);
    let job = full_job(&fixture);
    cached_job(&mut fixture, &job);
    let path = "/agent/v1/jobs/uid-weekly-m1-web-1/reboot";
    let (status, decision) =
        call(&fixture.ctx.gateway, "GET", path, Some(BEARER), Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(decision["verdict"], "Approved");
    let (status, _) = call(&fixture.ctx.gateway, "GET", path, None, Value::Null).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    fixture.server.done().await;
}

/// The final write lands before the cache hears of it: in that moment the job must
/// neither be handed out again (the agent has just forgotten it, and would run it anew)
/// nor take a later report that would set it back to Running.
#[tokio::test]
async fn a_job_is_over_once_its_final_report_is_written_whatever_the_cache_says() {
    let mut fixture = Fixture::new();
    known_host(&mut fixture);
    let job = full_job(&fixture);
    cached_job(&mut fixture, &job);
    let path = "/agent/v1/jobs/uid-weekly-m1-web-1/progress";
    let (status, _) = call(&fixture.ctx.gateway, "POST", path, Some(BEARER),
        json!({"sequence": 2, "status": {"phase": "Succeeded", "preActions": [{"name": "hello", "phase": "Succeeded", "exitCode": 0}]}})).await;
    assert_eq!(status, StatusCode::OK);
    let gateway = fixture.ctx.gateway.clone();
    let flush = tokio::spawn(async move { gateway.flush().await });
    fixture
        .server
        .answer("PATCH", "/apis/fleetpatch.io/v1alpha1/namespaces/team/patchjobs/weekly-m1-web-1/status", 200,
            json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "PatchJob", "metadata": {"name": "weekly-m1-web-1", "resourceVersion": "8"}, "spec": {"agent": "web-1", "os": "Linux"}}))
        .await;
    flush.await.unwrap();
    // The cache still has the job unfinished.
    let (status, body) = get_as_host(&fixture, "/agent/v1/assignments?waitSeconds=0").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["jobs"],
        json!([]),
        "a finished job is not handed out again"
    );
    let (status, body) = call(
        &fixture.ctx.gateway,
        "POST",
        path,
        Some(BEARER),
        json!({"sequence": 3, "status": {"phase": "Running", "preActions": [{"name": "hello", "phase": "Running"}]}}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    fixture.ctx.gateway.flush().await;
    fixture.server.done().await;
}

/// A node agent's job carries an "Approved" its plan's author wrote by hand: the
/// gateway asks the Node, which records no drain, so the agent waits; once the Node
/// records the drain for this job, the reboot is approved.
/// Caches a signed job of node-a's agent that waits to reboot and whose annotations
/// approve the reboot — as its plan's author may write them by hand.
fn self_approved_node_job(fixture: &mut Fixture) {
    let mut job = full_job(fixture);
    job.metadata = stored("weekly-m1-node-a", Some("team"));
    job.spec.agent = "node-a".into();
    job.spec.node = Some("node-a".into());
    let signature = fixture
        .ctx
        .signer
        .sign("team", "weekly-m1-node-a", &job.spec);
    job.metadata.annotations = Some(
        [
            (SIGNATURE_ANNOTATION.to_string(), signature),
            (
                crate::api::common::REBOOT_DECISION_ANNOTATION.to_string(),
                "Approved".to_string(),
            ),
        ]
        .into(),
    );
    job.status = Some(typed(
        json!({"phase": "Running", "reboot": {"state": "Pending"}}),
    ));
    cached_job(fixture, &job);
}

/// Node node-a's agent: its token reviews as the node agent bound to node-a, and its
/// Agent is cached (admitting plans from the namespaces in `allowed`).
fn node_agent_fixture(allowed: Value) -> Fixture {
    let review = node_a_review();
    let mut fixture = Fixture::with_reviewer(crate::controller::fixtures::FakeReviewer(vec![(
        "node-token".into(),
        review,
    )]));
    let mut agent: Agent = typed(
        json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "Agent",
        "metadata": {"name": "node-a"}, "spec": {"mode": "Node", "os": "Linux", "nodeName": "node-a",
        "allowedPlans": allowed}}),
    );
    agent.metadata = stored("node-a", None);
    agent.metadata.labels = Some([("kubernetes.io/os".to_string(), "linux".to_string())].into());
    cache(&mut fixture.writers.agents, agent);
    fixture
}

const NODE_HEADERS: [(&str, &str); 2] = [
    ("Authorization", "Bearer node-token"),
    (super::auth::NODE_HEADER, "node-a"),
];

/// A node agent announces itself at every start. When its Agent already says what it
/// announces, that costs no write — and never puts back the chart's allowedPlans over
/// what an admin set on the Agent since.
#[tokio::test]
async fn a_node_agent_announcing_itself_again_writes_nothing() {
    let fixture = node_agent_fixture(
        json!({"namespaces": {"from": "Selector", "selector": {"matchLabels": {"patching": "ok"}}}}),
    );
    let (status, body) = call_with(
        &fixture.ctx.gateway,
        "POST",
        "/agent/v1/register",
        &NODE_HEADERS,
        json!({"name": "node-a", "os": "Linux"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["agent"], "node-a");
    fixture.server.done().await;
}

/// A node agent's job carries an "Approved" its plan's author wrote by hand: the
/// gateway asks the Node, which records no drain, so the agent waits; once the Node
/// records the drain for this job, the reboot is approved.
#[tokio::test]
async fn a_node_reboot_is_approved_only_when_the_node_records_the_drain() {
    let mut fixture = node_agent_fixture(json!({"namespaces": {"from": "All"}}));
    self_approved_node_job(&mut fixture);
    let path = "/agent/v1/jobs/uid-weekly-m1-node-a/reboot?waitSeconds=0";
    let ask = |fixture: &Fixture| {
        let gateway = fixture.ctx.gateway.clone();
        tokio::spawn(
            async move { call_with(&gateway, "GET", path, &NODE_HEADERS, Value::Null).await },
        )
    };
    let asked = ask(&fixture);
    fixture
        .server
        .answer(
            "GET",
            "/api/v1/nodes/node-a",
            200,
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}}),
        )
        .await;
    let (status, decision) = asked.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{decision}");
    assert_eq!(
        decision["verdict"], "Waiting",
        "the job's own word is not enough"
    );
    let asked = ask(&fixture);
    fixture
        .server
        .answer("GET", "/api/v1/nodes/node-a", 200,
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "annotations": {
                "fleetpatch.io/drain-for": "team/weekly-m1-node-a",
                "fleetpatch.io/drain-approved": k8s_openapi::jiff::Timestamp::now().to_string()}}}))
        .await;
    let (_, decision) = asked.await.unwrap();
    assert_eq!(decision["verdict"], "Approved");
    fixture.server.done().await;
}

/// A signed job past its deadline — say, a copy of an old job recreated under its name
/// by someone who may write PatchJobs — is handed out to nobody.
#[tokio::test]
async fn a_job_past_its_deadline_is_not_handed_out() {
    let mut fixture = Fixture::new();
    known_host(&mut fixture);
    let mut job = full_job(&fixture);
    job.spec.deadline = Some(Time(
        k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_mins(1),
    ));
    let signature = fixture
        .ctx
        .signer
        .sign("team", "weekly-m1-web-1", &job.spec);
    job.metadata.annotations = Some([(SIGNATURE_ANNOTATION.to_string(), signature)].into());
    cached_job(&mut fixture, &job);
    let (status, body) = get_as_host(&fixture, "/agent/v1/assignments?waitSeconds=0").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["jobs"], json!([]));
    fixture.server.done().await;
}

/// An agent with a valid credential reports about jobs the cache does not know: each
/// costs a GET, but only within the agent's read budget; past it, 429 and no request.
#[tokio::test]
async fn reports_about_unknown_jobs_cost_reads_only_within_a_budget() {
    let mut fixture = Fixture::new();
    known_host(&mut fixture);
    let report = |i: usize| {
        json!({"sequence": 1, "status": {"phase": "Running"},
               "job": {"namespace": "team", "name": format!("made-up-{i}")}})
    };
    let mut reads = 0;
    for i in 0..200 {
        let gateway = fixture.ctx.gateway.clone();
        let body = report(i);
        let asked = tokio::spawn(async move {
            let path = format!("/agent/v1/jobs/uid-{i}/progress");
            call(&gateway, "POST", &path, Some(BEARER), body).await
        });
        // Either the gateway asks the API (answered: no such job), or it refuses at once.
        let read = format!("/apis/fleetpatch.io/v1alpha1/namespaces/team/patchjobs/made-up-{i}");
        let answered = tokio::select! {
            answered = asked => answered.unwrap(),
            _ = fixture.server.answer("GET", &read, 404,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})) => {
                reads += 1;
                continue;
            }
        };
        assert_eq!(answered.0, StatusCode::TOO_MANY_REQUESTS, "{}", answered.1);
        break;
    }
    assert_within_read_budget(reads, "reads before the budget ran out");
    fixture.server.done().await;
}

/// Attack: a node agent whose job carries `reboot-decision: Approved` — every job that
/// was ever drained keeps it until the job is deleted, and a plan author can write it on
/// any job of theirs — asks for its reboot decision in a tight loop with
/// `waitSeconds=0`. Every ask costs a GET of its Node, with no budget: a host with a
/// valid token turns its own request rate into the API server's load. It must be
/// bounded like reports about unknown jobs are (429 past the agent's read budget).
#[tokio::test]
async fn reboot_decision_polls_cost_node_reads_only_within_a_budget() {
    let mut fixture = node_agent_fixture(json!({"namespaces": {"from": "All"}}));
    self_approved_node_job(&mut fixture);
    let path = "/agent/v1/jobs/uid-weekly-m1-node-a/reboot?waitSeconds=0";
    let mut reads = 0;
    for _ in 0..200 {
        let gateway = fixture.ctx.gateway.clone();
        let asked = tokio::spawn(async move {
            call_with(&gateway, "GET", path, &NODE_HEADERS, Value::Null).await
        });
        let answered = tokio::select! {
            answered = asked => answered.unwrap(),
            _ = fixture.server.answer("GET", "/api/v1/nodes/node-a", 200,
                    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}})) => {
                reads += 1;
                continue;
            }
        };
        assert_eq!(answered.0, StatusCode::TOO_MANY_REQUESTS, "{}", answered.1);
        break;
    }
    assert_within_read_budget(
        reads,
        "Node reads for 200 asks by one agent: the reboot endpoint has no read budget",
    );
    fixture.server.done().await;
}

/// Attack (the network, no credential at all): `POST /agent/v1/register` reads its
/// whole JSON body — up to the gateway-wide 512 KiB limit — before anything about the
/// caller is checked (the rate limit, the registration slots and the token come after),
/// and a body may take the whole 60 s request deadline to arrive. One source may hold
/// 1024 connections: 1024 × 512 KiB is the controller's whole 512Mi memory limit in the
/// chart, from a single IPv4 address. Here 250 connections each send 500 KiB of a
/// registration and never the last byte; the gateway must not hold their bodies (a
/// registration is a name, an OS and at most 32 labels: a few KiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_registrations_cannot_make_the_gateway_hold_their_bodies() {
    use tokio::io::AsyncWriteExt;
    fn rss_bytes() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }
    let fixture = Fixture::new();
    let address = serve_on_loopback(&fixture, super::serve::ServeLimits::default());
    const CONNECTIONS: usize = 250;
    const BODY: usize = 500 * 1024;
    let before = rss_bytes();
    let padding = vec![b' '; BODY];
    let mut held = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let head = format!(
            "POST /agent/v1/register HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            BODY + 1
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        // Whitespace is a valid start of a JSON document; the closing byte never comes.
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            stream.write_all(&padding),
        )
        .await;
        held.push(stream);
    }
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let grown = rss_bytes().saturating_sub(before);
    drop(held);
    assert!(
        grown < 64 << 20,
        "{} connections without any credential grew the gateway by {} MiB",
        CONNECTIONS,
        grown >> 20
    );
}

/// Attack (a node agent, or anything holding the node agent's token): registration is
/// free for a node agent — its token review is cached for a minute, and no bucket is
/// charged for an authenticated caller — and it writes the Agent whenever the labels it
/// announces differ from the Agent's. Announcing `{flip: a}`, then `{flip: b}`, over and
/// over turns every request into an Agent write (and, through the plans that select by
/// labels, into reconciles and more writes). Announcements must cost writes only within
/// a budget.
#[tokio::test]
async fn node_agent_announcements_cost_agent_writes_only_within_a_budget() {
    let mut fixture = node_agent_fixture(json!({"namespaces": {"from": "All"}}));
    let agent = json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "Agent",
        "metadata": {"name": "node-a", "resourceVersion": "8"},
        "spec": {"mode": "Node", "os": "Linux", "nodeName": "node-a"}});
    let mut writes = 0;
    for i in 0..100 {
        let gateway = fixture.ctx.gateway.clone();
        let flip = if i % 2 == 0 { "a" } else { "b" };
        let asked = tokio::spawn(async move {
            call_with(
                &gateway,
                "POST",
                "/agent/v1/register",
                &NODE_HEADERS,
                json!({"name": "node-a", "os": "Linux", "labels": {"flip": flip}}),
            )
            .await
        });
        let answered = tokio::select! {
            answered = asked => answered.unwrap(),
            _ = fixture.server.answer("PATCH", "/apis/fleetpatch.io/v1alpha1/agents/node-a", 200, agent.clone()) => {
                writes += 1;
                continue;
            }
        };
        assert_eq!(answered.0, StatusCode::TOO_MANY_REQUESTS, "{}", answered.1);
        break;
    }
    assert!(
        writes <= 20,
        "{writes} Agent writes for 100 announcements by one node agent"
    );
    fixture.server.done().await;
}

/// Attack (the network, no credential at all): every request with an unknown node token
/// (`x-fleetpatch-node` plus any bearer) costs one TokenReview — an API call — and the
/// only bound is the token bucket of the caller's source (burst 100, 20/s). Nothing
/// bounds the reviews across sources: one attacker with an IPv6 /48 (65 536 /64
/// buckets, which is what one customer of many providers gets) or a botnet turns its
/// request rate straight into TokenReviews against the API server, 100 at once from
/// each /64. Here 5 000 requests from 5 000 /64s (one each, never over any source's
/// burst) cost 5 000 TokenReviews; the gateway's reviews must have a global budget.
#[tokio::test]
async fn token_reviews_for_unknown_node_tokens_are_bounded_across_sources() {
    use super::auth::{Authenticator, NodePolicy, Purpose, TokenReviewer};
    use super::limits::{SourceLimiter, UnauthenticatedLimits};
    use k8s_openapi::api::authentication::v1::TokenReviewStatus;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting(Arc<AtomicUsize>);
    impl TokenReviewer for Counting {
        fn review<'a>(
            &'a self,
            _token: &'a str,
            _audience: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<TokenReviewStatus, kube::Error>> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Box::pin(async {
                Ok(TokenReviewStatus {
                    authenticated: Some(false),
                    ..Default::default()
                })
            })
        }
    }
    let reviews = Arc::new(AtomicUsize::new(0));
    let (credentials, _) = kube::runtime::reflector::store::<Secret>();
    let (agents, _) = kube::runtime::reflector::store::<Agent>();
    let auth = Authenticator::new(
        NAMESPACE.into(),
        credentials,
        agents,
        Box::new(Counting(reviews.clone())),
        NodePolicy {
            audience: "fleetpatch-gateway".into(),
            username: format!("system:serviceaccount:{NAMESPACE}:fleetpatch-node-agent"),
        },
    );
    let limiter = SourceLimiter::new(&UnauthenticatedLimits::default());
    const SOURCES: u16 = 5000;
    for i in 0..SOURCES {
        let source =
            std::net::IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x77, i, 0, 0, 0, 1));
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(
            axum::http::header::AUTHORIZATION,
            format!("Bearer made-up-{i}").parse().unwrap(),
        );
        headers.insert(super::auth::NODE_HEADER, "node-a".parse().unwrap());
        let refused = auth
            .authenticate(&headers, source, Purpose::Serve, &limiter)
            .await;
        assert!(refused.is_err());
    }
    let reviews = reviews.load(Ordering::Relaxed);
    assert!(
        reviews <= 1000,
        "{reviews} TokenReviews for {SOURCES} unauthenticated requests: no budget across sources"
    );
}

/// Attack (the network, no credential at all): the registration body slots
/// (`MAX_REGISTRATION_READS`, 256) are shared by everyone, and a stranger holds one for
/// the whole body deadline (10 s) by sending a registration's headers and never its
/// body. Each source is charged once per request against a burst of 100 (refilling
/// at 20/s, i.e. 200 per 10 s), so three source addresses — here 127.0.0.2-4 — hold all
/// 256 slots, and keep holding them by coming back every ten seconds. A real host's
/// registration, complete and from a fresh address, is then turned away with 503 Busy
/// before its token is even looked at: no new host can join the fleet for as long as
/// the attack lasts. A source must be able to hold only a small share of the slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_few_sources_cannot_hold_every_registration_slot() {
    let fixture = Fixture::new();
    let connect_from = serve_fixture(&fixture, super::serve::ServeLimits::default());
    let mut held = Vec::new();
    for source in 2..=4u8 {
        for _ in 0..90 {
            held.push(without_body(connect_from(source).await).await);
        }
    }
    // Let the gateway take the slots.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let status_line = register_new_host(connect_from(9).await).await;
    drop(held);
    assert!(
        !status_line.contains(" 503 "),
        "a complete registration from a fresh source is turned away while three slow sources hold the slots: {status_line}"
    );
}

/// Attack (the network, no credential at all): the gateway's connection caps are a
/// total (`--gateway-max-connections`, 16 384) and a share per source (1 024), so
/// sixteen source addresses — sixteen IPv4 addresses or IPv6 /64s — fill every slot
/// with connections that send nothing, each kept for the 30 s header deadline and
/// opened again when it ends. Every agent in the fleet, node agents included, is then
/// refused at accept: no heartbeats, no reports, no reboot decisions. Here the caps are
/// scaled down (64 in all, 16 per source, the same ratio): four sources holding idle
/// connections lock out a fifth. A connection that has not even sent its headers must
/// not keep a working client out (shed the oldest idle ones when full, or cap sources
/// at a share that many sources cannot add up to).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_from_a_few_sources_do_not_lock_every_agent_out() {
    use tokio::io::AsyncWriteExt;
    let fixture = Fixture::new();
    let connect_from = serve_fixture(&fixture, capped(64, 16));
    let mut held = Vec::new();
    for source in 2..=5u8 {
        for _ in 0..16 {
            held.push(connect_from(source).await);
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut agent = connect_from(9).await;
    let _ = agent
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
        .await;
    let answer = read_to_close(&mut agent).await;
    drop(held);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "four sources holding idle connections lock a fifth out of the gateway: got {:?}",
        answer
            .lines()
            .next()
            .unwrap_or("nothing (the connection was dropped)")
    );
}

/// Attack (a plan author, in their own namespace): a PatchJob written by hand is never
/// served, but the controller's shared cache keeps every PatchJob of the cluster, and
/// `strip_for_cache` clears only script bodies. The CRD bounds neither `spec.plan`,
/// `spec.run`, action names, `parameters` nor a script's `signature`, so one job can
/// carry about 1.4 MB (etcd's object limit) that the cache keeps in full. Some 350 such
/// jobs — any namespace, any agent name, no signature — are the chart's whole 512Mi
/// memory limit for the controller: it is OOM-killed, lists them again on start, and is
/// killed again; the gateway (same process) goes with it, for the whole fleet. What the
/// cache keeps of a job must be small whatever its author put in it (bound the CRD's
/// fields, and keep of an unsigned job no more than the index needs).
#[tokio::test]
async fn the_cache_keeps_little_of_a_hand_written_job_however_large() {
    let fixture = Fixture::new();
    let mut job = full_job(&fixture);
    job.metadata.annotations = None;
    let huge = "x".repeat(400 * 1024); // two of these: 800 KiB, under etcd's limit
    // `spec.plan` and `spec.run` are bounded by the CRD (253 and 63 characters).
    job.spec.pre_actions[0]
        .parameters
        .insert("PADDING".into(), huge.clone());
    job.spec.pre_actions[0].script.as_mut().unwrap().signature = Some(huge);
    let mut cached = job.clone();
    super::progress::project_job(&mut cached, &fixture.ctx.signer);
    let kept = serde_json::to_vec(&cached).unwrap().len();
    assert!(
        kept < 64 * 1024,
        "the controller's cache keeps {} KiB of one unsigned, hand-written PatchJob",
        kept / 1024
    );
    let crd = serde_json::to_value(<PatchJob as kube::CustomResourceExt>::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    assert_eq!(spec["plan"]["maxLength"], 253);
    assert_eq!(spec["run"]["maxLength"], 63);
    // A job the controller signed keeps all but its script bodies.
    let signed = full_job(&fixture);
    let mut cached = signed.clone();
    super::progress::project_job(&mut cached, &fixture.ctx.signer);
    assert_eq!(cached.spec.pre_actions.len(), 1);
    assert!(
        fixture.ctx.signer.verify(&cached),
        "what is kept still verifies"
    );
}

/// The review that accepts node-a's agent's token.
fn node_a_review() -> k8s_openapi::api::authentication::v1::TokenReviewStatus {
    use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};
    TokenReviewStatus {
        authenticated: Some(true),
        audiences: Some(vec!["fleetpatch-gateway".into()]),
        user: Some(UserInfo {
            username: Some(format!(
                "system:serviceaccount:{NAMESPACE}:fleetpatch-node-agent"
            )),
            extra: Some(
                [(
                    super::auth::NODE_NAME_EXTRA.to_string(),
                    vec!["node-a".to_string()],
                )]
                .into(),
            ),
            ..Default::default()
        }),
        error: None,
    }
}

/// An authenticator that knows node-a's Agent and accepts its agent's `node-token`,
/// with the default limits.
fn node_a_authenticator() -> (super::auth::Authenticator, super::limits::SourceLimiter) {
    use super::auth::{Authenticator, NodePolicy};
    use super::limits::{SourceLimiter, UnauthenticatedLimits};
    let (credentials, _) = kube::runtime::reflector::store::<Secret>();
    let (agents, mut agents_writer) = kube::runtime::reflector::store::<Agent>();
    let mut agent: Agent = typed(
        json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "Agent",
        "metadata": {"name": "node-a"}, "spec": {"mode": "Node", "os": "Linux", "nodeName": "node-a"}}),
    );
    agent.metadata = stored("node-a", None);
    cache(&mut agents_writer, agent);
    let auth = Authenticator::new(
        NAMESPACE.into(),
        credentials,
        agents,
        Box::new(crate::controller::fixtures::FakeReviewer(vec![(
            "node-token".into(),
            node_a_review(),
        )])),
        NodePolicy {
            audience: "fleetpatch-gateway".into(),
            username: format!("system:serviceaccount:{NAMESPACE}:fleetpatch-node-agent"),
        },
    );
    (auth, SourceLimiter::new(&UnauthenticatedLimits::default()))
}

/// node-a's agent authenticating from its own address with its real token.
async fn node_a_asks(
    auth: &super::auth::Authenticator,
    limiter: &super::limits::SourceLimiter,
) -> Result<super::auth::Identity, super::Refusal> {
    auth.authenticate(
        &node_headers("node-token", "node-a"),
        std::net::IpAddr::from([10, 0, 0, 7]),
        super::auth::Purpose::Serve,
        limiter,
    )
    .await
}

/// A node agent's request headers: its bearer token and the node it claims.
fn node_headers(token: &str, node: &str) -> axum::http::HeaderMap {
    let mut headers = axum::http::HeaderMap::new();
    headers.insert(
        axum::http::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    headers.insert(super::auth::NODE_HEADER, node.parse().unwrap());
    headers
}

/// Twenty stranger sources, each well within its own bucket's burst, sending made-up
/// tokens for a node that does not exist.
async fn flood_with_made_up_node_tokens(
    auth: &super::auth::Authenticator,
    limiter: &super::limits::SourceLimiter,
) {
    for source in 0..20u8 {
        let source = std::net::IpAddr::from([203, 0, 113, source]);
        for i in 0..50 {
            let _ = auth
                .authenticate(
                    &node_headers(&format!("made-up-{source}-{i}"), "whatever"),
                    source,
                    super::auth::Purpose::Serve,
                    limiter,
                )
                .await;
        }
    }
}

/// Attack (the network, no credential at all): the global TokenReview budget
/// (`SourceLimiter::allow_review`, 100 a second, 500 at once) is shared by strangers'
/// made-up tokens and by the node agents' real ones alike. Each stranger source may
/// cost 50 reviews at once and 10 a second (its bucket is charged twice per refusal),
/// so ten IPv4 addresses or IPv6 /64s sending `Authorization: Bearer <random>` with
/// `x-fleetpatch-node: <any name>` keep the budget empty for good. Every node agent
/// whose cached verdict expires (60 s) is then refused ("too many token reviews") —
/// within a minute the whole node fleet is locked out: no heartbeats, no reports, no
/// reboot decisions. Strangers' reviews must not spend the node agents' share (check
/// the claimed node has a node Agent and the source is that node's address before a
/// review, or keep a reserve of reviews for sources that are known nodes).
#[tokio::test]
async fn strangers_cannot_spend_the_token_reviews_node_agents_need() {
    let (auth, limiter) = node_a_authenticator();
    flood_with_made_up_node_tokens(&auth, &limiter).await;
    // Node node-a's agent, from its own address, with its real token (its earlier
    // verdict expired).
    let verdict = node_a_asks(&auth, &limiter).await;
    assert!(
        verdict.is_ok(),
        "twenty stranger sources spent the TokenReview budget: node-a's own agent is refused ({verdict:?})"
    );
}

/// Attack (the network, no credential at all), and a wrong answer: when the shared
/// TokenReview budget is spent (see `strangers_cannot_spend_the_token_reviews_node_agents_need`),
/// `check_node` fails like a bad token and the node agent is answered 401 Unauthorized
/// (429 only once its own source's bucket runs dry) — an answer the agent treats as
/// final (`GatewayError::is_final`: every 4xx but 408/429). A node agent waiting for a
/// reboot decision then gives the reboot up ("the gateway refused the reboot") and its
/// job fails; nothing was wrong with its token. A spent budget must be answered as
/// what it is: 429/503, retried.
#[tokio::test]
async fn a_spent_review_budget_is_not_an_authentication_failure() {
    let (auth, limiter) = node_a_authenticator();
    flood_with_made_up_node_tokens(&auth, &limiter).await;
    // Node node-a's agent, from its own address, with its real token (its earlier
    // verdict expired).
    let verdict = node_a_asks(&auth, &limiter).await;
    assert!(
        !matches!(verdict, Err(super::Refusal::Unauthorized)),
        "the gateway had no TokenReview to spare and told node-a's agent its token is refused (401)"
    );
}

/// Attack (a hostile agent, with its own credential): a connection that carried one
/// authenticated request is never closed to make room (`ConnectionState::trust`), and
/// nothing counts those per agent. One external host's credential, from sixteen
/// sources (a /60 of IPv6: sixteen /64s) — or fewer where the per-source cap is
/// higher — opens `max_connections` connections, sends one cheap authenticated
/// request on each (a long-poll, which also keeps it busy past the idle deadline) and
/// repeats: the gateway is full of "agent" connections, admits nobody else, and every
/// other agent of the fleet is refused at accept. Here the caps are scaled down (8 in
/// all, 4 per source): agent web-1 from two sources holds every slot and a fresh
/// client is dropped unanswered. Trusted connections must be capped per agent (beyond
/// a few, an agent's connections are evictable like strangers').
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_credential_cannot_hold_every_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_fixture, connect_from) = known_host_served(capped(8, 4));
    let mut held = Vec::new();
    for source in 2..=3u8 {
        for _ in 0..4 {
            let mut stream = connect_from(source).await;
            stream
                .write_all(
                    format!("GET /agent/v1/assignments HTTP/1.1\r\nHost: gateway\r\nAuthorization: {BEARER}\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .unwrap();
            // Read the (empty) answer: the request authenticated.
            let mut buffer = [0u8; 1024];
            let read =
                tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buffer))
                    .await
                    .expect("answered")
                    .unwrap();
            assert!(
                String::from_utf8_lossy(&buffer[..read]).starts_with("HTTP/1.1 200"),
                "the hostile agent's long-poll is served"
            );
            held.push(stream);
        }
    }
    let mut other = connect_from(9).await;
    let _ = other
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
        .await;
    let answer = read_to_close(&mut other).await;
    drop(held);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "one agent's credential holds every connection of the gateway: a fresh client got {:?}",
        answer
            .lines()
            .next()
            .unwrap_or("nothing (the connection was dropped)")
    );
}

/// Attack (a plan author, in their own namespace): `project_job` keeps of an unsigned
/// PatchJob "its metadata but annotations" — labels, finalizers and ownerReferences
/// included, none of which the API server bounds beyond the object's ~1.5 MB. A job
/// written by hand with ~800 KiB of labels (10 000 of them) is kept whole in the
/// controller's shared cache, as before the fix: some 350 such jobs are the
/// controller's (and so the gateway's) whole memory limit. Keep of an unsigned job
/// only the labels the index uses (or none), and neither finalizers nor owners.
#[tokio::test]
async fn the_cache_keeps_little_of_a_hand_written_job_whatever_its_labels() {
    let fixture = Fixture::new();
    let mut job = full_job(&fixture);
    job.metadata.annotations = None;
    let value = "v".repeat(63);
    job.metadata.labels = Some(
        (0..10_000)
            .map(|i| (format!("padding.example.com/{i:0>20}"), value.clone()))
            .collect(),
    );
    job.metadata.finalizers = Some(
        (0..2_000)
            .map(|i| format!("example.com/{i:0>60}"))
            .collect(),
    );
    let mut cached = job.clone();
    super::progress::project_job(&mut cached, &fixture.ctx.signer);
    let kept = serde_json::to_vec(&cached).unwrap().len();
    assert!(
        kept < 64 * 1024,
        "the controller's cache keeps {} KiB of one unsigned, hand-written PatchJob (its labels and finalizers)",
        kept / 1024
    );
}

/// Attack (a plan author, in their own namespace): the signature covers a job's
/// namespace, name and spec, not its annotations, and `project_job` keeps a signed
/// job's annotations whole. The author annotates each job the controller made for
/// their plan — or recreates, under its old name, every signed job of theirs that was
/// ever deleted (the signature still verifies) — with ~1 MB of annotations: each is
/// kept whole in the shared cache, and a few hundred OOM the controller and gateway.
/// Keep of a signed job only the annotations the controller reads (signature, reboot
/// decision and message), bounded in size.
#[tokio::test]
async fn the_cache_keeps_little_of_a_signed_job_whatever_its_annotations() {
    let fixture = Fixture::new();
    let mut job = full_job(&fixture);
    job.metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert("padding.example.com/x".into(), "x".repeat(1024 * 1024));
    assert!(fixture.ctx.signer.verify(&job), "still signed");
    let mut cached = job.clone();
    super::progress::project_job(&mut cached, &fixture.ctx.signer);
    let kept = serde_json::to_vec(&cached).unwrap().len();
    assert!(
        kept < 64 * 1024,
        "the controller's cache keeps {} KiB of one signed PatchJob its author annotated",
        kept / 1024
    );
}

/// Attack (the network, no credential at all): when the gateway is full, each new
/// connection closes the *oldest* one that has not authenticated yet, whoever holds it.
/// An agent's new connection (after a restart, a network blip, the 30 s idle close)
/// is untrusted until its first request has been authenticated — through the TLS
/// handshake, its headers' trip across the network and a TokenReview — and strangers
/// who fill the gateway and keep opening connections push it to the front of the
/// queue: `max_connections` new stranger connections during that time close it. At
/// 16 384 that is ~55 000 SYNs a second against an agent 100 ms away (three round
/// trips), which one host with a few addresses sends; the agents that need a new
/// connection never get a request through. Here the caps are scaled down (8 in all):
/// an external agent connects, eight strangers connect after it, and its request is
/// never answered. Make room at the expense of the source that holds the most
/// untrusted connections (the flooder's own), not of the oldest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_connecting_after_an_agent_do_not_close_its_connection() {
    use tokio::io::AsyncWriteExt;
    let (_fixture, connect_from) = known_host_served(capped(8, 4));
    let mut held = Vec::new();
    for source in 2..=3u8 {
        for _ in 0..4 {
            held.push(connect_from(source).await);
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    // The agent's connection is accepted (a stranger's makes room for it)...
    let mut agent = connect_from(9).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    // ... and while its first request is on its way, strangers keep connecting.
    for source in 4..=5u8 {
        for _ in 0..4 {
            held.push(connect_from(source).await);
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let _ = agent
        .write_all(
            format!("GET /agent/v1/assignments HTTP/1.1\r\nHost: gateway\r\nAuthorization: {BEARER}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
    let answer = read_to_close(&mut agent).await;
    drop(held);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "eight stranger connections opened after an agent's close it before its first request: got {:?}",
        answer
            .lines()
            .next()
            .unwrap_or("nothing (the connection was closed)")
    );
}

/// Attack (the network, no credential at all): a registration is untrusted for its
/// whole course — it carries no agent credential — so a full gateway closes it to make
/// room like any idle stranger's socket, mid-request. The window is wide and lands at
/// the worst moment: once the bootstrap token is spent, the answer waits until this
/// replica's watches show the new Agent and credential (hundreds of milliseconds).
/// Strangers who keep the gateway full and keep connecting close it then: the host
/// never receives its credential, its one-use bootstrap token is spent, and it can
/// never register without an administrator minting a new token — for every new host,
/// for as long as the flood lasts. Here (4 connections in all) four strangers connect
/// while the registration waits for the caches. A connection with a request in
/// progress must not be closed to make room (evict only idle or handshaking ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_cannot_cut_a_registration_after_its_token_is_spent() {
    use tokio::io::AsyncWriteExt;
    let mut fixture = Fixture::new();
    cache_one_time_token(&mut fixture);
    let connect_from = serve_fixture(&fixture, capped(4, 0));
    let body =
        serde_json::to_vec(&json!({"name": "web-1", "os": "Linux", "bootstrapToken": "only-once"}))
            .unwrap();
    let mut host = connect_from(9).await;
    host.write_all(register_head(body.len()).as_bytes())
        .await
        .unwrap();
    host.write_all(&body).await.unwrap();
    let server = &mut fixture.server;
    let (agent, stored_credential, _spent) = answer_registration(server, "web-1", "once").await;
    // The token is spent; the answer waits for the caches. Strangers connect.
    let mut strangers = Vec::new();
    for _ in 0..4 {
        strangers.push(connect_from(2).await);
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    cache_registration(&mut fixture, "web-1", agent, stored_credential);
    let answer = read_to_close(&mut host).await;
    drop(strangers);
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("credential"),
        "the registration was cut after its bootstrap token was spent; the host got {:?}",
        answer
            .lines()
            .next()
            .unwrap_or("nothing (the connection was closed)")
    );
}

/// Attack (the network, no credential at all): the fix for
/// `a_few_sources_cannot_hold_every_registration_slot` caps a source at 4 of the 256
/// registration body slots — and a source is one IPv4 address or one IPv6 /64. So 64
/// sources still hold every slot for the 10 s body deadline, coming back as each ends:
/// 64 IPv4 addresses (a tiny botnet), or a single IPv6 /58 — one customer's /56 or /48
/// holds 4 or 1 024 times as many. No new host can register while they do. Here 65
/// loopback addresses each send four registration heads without bodies; a complete
/// registration from a 66th gets 503. Bound the slots a larger prefix (an IPv6 /48,
/// say) can hold too, and give a slot back to a body that does not arrive at a
/// reasonable rate instead of after 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_sources_cannot_hold_every_registration_slot() {
    let fixture = Fixture::new();
    let address = serve_on_loopback(&fixture, super::serve::ServeLimits::default());
    let connect_from = |source: [u8; 4]| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((source, 0))).unwrap();
        socket.connect(address).await.unwrap()
    };
    let mut held = Vec::new();
    for source in 2..=66u8 {
        for _ in 0..4 {
            held.push(without_body(connect_from([127, 0, 1, source]).await).await);
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let status_line = register_new_host(connect_from([127, 0, 2, 9]).await).await;
    drop(held);
    assert!(
        !status_line.contains(" 503 "),
        "a complete registration from a fresh source is turned away while 65 slow sources hold the slots: {status_line}"
    );
}

/// Attack (a plan author, in their own namespace): hand-written, unsigned PatchJobs
/// naming *any* agent — one that does not even accept the author's namespace — are
/// indexed under that agent, and every one of them wakes its long-poll. Each poll then
/// checks every such job's signature and logs a warning ("job not served") for each:
/// N jobs created one after another cost the victim's gateway N²/2 signature checks and
/// as many warning lines (5 000 jobs: 12.5 million), and every one of the victim's
/// polls afterwards logs N lines. Here 2 000 unsigned jobs naming web-1 make one
/// assignments poll log 2 000 warnings. An unsigned job is served to nobody: keep it
/// out of the agent's index (and its wake-ups), or refuse it silently.
#[tokio::test]
async fn unsigned_jobs_naming_an_agent_cost_its_polls_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tracing_subscriber::layer::SubscriberExt;
    struct CountWarnings(Arc<AtomicUsize>);
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CountWarnings {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _ctx: tracing_subscriber::layer::Context<'_, S>,
        ) {
            if *event.metadata().level() == tracing::Level::WARN {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let mut fixture = Fixture::new();
    known_host(&mut fixture);
    for i in 0..2000 {
        let mut job = full_job(&fixture);
        let name = format!("junk-{i}");
        job.metadata = stored(&name, Some("elsewhere"));
        super::progress::project_job(&mut job, &fixture.ctx.signer);
        cache(&mut fixture.writers.jobs, job.clone());
        fixture.ctx.caches.job_signals.observe(&job);
    }
    let warnings = Arc::new(AtomicUsize::new(0));
    let subscriber = tracing_subscriber::registry().with(CountWarnings(warnings.clone()));
    let _guard = tracing::subscriber::set_default(subscriber);
    let (status, body) = get_as_host(&fixture, "/agent/v1/assignments").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["jobs"], json!([]));
    let warnings = warnings.load(Ordering::Relaxed);
    assert!(
        warnings < 10,
        "one poll of web-1 logged {warnings} warnings about unsigned jobs a stranger named it in"
    );
}

/// Attack (a workload owner, with pods on a node being drained), a drift between two
/// changes: `project_job` bounds a cached job's annotations to 8 KiB, but the drain
/// writes its live "draining node …: evictions refused: …" message unbounded (one
/// PDB refusal per blocked pod) and re-writes it "only when it changes" by comparing
/// with the cached value (`drain.rs`, `job.annotations().get(REBOOT_MESSAGE_ANNOTATION)
/// != Some(&message)`). Past 8 KiB the cached copy never equals what was written, so
/// every drain pass (each 2 s, per node) PATCHes the job again. Bound the message where
/// it is written, with the same bound.
#[tokio::test]
async fn a_long_drain_message_is_cached_as_written() {
    let fixture = Fixture::new();
    let mut job = full_job(&fixture);
    let blocked: Vec<String> = (0..120)
        .map(|i| {
            format!(
                "team-a/web-{i:0>5} (Cannot evict pod as it would violate the pod's disruption budget.)"
            )
        })
        .collect();
    let message = format!(
        "draining node node-a: {} pod(s) left; evictions refused: {}",
        blocked.len(),
        blocked.join("; ")
    );
    assert!(message.len() > 8 * 1024);
    // The drain writes the message bounded, and compares bounded values: what the cache
    // keeps of what it wrote is what it would write again, so it does not re-PATCH.
    job.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(
            crate::api::common::REBOOT_MESSAGE_ANNOTATION.into(),
            super::protocol::bounded(&message, crate::controller::drain::MAX_REBOOT_MESSAGE),
        );
    let mut cached = job.clone();
    super::progress::project_job(&mut cached, &fixture.ctx.signer);
    assert!(
        crate::controller::drain::says(&cached, &message),
        "the drain's message, as cached, differs from what the drain would write: it re-PATCHes the job on every pass"
    );
}

/// Sends registration `request` to the fixture's gateway; the answer comes once the
/// test has answered the gateway's API requests.
fn register_in_background(
    fixture: &Fixture,
    request: Value,
) -> tokio::task::JoinHandle<(StatusCode, Value)> {
    let gateway = fixture.ctx.gateway.clone();
    tokio::spawn(async move { call(&gateway, "POST", "/agent/v1/register", None, request).await })
}

/// What this replica's watches show once `host`'s registration is written: its
/// Agent and its credential Secret, as answered.
fn cache_registration(fixture: &mut Fixture, host: &str, agent: Value, credential: Value) {
    let mut watched: Agent = serde_json::from_value(agent).unwrap();
    watched.metadata = stored(host, None);
    cache(&mut fixture.writers.agents, watched);
    let mut watched: Secret = serde_json::from_value(credential).unwrap();
    watched.metadata = stored(&format!("fleetpatch-agent-{host}"), Some(NAMESPACE));
    cache(&mut fixture.writers.credentials, watched);
}

/// What this replica's watches show once the admin revoked `known_host`'s web-1: its
/// Agent and its credential Secret deleted.
fn revoke_known_host(fixture: &mut Fixture) {
    let agent = fixture
        .ctx
        .caches
        .agents
        .get(&kube::runtime::reflector::ObjectRef::new("web-1"))
        .unwrap();
    fixture
        .writers
        .agents
        .apply_watcher_event(&kube::runtime::watcher::Event::Delete((*agent).clone()));
    let secret = fixture
        .ctx
        .caches
        .credentials
        .get(&kube::runtime::reflector::ObjectRef::new("fleetpatch-agent-web-1").within(NAMESPACE))
        .unwrap();
    fixture
        .writers
        .credentials
        .apply_watcher_event(&kube::runtime::watcher::Event::Delete((*secret).clone()));
}

/// Multi-use bootstrap token `name` (value `t`), with `extra` data such as its
/// `max-registrations`.
fn multi_use_token(name: &str, extra: &[(&str, &str)]) -> Secret {
    let data = [("token", "t"), ("usage", "multi")]
        .iter()
        .chain(extra)
        .map(|(key, value)| (key.to_string(), ByteString(value.as_bytes().to_vec())))
        .collect();
    Secret {
        metadata: stored(name, Some(NAMESPACE)),
        type_: Some(credentials::BOOTSTRAP_SECRET_TYPE.into()),
        data: Some(data),
        ..Default::default()
    }
}

/// Bootstrap token `once` (value `only-once`), good for one registration.
fn cache_one_time_token(fixture: &mut Fixture) {
    let token = Secret {
        metadata: stored("once", Some(NAMESPACE)),
        type_: Some(credentials::BOOTSTRAP_SECRET_TYPE.into()),
        data: Some([("token".to_string(), ByteString(b"only-once".to_vec()))].into()),
        ..Default::default()
    };
    cache(&mut fixture.writers.tokens, token);
}

/// Answers the first requests of `host`'s registration: the Node lookup (no such
/// Node), then the Agent's creation; returns the Agent written.
async fn answer_agent_creation(server: &mut ApiServer, host: &str) -> Value {
    server
        .answer_query("GET", "/api/v1/nodes", &format!("fieldSelector=metadata.name%3D{host}"), 200,
            json!({"apiVersion": "v1", "kind": "PartialObjectMetadataList", "metadata": {}, "items": []}))
        .await;
    server
        .answer("POST", "/apis/fleetpatch.io/v1alpha1/agents", 201, json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "Agent", "metadata": {"name": host}, "spec": {"mode": "External", "os": "Linux"}}))
        .await
}

/// Answers the requests of `host`'s registration with bootstrap token `token`, in
/// their order: the Node lookup, then the Agent's creation, its credential Secret and
/// the token's update (spent, or its registrations counted); returns the three writes.
async fn answer_registration(
    server: &mut ApiServer,
    host: &str,
    token: &str,
) -> (Value, Value, Value) {
    let agent = answer_agent_creation(server, host).await;
    let credential = format!("fleetpatch-agent-{host}");
    let stored_credential = server
        .answer(
            "PATCH",
            &format!("/api/v1/namespaces/{NAMESPACE}/secrets/{credential}"),
            200,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": credential}}),
        )
        .await;
    let token_written = server
        .answer(
            "PATCH",
            &format!("/api/v1/namespaces/{NAMESPACE}/secrets/{token}"),
            200,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": token}}),
        )
        .await;
    (agent, stored_credential, token_written)
}

/// What arrives on `stream` until it closes, or within 5 s.
async fn read_to_close(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut answer),
    )
    .await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// Sends a registration's head on `stream` and never its 200-byte body.
async fn without_body(mut stream: tokio::net::TcpStream) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    stream
        .write_all(
            b"POST /agent/v1/register HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n",
        )
        .await
        .unwrap();
    stream
}

/// A complete registration of `new-host` on `stream`; returns the answer's status line.
async fn register_new_host(mut stream: tokio::net::TcpStream) -> String {
    use tokio::io::AsyncWriteExt;
    let body = serde_json::to_vec(
        &json!({"name": "new-host", "os": "Linux", "bootstrapToken": "whatever"}),
    )
    .unwrap();
    stream
        .write_all(register_head(body.len()).as_bytes())
        .await
        .unwrap();
    stream.write_all(&body).await.unwrap();
    let answer = read_to_close(&mut stream).await;
    answer.lines().next().unwrap_or_default().to_string()
}

/// The head of a complete registration request whose body is `length` bytes.
fn register_head(length: usize) -> String {
    format!(
        "POST /agent/v1/register HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    )
}

/// Connection caps scaled down for a test: `total` in all, `per_source` each.
fn capped(total: usize, per_source: usize) -> super::serve::ServeLimits {
    super::serve::ServeLimits {
        max_connections: total,
        max_connections_per_source: per_source,
        ..Default::default()
    }
}

/// The API reads a flood cost stayed within an agent's read budget (and the budget
/// allowed some); else fails saying `what` they were.
fn assert_within_read_budget(reads: usize, what: &str) {
    assert!((1..=60).contains(&reads), "{reads} {what}");
}

/// A fixture that knows web-1, served on loopback with `limits`, and how to connect
/// to it from 127.0.0.`last`.
fn known_host_served(
    limits: super::serve::ServeLimits,
) -> (
    Fixture,
    impl Fn(u8) -> std::pin::Pin<Box<dyn std::future::Future<Output = tokio::net::TcpStream>>>,
) {
    let mut fixture = Fixture::new();
    known_host(&mut fixture);
    let connect_from = serve_fixture(&fixture, limits);
    (fixture, connect_from)
}

/// web-1's assignments poll on an open connection; returns the answer's head.
async fn poll_over(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncWriteExt;
    stream
        .write_all(
            format!("GET /agent/v1/assignments HTTP/1.1\r\nHost: gateway\r\nAuthorization: {BEARER}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    read_for(stream, std::time::Duration::from_secs(5), "[]}")
        .await
        .0
}

/// Serves the fixture's gateway on a loopback port with `limits`; returns its address.
fn serve_on_loopback(fixture: &Fixture, limits: super::serve::ServeLimits) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(super::serve::serve(
        listener,
        fixture.ctx.gateway.router(),
        None,
        limits,
    ));
    address
}

/// A GET by web-1, with its credential.
async fn get_as_host(fixture: &Fixture, path: &str) -> (StatusCode, Value) {
    call(&fixture.ctx.gateway, "GET", path, Some(BEARER), Value::Null).await
}

/// Serves the fixture's gateway on loopback with `limits`; connects from 127.0.0.`last`.
fn serve_fixture(
    fixture: &Fixture,
    limits: super::serve::ServeLimits,
) -> impl Fn(u8) -> std::pin::Pin<Box<dyn std::future::Future<Output = tokio::net::TcpStream>>> + use<>
{
    let address = serve_on_loopback(fixture, limits);
    move |last: u8| {
        Box::pin(async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket
                .bind(SocketAddr::from(([127, 0, 0, last], 0)))
                .unwrap();
            socket.connect(address).await.unwrap()
        })
    }
}

/// Reads what arrives on `stream` within `wait`, until it closes or has `until` in it.
async fn read_for(
    stream: &mut tokio::net::TcpStream,
    wait: std::time::Duration,
    until: &str,
) -> (String, bool) {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    let mut buffer = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&answer).into(), true),
            Ok(Ok(read)) => {
                answer.extend_from_slice(&buffer[..read]);
                if String::from_utf8_lossy(&answer).contains(until) {
                    return (String::from_utf8_lossy(&answer).into(), false);
                }
            }
            Err(_) => return (String::from_utf8_lossy(&answer).into(), false),
        }
    }
}

/// Attack (a hostile agent, or just a busy one): a connection beyond its agent's share
/// is closed to make room — and it was closed mid-request, dropped with whatever it
/// was doing. An agent's long-poll on it simply vanished: no answer, a reset, a retry
/// with backoff, and the stranger who caused it could do it again at every connect.
/// A connection told to close must answer the request in progress (a long-poll at
/// once, with no work) and only then close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_to_make_room_answers_its_request_first() {
    use tokio::io::AsyncWriteExt;
    let mut fixture = Fixture::with_max_wait(std::time::Duration::from_secs(30));
    known_host(&mut fixture);
    // Two connections in all: an agent's share is one.
    let connect = serve_fixture(&fixture, capped(2, 0));
    let poll = format!(
        "GET /agent/v1/assignments?waitSeconds=30 HTTP/1.1\r\nHost: gateway\r\nAuthorization: {BEARER}\r\n\r\n"
    );
    let mut within = connect(2).await;
    within.write_all(poll.as_bytes()).await.unwrap();
    // The first to authenticate is within web-1's share.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut beyond = connect(3).await;
    beyond.write_all(poll.as_bytes()).await.unwrap();
    // Both long-polls are waiting (they authenticated) before the stranger comes.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let _stranger = connect(9).await;
    let (answer, _) = read_for(&mut beyond, std::time::Duration::from_secs(5), "\r\n\r\n").await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "the long-poll on the connection closed to make room got {:?}",
        answer
            .lines()
            .next()
            .unwrap_or("nothing (the connection was dropped mid-request)")
    );
}

/// Attack (the network, no credential): a connection that never authenticates holds a
/// slot for as long as it sends a request before the header deadline — a health check
/// every 25 s keeps it forever, and a few thousand of them sit in the slots the fleet's
/// agents need, closed only when the gateway is full. A connection must authenticate
/// within a deadline or be closed; an agent's connection is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_authenticates_is_closed_at_its_deadline() {
    use tokio::io::AsyncWriteExt;
    let mut fixture = Fixture::new();
    known_host(&mut fixture);
    let connect = serve_fixture(
        &fixture,
        super::serve::ServeLimits {
            authentication_timeout: std::time::Duration::from_millis(800),
            ..Default::default()
        },
    );
    let mut stranger = connect(2).await;
    let mut agent = connect(3).await;
    let answer = poll_over(&mut agent).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "the poll: {answer:?}");
    let mut closed = false;
    let mut answered = 0;
    let started = tokio::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(5) {
        // The agent keeps working on its connection, authenticating each request.
        agent
            .write_all(
                format!("GET /agent/v1/assignments HTTP/1.1\r\nHost: gateway\r\nAuthorization: {BEARER}\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let (answer, _) = read_for(&mut agent, std::time::Duration::from_secs(5), "[]}").await;
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "the agent's poll: {answer:?}"
        );
        if stranger
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
            .await
            .is_err()
        {
            closed = true;
            break;
        }
        let (answer, ended) =
            read_for(&mut stranger, std::time::Duration::from_millis(300), "ok").await;
        answered += usize::from(answer.contains("200 OK"));
        if ended {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "a connection sending health checks for 5 s was never closed ({answered} answered)"
    );
    assert!(
        answered >= 1,
        "the stranger's health checks were answered first"
    );
    let answer = poll_over(&mut agent).await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "the agent's connection, authenticating all along, still serves past the deadline: {answer:?}"
    );
}

/// Attack (a host with a bootstrap token): a registration stores the host's credential
/// as Secret `fleetpatch-agent-<name>` in the controller's namespace, and undoing a
/// failed registration deleted that Secret by name, whatever it was. Under a release
/// named `fleetpatch-agent`, the name `gateway-tls` is free for an Agent, and Secret
/// `fleetpatch-agent-gateway-tls` is the gateway's certificate: storing the credential
/// fails (a Secret's type cannot change), and the undo deleted the certificate — the
/// gateway for the whole fleet, with a token and one request. A Secret that is not a
/// credential is refused and left alone.
#[tokio::test]
async fn a_registration_never_deletes_a_secret_that_is_not_a_credential() {
    let mut fixture = Fixture::new();
    let token = multi_use_token("join", &[]);
    cache(&mut fixture.writers.tokens, token);
    let request = json!({"name": "gateway-tls", "os": "Linux", "bootstrapToken": "t"});
    let answer = register_in_background(&fixture, request);
    let server = &mut fixture.server;
    answer_agent_creation(server, "gateway-tls").await;
    let secret_path =
        format!("/api/v1/namespaces/{NAMESPACE}/secrets/fleetpatch-agent-gateway-tls");
    server
        .answer("PATCH", &secret_path, 422, json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "Invalid", "code": 422, "message": "Secret \"fleetpatch-agent-gateway-tls\" is invalid: type: Invalid value: \"fleetpatch.io/agent-credential\": field is immutable"}))
        .await;
    server
        .answer("DELETE", "/apis/fleetpatch.io/v1alpha1/agents/gateway-tls", 200, json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "Agent", "metadata": {"name": "gateway-tls"}, "spec": {"mode": "External", "os": "Linux"}}))
        .await;
    server
        .answer("GET", &secret_path, 200, json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": "fleetpatch-agent-gateway-tls", "namespace": NAMESPACE, "uid": "tls-uid"}}))
        .await;
    let (status, body) = answer.await.unwrap();
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not an agent credential"),
        "{body}"
    );
    // No DELETE of the certificate follows.
    fixture.server.done().await;
}

/// Attack (whoever holds a leaked multi-use bootstrap token): such a token registered
/// any number of hosts for as long as it existed, each an Agent and a Secret in the
/// cluster, each a host that plans may target. A multi-use token registers at most its
/// `max-registrations` hosts (default 1000), counted on the token over the version
/// read; an exhausted token costs no API request.
#[tokio::test]
async fn a_multi_use_token_registers_at_most_its_max_registrations_hosts() {
    let mut fixture = Fixture::new();
    let mut token = multi_use_token("join", &[("max-registrations", "2")]);
    token.metadata.annotations = Some(
        [(
            credentials::REGISTRATIONS_ANNOTATION.to_string(),
            "1".to_string(),
        )]
        .into(),
    );
    cache(&mut fixture.writers.tokens, token.clone());
    let request = json!({"name": "web-2", "os": "Linux", "bootstrapToken": "t"});
    let answer = register_in_background(&fixture, request);
    let server = &mut fixture.server;
    let (agent, stored_credential, counted) = answer_registration(server, "web-2", "join").await;
    assert_eq!(
        counted["metadata"]["resourceVersion"], "7",
        "counted over the version read"
    );
    assert_eq!(
        counted["metadata"]["annotations"][credentials::REGISTRATIONS_ANNOTATION],
        "2"
    );
    cache_registration(&mut fixture, "web-2", agent, stored_credential);
    let (status, body) = answer.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    // The watch shows the count: the token is exhausted.
    token.metadata.annotations = Some(
        [(
            credentials::REGISTRATIONS_ANNOTATION.to_string(),
            "2".to_string(),
        )]
        .into(),
    );
    cache(&mut fixture.writers.tokens, token);
    let (status, _) = call(
        &fixture.ctx.gateway,
        "POST",
        "/agent/v1/register",
        None,
        json!({"name": "web-3", "os": "Linux", "bootstrapToken": "t"}),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    fixture.server.done().await;
}

/// Attack (the network, no credential, a few sources): a full gateway makes room by
/// telling a stranger's connection to close — a graceful shutdown, which hyper carries
/// out at once only on a connection between requests. A connection that has not yet
/// finished a request (one that never sent a byte, or a slowloris half-way through its
/// headers) is not "between requests": it stays open until `CLOSE_GRACE` (10 s) runs
/// out, holding its socket and buffers, while its slot no longer counts against the
/// cap (`open - evicting`). Every new connection from a flood thus evicts another and
/// adds one: the gateway holds `max_connections` plus ten seconds' worth of accepts
/// (bounded only by sources × `max_connections_per_source`), and the connection cap
/// — the bound on the process's sockets and memory — no longer bounds anything. A
/// connection closed to make room that has no request in progress must be gone at
/// once, so at most `max_connections` are ever open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_closed_to_make_room_do_not_stay_open_beyond_the_cap() {
    use tokio::io::AsyncWriteExt;
    let fixture = Fixture::new();
    let connect = serve_fixture(
        &fixture,
        super::serve::ServeLimits {
            max_connections: 4,
            max_connections_per_source: 0,
            ..Default::default()
        },
    );
    let mut held = Vec::new();
    for i in 0..24u8 {
        let mut stream = connect(2 + i % 6).await;
        // Half-way through its headers, as a slowloris is.
        let _ = stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n")
            .await;
        held.push(stream);
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let mut still_open = 0;
    for stream in &mut held {
        let (_, ended) = read_for(stream, std::time::Duration::from_millis(50), "\r\n\r\n").await;
        still_open += usize::from(!ended);
    }
    assert!(
        still_open <= 4,
        "{still_open} connections are open 1.5 s after the flood, with a cap of 4: those closed to make room linger"
    );
}

/// Attack (a host whose credential was revoked, or a bootstrap-token holder): a
/// connection that authenticated once is its agent's for good — `trust` is never
/// withdrawn. Within the agent's share it is never closed to make room and never
/// meets the authentication deadline, whatever happens to the credential after: the
/// admin deletes the Agent and its Secret (revocation, issue 11 item 6), every request
/// on the connection is now refused 401, yet it keeps its slot for as long as it sends
/// anything — a `/healthz` every 25 s — before the header deadline. A token holder who
/// registered its 1000 hosts holds 16 such slots each (the default cap, 16 384, in
/// all), and revoking them all frees none: only restarting the controller does. A
/// connection whose agent is no longer authenticated must lose the protection that
/// came with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_does_not_keep_its_connections_protected() {
    use tokio::io::AsyncWriteExt;
    let mut fixture = Fixture::new();
    known_host(&mut fixture);
    // One connection in all: the agent's share is one.
    let address = serve_on_loopback(
        &fixture,
        super::serve::ServeLimits {
            max_connections: 1,
            max_connections_per_source: 0,
            authentication_grace: std::time::Duration::from_millis(200),
            authentication_timeout: std::time::Duration::from_millis(800),
            ..Default::default()
        },
    );
    let connect = |last: u8| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::from(([127, 0, 0, last], 0)))
            .unwrap();
        socket.connect(address).await.unwrap()
    };
    let mut revoked = connect(2).await;
    // Its first request comes a moment after it connected, so the deadline's first
    // check finds it authenticated: what closes it is the lack of any later one.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    revoked
        .write_all(
            format!("GET /agent/v1/assignments HTTP/1.1\r\nHost: gateway\r\nAuthorization: {BEARER}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let (answer, _) = read_for(&mut revoked, std::time::Duration::from_secs(5), "\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "the poll: {answer:?}");
    // The admin revokes web-1: its Agent and its credential are deleted.
    revoke_known_host(&mut fixture);
    let (status, _) = call(
        &fixture.ctx.gateway,
        "GET",
        "/agent/v1/assignments",
        Some(BEARER),
        json!(null),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "web-1 is revoked");
    // The revoked host keeps its connection busy enough not to be idle.
    let keep = tokio::spawn(async move {
        loop {
            if revoked
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
            let (_, ended) =
                read_for(&mut revoked, std::time::Duration::from_millis(300), "ok").await;
            if ended {
                return;
            }
        }
    });
    let started = tokio::time::Instant::now();
    let mut got_in = false;
    while started.elapsed() < std::time::Duration::from_secs(4) {
        let mut fresh = connect(3).await;
        if fresh
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
            .await
            .is_ok()
        {
            let (answer, _) =
                read_for(&mut fresh, std::time::Duration::from_millis(300), "ok").await;
            if answer.starts_with("HTTP/1.1 200") {
                got_in = true;
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    keep.abort();
    assert!(
        got_in,
        "for 4 s, well past the authentication deadline, the revoked agent's connection kept the gateway's only slot"
    );
}
