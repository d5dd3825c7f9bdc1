//! The fidelity of `fleetpatch dev` against the real kube-apiserver. One test starts a
//! private real control plane (kube-apiserver, etcd, and the controller manager's garbage
//! collector and disruption controller) and a `fleetpatch dev`, runs the same scenarios
//! against both, and compares what came back — status codes, `Status` objects with their
//! causes, warnings, watch events, managedFields, Tables, garbage collection, tokens and
//! evictions — once the volatile parts (uids, resourceVersions, timestamps, ages,
//! generated names, tokens, server addresses) are normalised.
//!
//! The differences we accept are listed in [`ACCEPTED`], each with why. Any other
//! difference fails the test, and so does an accepted one that no longer shows up, so the
//! list (and the README's list of known gaps) stays true.

#![cfg(feature = "full")]

mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use axum::http::{Method, Request, header};
use futures::{AsyncBufReadExt, StreamExt};
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use regex::Regex;
use serde_json::{Value, json};

use support::Cluster;

/// Differences between the two servers that we accept, by where they show up
/// (`scenario/step/JSON path`, `*` matching anything).
struct Accepted {
    at: &'static str,
    why: &'static str,
}

const ACCEPTED: &[Accepted] = &[
    Accepted {
        at: "tokens/pod-as-created/body/spec/*",
        why: "built-in kinds get no defaults and no admission plugins: a real server fills in \
              restartPolicy, dnsPolicy, schedulerName, tolerations and the rest, and mounts a \
              kube-api-access token volume",
    },
    Accepted {
        at: "tokens/pod-as-created/body/metadata/managedFields/0/fieldsV1/f:spec/*",
        why: "the same defaults, which a real server records as owned by the pod's creator",
    },
    Accepted {
        at: "tokens/delete-bound-pod/metadata/managedFields/0/fieldsV1/f:spec/*",
        why: "the same defaults, which a real server records as owned by the pod's creator",
    },
    Accepted {
        at: "core_object_errors/configmaps-in-a-new-namespace/*",
        why: "no root CA publisher: the dev server serves plain HTTP and has no CA to put in \
              every namespace's kube-root-ca.crt ConfigMap",
    },
    Accepted {
        at: "custom_resource_errors/patch-malformed/body/message",
        why: "the wording of a JSON syntax error comes from the JSON parser (Go's encoding/json \
              there, serde_json here); code and reason match",
    },
    Accepted {
        at: "tables/configmaps/*",
        why: "Table columns of built-in kinds approximate the API server's own printers (Name, \
              a few usual columns, Age); those of custom resources match exactly",
    },
];

const USER_AGENT: &str = "compat-suite/1.0 (linux/amd64) fleetpatch";
const TASKS: &str = "/apis/fleetpatch.io/v1alpha1";
/// How long a scenario waits for a controller's work (garbage collection, disruption
/// budgets) before it records what it has.
const SETTLE: Duration = Duration::from_secs(30);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What one request got back.
#[derive(Clone, Debug)]
struct Answer {
    code: u16,
    body: Value,
    warnings: Vec<String>,
}

impl Answer {
    fn to_value(&self) -> Value {
        let mut value = json!({"code": self.code, "body": self.body});
        if !self.warnings.is_empty() {
            value["warnings"] = json!(self.warnings);
        }
        value
    }

    fn rv(&self) -> String {
        self.body["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// One request and what came back; a server that does not answer within
/// [`REQUEST_TIMEOUT`] is an answer too (code 0).
async fn exchange(
    client: &Client,
    side: &str,
    method: Method,
    path: &str,
    headers: &[(header::HeaderName, &str)],
    body: Option<Vec<u8>>,
) -> Answer {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::USER_AGENT, USER_AGENT);
    for (name, value) in headers {
        request = request.header(name, *value);
    }
    let request = request
        .body(kube::client::Body::from(body.unwrap_or_default()))
        .unwrap();
    let exchange = async {
        let response = client
            .send(request)
            .await
            .unwrap_or_else(|e| panic!("{}: {path}: {e}", side));
        let code = response.status().as_u16();
        let warnings = response
            .headers()
            .get_all(header::WARNING)
            .iter()
            .map(|v| v.to_str().unwrap_or_default().to_string())
            .collect();
        let bytes = response.into_body().collect_bytes().await.unwrap();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Answer {
            code,
            body,
            warnings,
        }
    };
    // A server that never answers is a difference to report, not a hung test.
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Answer {
            code: 0,
            body: json!(format!("no answer within {REQUEST_TIMEOUT:?}")),
            warnings: Vec::new(),
        })
}

/// One API server under test.
struct Side {
    name: &'static str,
    cluster: Cluster,
    config: kube::Config,
    client: Client,
}

impl Side {
    async fn new(name: &'static str, cluster: Cluster) -> Self {
        let kubeconfig = Kubeconfig::read_from(&cluster.kubeconfig).unwrap();
        let mut config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .unwrap();
        // A 429 is an answer to compare, not something to retry.
        config.default_retry = false;
        let client = Client::try_from(config.clone()).unwrap();
        Self {
            name,
            cluster,
            config,
            client,
        }
    }

    /// GET `path` authenticated by nothing but a bearer `token`.
    async fn get_with_token(&self, path: &str, token: &str) -> Answer {
        let mut config = self.config.clone();
        config.auth_info = serde_json::from_value(json!({"token": token})).unwrap();
        let client = Client::try_from(config).unwrap();
        exchange(&client, self.name, Method::GET, path, &[], None).await
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(header::HeaderName, &str)],
        body: Option<Vec<u8>>,
    ) -> Answer {
        exchange(&self.client, self.name, method, path, headers, body).await
    }

    async fn get(&self, path: &str) -> Answer {
        self.call(Method::GET, path, &[], None).await
    }

    async fn get_as(&self, path: &str, accept: &str) -> Answer {
        self.call(Method::GET, path, &[(header::ACCEPT, accept)], None)
            .await
    }

    async fn post(&self, path: &str, body: &Value) -> Answer {
        self.send_json(Method::POST, path, "application/json", body)
            .await
    }

    async fn put(&self, path: &str, body: &Value) -> Answer {
        self.send_json(Method::PUT, path, "application/json", body)
            .await
    }

    async fn merge(&self, path: &str, body: &Value) -> Answer {
        self.send_json(Method::PATCH, path, "application/merge-patch+json", body)
            .await
    }

    async fn apply(&self, path: &str, manager: &str, force: bool, body: &Value) -> Answer {
        let path = format!("{path}?fieldManager={manager}&force={force}");
        self.send_json(Method::PATCH, &path, "application/apply-patch+yaml", body)
            .await
    }

    async fn delete(&self, path: &str, options: Option<&Value>) -> Answer {
        match options {
            Some(options) => {
                self.send_json(Method::DELETE, path, "application/json", options)
                    .await
            }
            None => self.call(Method::DELETE, path, &[], None).await,
        }
    }

    async fn send_json(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: &Value,
    ) -> Answer {
        self.call(
            method,
            path,
            &[(header::CONTENT_TYPE, content_type)],
            Some(serde_json::to_vec(body).unwrap()),
        )
        .await
    }

    /// GETs `path` until `done` holds or `limit` passes; the last answer.
    async fn wait_for(
        &self,
        path: &str,
        limit: Duration,
        done: impl Fn(&Answer) -> bool,
    ) -> Answer {
        let deadline = Instant::now() + limit;
        loop {
            let answer = self.get(path).await;
            if done(&answer) || Instant::now() > deadline {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Opens a watch on `path` (a query with `watch=true`) and collects its events until
    /// `done` holds for them, the server ends the stream, or `limit` passes.
    fn watch(
        &self,
        path: &str,
        limit: Duration,
        done: impl Fn(&[Value]) -> bool + Send + 'static,
    ) -> tokio::task::JoinHandle<Vec<Value>> {
        let client = self.client.clone();
        let request = Request::builder()
            .uri(path)
            .header(header::USER_AGENT, USER_AGENT)
            .body(Vec::new())
            .unwrap();
        tokio::spawn(async move {
            let mut events = Vec::new();
            let deadline = tokio::time::Instant::now() + limit;
            let stream =
                match tokio::time::timeout_at(deadline, client.request_stream(request)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(err)) => return vec![json!({"watch failed": err.to_string()})],
                    Err(_) => return vec![json!({"watch failed": "no answer"})],
                };
            let mut lines = Box::pin(stream).lines();
            while let Ok(Some(Ok(line))) = tokio::time::timeout_at(deadline, lines.next()).await {
                events.push(serde_json::from_str(&line).unwrap_or(Value::String(line)));
                if done(&events) {
                    break;
                }
            }
            events
        })
    }

    /// A namespace of the scenario's own, ready for pods (on a real server, once the
    /// ServiceAccount controller has made its `default` ServiceAccount).
    async fn namespace(&self, name: &str) {
        let created = self
            .post(
                "/api/v1/namespaces",
                &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
            )
            .await;
        assert_eq!(
            created.code, 201,
            "{}: namespace {name}: {:?}",
            self.name, created
        );
        let account = self
            .wait_for(
                &format!("/api/v1/namespaces/{name}/serviceaccounts/default"),
                SETTLE,
                |a| a.code == 200,
            )
            .await;
        assert_eq!(
            account.code, 200,
            "{}: no default ServiceAccount in {name}",
            self.name
        );
    }
}

/// The answers one scenario got from one server, step by step.
#[derive(Default)]
struct Transcript {
    steps: Vec<(String, Value)>,
}

impl Transcript {
    fn record(&mut self, step: &str, value: Value) {
        assert!(
            !self.steps.iter().any(|(s, _)| s == step),
            "step {step} recorded twice"
        );
        self.steps.push((step.to_string(), value));
    }

    fn answer(&mut self, step: &str, answer: &Answer) {
        self.record(step, answer.to_value());
    }
}

static UUID: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}").unwrap()
});
static TIME: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})").unwrap()
});
static SERVER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(https?://)?127\.0\.0\.1:\d+").unwrap());
static OLD_RV: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"too old resource version: \d+ \(\d+\)").unwrap());
static PRECONDITION_RV: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"ResourceVersion in (the precondition|record) \(\d+\)").unwrap());

/// Replaces what differs between any two runs, even against the same server: uids
/// (named after where they first appear, so "the same uid" survives), resourceVersions,
/// timestamps, Table ages, names made from `generateName`, tokens, addresses.
#[derive(Default)]
struct Normaliser {
    uids: HashMap<String, String>,
    generated: Vec<(String, String)>,
}

impl Normaliser {
    fn transcript(mut self, transcript: Transcript) -> Vec<(String, Value)> {
        for (_, value) in &transcript.steps {
            self.collect_generated(value);
        }
        self.generated
            .sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
        transcript
            .steps
            .into_iter()
            .map(|(step, mut value)| {
                self.value(&mut value, &step);
                (step, value)
            })
            .collect()
    }

    fn collect_generated(&mut self, value: &Value) {
        match value {
            Value::Object(map) => {
                if let (Some(Value::String(prefix)), Some(Value::String(name))) =
                    (map.get("generateName"), map.get("name"))
                    && name.starts_with(prefix.as_str())
                    && name != prefix
                {
                    self.generated
                        .push((name.clone(), format!("{prefix}<generated>")));
                }
                map.values().for_each(|v| self.collect_generated(v));
            }
            Value::Array(items) => items.iter().for_each(|v| self.collect_generated(v)),
            _ => {}
        }
    }

    fn value(&mut self, value: &mut Value, at: &str) {
        match value {
            Value::Object(map) => {
                if let (Some(Value::Array(columns)), Some(Value::Array(rows))) =
                    (map.get("columnDefinitions").cloned(), map.get_mut("rows"))
                {
                    for row in rows {
                        for (i, column) in columns.iter().enumerate() {
                            if column["type"] == "date"
                                && let Some(cell) = row["cells"].get_mut(i)
                                && cell.is_string()
                            {
                                *cell = json!("<age>");
                            }
                        }
                    }
                }
                // Causes of an apply conflict come in the order of a Go map of
                // managers (random on the real server); within a manager, in order.
                if let Some(Value::Array(causes)) = map.get_mut("causes")
                    && causes.iter().all(|c| c["reason"] == "FieldManagerConflict")
                {
                    causes.sort_by_key(|c| c["message"].as_str().unwrap_or_default().to_string());
                }
                let entries = std::mem::take(map);
                for (key, mut v) in entries {
                    let here = format!("{at}/{}", escape(&key));
                    match (key.as_str(), &v) {
                        ("resourceVersion", Value::String(_)) => v = json!("<rv>"),
                        ("serverAddress", Value::String(_)) => v = json!("<server>"),
                        ("token", Value::String(t)) if !t.is_empty() => v = json!("<token>"),
                        _ => self.value(&mut v, &here),
                    }
                    let key = self.text(&key, &here);
                    map.insert(key, v);
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    self.value(item, &format!("{at}/{i}"));
                }
            }
            Value::String(text) => *text = self.text(text, at),
            _ => {}
        }
    }

    fn text(&mut self, text: &str, at: &str) -> String {
        let mut out = UUID
            .replace_all(text, |c: &regex::Captures| {
                self.uids
                    .entry(c[0].to_string())
                    .or_insert_with(|| format!("<uid of {at}>"))
                    .clone()
            })
            .into_owned();
        out = TIME.replace_all(&out, "<time>").into_owned();
        out = SERVER.replace_all(&out, "<server>").into_owned();
        out = OLD_RV
            .replace_all(&out, "too old resource version: <rv> (<rv>)")
            .into_owned();
        out = PRECONDITION_RV
            .replace_all(&out, "ResourceVersion in $1 (<rv>)")
            .into_owned();
        for (name, replacement) in &self.generated {
            out = out.replace(name, replacement);
        }
        out
    }
}

/// One place the two servers answered differently.
#[derive(Debug)]
struct Difference {
    at: String,
    real: Option<Value>,
    dev: Option<Value>,
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn diff(at: &str, real: Option<&Value>, dev: Option<&Value>, out: &mut Vec<Difference>) {
    match (real, dev) {
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                diff(
                    &format!("{at}/{}", escape(key)),
                    a.get(key),
                    b.get(key),
                    out,
                );
            }
        }
        (Some(Value::Array(a)), Some(Value::Array(b))) => {
            for i in 0..a.len().max(b.len()) {
                diff(&format!("{at}/{i}"), a.get(i), b.get(i), out);
            }
        }
        (a, b) if a != b => out.push(Difference {
            at: at.to_string(),
            real: a.cloned(),
            dev: b.cloned(),
        }),
        _ => {}
    }
}

/// `*` matches any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let Some((first, rest)) = parts.split_first() else {
        return text.is_empty();
    };
    let Some(mut remaining) = text.strip_prefix(first) else {
        return false;
    };
    for (i, part) in rest.iter().enumerate() {
        if i == rest.len() - 1 {
            return remaining.ends_with(part);
        }
        match remaining.find(part) {
            Some(at) => remaining = &remaining[at + part.len()..],
            None => return false,
        }
    }
    remaining.is_empty()
}

/// Every scenario's differences, checked against [`ACCEPTED`] at the end.
#[derive(Default)]
struct Report {
    differences: Vec<Difference>,
    scenarios: Vec<String>,
}

impl Report {
    fn compare(&mut self, scenario: &str, real: Transcript, dev: Transcript) {
        self.scenarios.push(scenario.to_string());
        let real = Normaliser::default().transcript(real);
        let dev = Normaliser::default().transcript(dev);
        // COMPAT_DUMP=DIR keeps both normalised transcripts, to read side by side.
        if let Some(dir) = std::env::var_os("COMPAT_DUMP") {
            for (side, steps) in [("real", &real), ("dev", &dev)] {
                let text: String = steps
                    .iter()
                    .map(|(step, v)| {
                        format!("## {step}\n{}\n", serde_json::to_string_pretty(v).unwrap())
                    })
                    .collect();
                let path = PathBuf::from(&dir).join(format!("{scenario}.{side}.txt"));
                std::fs::write(path, text).unwrap();
            }
        }
        let real: BTreeMap<String, Value> = real.into_iter().collect();
        let dev: BTreeMap<String, Value> = dev.into_iter().collect();
        let steps: std::collections::BTreeSet<&String> = real.keys().chain(dev.keys()).collect();
        for step in steps {
            diff(
                &format!("{scenario}/{step}"),
                real.get(step),
                dev.get(step),
                &mut self.differences,
            );
        }
    }

    fn finish(self) {
        let show = |v: &Option<Value>| match v {
            Some(v) => serde_json::to_string(v).unwrap(),
            None => "(absent)".into(),
        };
        let mut unexpected = Vec::new();
        let mut used = vec![false; ACCEPTED.len()];
        for difference in &self.differences {
            match ACCEPTED.iter().position(|a| glob(a.at, &difference.at)) {
                Some(i) => used[i] = true,
                None => unexpected.push(format!(
                    "{}\n    real: {}\n    dev:  {}",
                    difference.at,
                    show(&difference.real),
                    show(&difference.dev)
                )),
            }
        }
        let stale: Vec<String> = ACCEPTED
            .iter()
            .zip(&used)
            .filter(|(a, used)| {
                !**used
                    && self
                        .scenarios
                        .iter()
                        .any(|s| a.at.starts_with(&format!("{s}/")))
            })
            .map(|(a, _)| format!("{} ({})", a.at, a.why))
            .collect();
        eprintln!(
            "compat: {} scenarios, {} differences, {} accepted",
            self.scenarios.len(),
            self.differences.len(),
            self.differences.len() - unexpected.len()
        );
        assert!(
            unexpected.is_empty() && stale.is_empty(),
            "fleetpatch dev answers differently from kube-apiserver:\n\n{}\n\naccepted differences that no longer show up (remove them here and in the README):\n{}",
            unexpected.join("\n"),
            stale.join("\n")
        );
    }
}

/// Runs one scenario against both servers at once and compares the transcripts.
macro_rules! scenario {
    ($report:expr, $real:expr, $dev:expr, $name:ident) => {{
        let started = Instant::now();
        let (real, dev) = tokio::join!($name($real), $name($dev));
        eprintln!(
            "compat: {} took {:.1}s",
            stringify!($name),
            started.elapsed().as_secs_f64()
        );
        $report.compare(stringify!($name), real, dev);
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_server_answers_like_the_real_api_server() {
    let started = Instant::now();
    let home = tempfile::tempdir().unwrap();
    let real_home: PathBuf = home.path().join("real");
    let dev_home: PathBuf = home.path().join("dev");
    std::fs::create_dir_all(&real_home).unwrap();
    std::fs::create_dir_all(&dev_home).unwrap();
    let real = tokio::task::spawn_blocking(move || Cluster::real(&real_home));
    let dev = Cluster::dev(&dev_home);
    let Some(real) = real.await.unwrap() else {
        return;
    };
    eprintln!(
        "compat: both servers up after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    tokio::task::block_in_place(|| {
        real.install_crds();
        dev.install_crds();
    });
    let real = Side::new("real", real).await;
    let dev = Side::new("dev", dev).await;
    let (real, dev) = (&real, &dev);

    let mut report = Report::default();
    scenario!(report, real, dev, custom_resource_errors);
    scenario!(report, real, dev, core_object_errors);
    scenario!(report, real, dev, watch_events);
    scenario!(report, real, dev, server_side_apply);
    scenario!(report, real, dev, tables);
    scenario!(report, real, dev, garbage_collection);
    scenario!(report, real, dev, tokens);
    scenario!(report, real, dev, evictions);
    eprintln!("compat: done after {:.1}s", started.elapsed().as_secs_f64());
    if std::env::var_os("COMPAT_LOG").is_some() {
        eprintln!("{}", real.cluster.server_log());
    }
    report.finish();
}

// ---------------------------------------------------------------------------------------
// Objects the scenarios write.

fn set(mut value: Value, pointer: &str, new: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("a JSON pointer");
    let mut target = &mut value;
    for part in parent.split('/').filter(|p| !p.is_empty()) {
        target = match part.parse::<usize>() {
            Ok(i) if target.is_array() => &mut target[i],
            _ => {
                if target.get(part).is_none() {
                    target[part] = json!({});
                }
                &mut target[part]
            }
        };
    }
    match key.parse::<usize>() {
        Ok(i) if target.is_array() => target[i] = new,
        _ => target[key] = new,
    }
    value
}

fn unset(mut value: Value, pointer: &str) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("a JSON pointer");
    if let Some(Value::Object(map)) = value.pointer_mut(parent) {
        map.remove(key);
    }
    value
}

fn task(name: &str) -> Value {
    json!({
        "apiVersion": "fleetpatch.io/v1alpha1", "kind": "Task",
        "metadata": {"name": name},
        "spec": {
            "os": "Windows", "type": "ChangeRegistryKey", "timeoutMinutes": 5,
            "description": "Turn off the first-run wizard.",
            "changeRegistryKey": {
                "keyPath": "HKEY_LOCAL_MACHINE\\SOFTWARE\\Policies\\Microsoft\\Internet Explorer\\Main",
                "valueType": "REG_DWORD", "valueName": "DisableFirstRunCustomize",
                "valueData": "1", "createIfMissing": true,
            },
        },
    })
}

fn config_map(name: &str, data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data})
}

fn owned_by(mut value: Value, owners: &[&Answer], block: bool) -> Value {
    let refs: Vec<Value> = owners
        .iter()
        .map(|o| {
            json!({
                "apiVersion": o.body["apiVersion"], "kind": o.body["kind"],
                "name": o.body["metadata"]["name"], "uid": o.body["metadata"]["uid"],
                "blockOwnerDeletion": block,
            })
        })
        .collect();
    value["metadata"]["ownerReferences"] = json!(refs);
    value
}

fn events_of(events: &[Value], kind: &str) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e["type"] == kind)
        .cloned()
        .collect()
}

fn names_and_types(events: &[Value]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e["type"] != "BOOKMARK")
        .map(|e| json!([e["type"], e["object"]["metadata"]["name"]]))
        .collect()
}

fn saw_added(events: &[Value], name: &str) -> bool {
    events
        .iter()
        .any(|e| e["type"] == "ADDED" && e["object"]["metadata"]["name"] == name)
}

// ---------------------------------------------------------------------------------------
// Scenarios. Each writes into a namespace of its own and records what it got back.

/// Create, update, patch and delete errors for custom resources: schema and CEL
/// validation of the CRDs in crds/, unknown fields, 404, 409, AlreadyExists.
async fn custom_resource_errors(side: &Side) -> Transcript {
    let mut t = Transcript::default();
    let ns = "compat-cr-errors";
    side.namespace(ns).await;
    let tasks = format!("{TASKS}/namespaces/{ns}/tasks");
    let created = side.post(&tasks, &task("valid")).await;
    t.answer("create", &created);
    t.answer("create-again", &side.post(&tasks, &task("valid")).await);
    let invalid = [
        ("enum", set(task("x"), "/spec/os", json!("Solaris"))),
        (
            "type",
            set(task("x"), "/spec/timeoutMinutes", json!("five")),
        ),
        ("required", unset(task("x"), "/spec/type")),
        (
            "max-length",
            set(task("x"), "/spec/description", json!("d".repeat(1100))),
        ),
        (
            "pattern",
            set(
                unset(
                    set(task("x"), "/spec/type", json!("RunScript")),
                    "/spec/changeRegistryKey",
                ),
                "/spec/runScript",
                json!({"scriptRef": {"name": "Not_A_Name"}}),
            ),
        ),
        (
            "cel",
            set(
                task("x"),
                "/spec/changeRegistryKey/keyPath",
                json!("HKEY_LOCAL_MACHINE\\SOFTWARE\\"),
            ),
        ),
        (
            "cel-field-path",
            set(task("x"), "/spec/changeRegistryKey/valueData", json!("abc")),
        ),
        (
            "cel-several",
            set(task("x"), "/spec/type", json!("RunScript")),
        ),
        (
            "cel-number",
            set(task("x"), "/spec/timeoutMinutes", json!(0)),
        ),
        (
            "schema-and-cel",
            set(
                set(task("x"), "/spec/os", json!("Solaris")),
                "/spec/changeRegistryKey/keyPath",
                json!("HKLM/x"),
            ),
        ),
        ("bad-name", task("Bad_Name")),
    ];
    for (step, body) in &invalid {
        t.answer(step, &side.post(&tasks, body).await);
    }
    let bogus = set(
        set(task("unknown"), "/spec/bogus", json!(true)),
        "/spec/changeRegistryKey/alsoBogus",
        json!(1),
    );
    for validation in ["Strict", "Warn", "Ignore"] {
        let name = format!("unknown-{}", validation.to_lowercase());
        let body = set(bogus.clone(), "/metadata/name", json!(name));
        let path = format!("{tasks}?fieldValidation={validation}");
        t.answer(
            &format!("unknown-fields-{validation}"),
            &side.post(&path, &body).await,
        );
    }
    let body = set(bogus.clone(), "/metadata/name", json!("unknown-default"));
    t.answer("unknown-fields-default", &side.post(&tasks, &body).await);
    let duplicate = br#"{"apiVersion":"fleetpatch.io/v1alpha1","kind":"Task","metadata":{"name":"dup"},"spec":{"os":"Linux","os":"Windows","type":"Reboot"}}"#;
    t.answer(
        "duplicate-field-Strict",
        &side
            .call(
                Method::POST,
                &format!("{tasks}?fieldValidation=Strict"),
                &[(header::CONTENT_TYPE, "application/json")],
                Some(duplicate.to_vec()),
            )
            .await,
    );
    t.answer(
        "kind-mismatch",
        &side
            .post(&tasks, &set(task("k"), "/kind", json!("Script")))
            .await,
    );
    t.answer(
        "generate-name",
        &side
            .post(
                &tasks,
                &set(
                    unset(task("g"), "/metadata/name"),
                    "/metadata/generateName",
                    json!("gen-"),
                ),
            )
            .await,
    );
    t.answer("get-missing", &side.get(&format!("{tasks}/nope")).await);
    t.answer(
        "get-in-missing-namespace",
        &side
            .get(&format!("{TASKS}/namespaces/compat-nowhere/tasks/x"))
            .await,
    );
    t.answer(
        "create-in-missing-namespace",
        &side
            .post(
                &format!("{TASKS}/namespaces/compat-nowhere/tasks"),
                &task("x"),
            )
            .await,
    );
    let valid = format!("{tasks}/valid");
    let updated = side
        .put(
            &valid,
            &set(created.body.clone(), "/spec/timeoutMinutes", json!(6)),
        )
        .await;
    t.answer("update", &updated);
    t.answer(
        "update-stale",
        &side
            .put(
                &valid,
                &set(created.body.clone(), "/spec/timeoutMinutes", json!(7)),
            )
            .await,
    );
    t.answer(
        "update-without-resource-version",
        &side
            .put(
                &valid,
                &unset(
                    set(updated.body.clone(), "/spec/timeoutMinutes", json!(8)),
                    "/metadata/resourceVersion",
                ),
            )
            .await,
    );
    t.answer(
        "update-name-mismatch",
        &side
            .put(
                &valid,
                &set(updated.body.clone(), "/metadata/name", json!("other")),
            )
            .await,
    );
    t.answer(
        "update-invalid",
        &side
            .put(
                &valid,
                &set(
                    updated.body.clone(),
                    "/spec/changeRegistryKey/keyPath",
                    json!("HKLM"),
                ),
            )
            .await,
    );
    t.answer(
        "patch-invalid",
        &side
            .merge(
                &valid,
                &json!({"spec": {"changeRegistryKey": {"valueData": "x"}}}),
            )
            .await,
    );
    t.answer(
        "patch-missing",
        &side.merge(&format!("{tasks}/nope"), &json!({})).await,
    );
    t.answer(
        "patch-malformed",
        &side
            .call(
                Method::PATCH,
                &valid,
                &[(header::CONTENT_TYPE, "application/merge-patch+json")],
                Some(b"{".to_vec()),
            )
            .await,
    );
    t.answer(
        "json-patch-test-fails",
        &side
            .send_json(
                Method::PATCH,
                &valid,
                "application/json-patch+json",
                &json!([{"op": "test", "path": "/spec/os", "value": "Linux"}]),
            )
            .await,
    );
    t.answer(
        "status",
        &side
            .merge(
                &format!("{valid}/status"),
                &json!({"status": {"observedGeneration": 2}}),
            )
            .await,
    );
    t.answer(
        "status-invalid",
        &side
            .merge(
                &format!("{valid}/status"),
                &json!({"status": {"observedGeneration": "two"}}),
            )
            .await,
    );
    let agents = format!("{TASKS}/agents");
    let agent = json!({
        "apiVersion": "fleetpatch.io/v1alpha1", "kind": "Agent",
        "metadata": {"name": "compat-agent"}, "spec": {"mode": "External", "os": "Linux"},
    });
    t.answer("agent-create", &side.post(&agents, &agent).await);
    t.answer(
        "agent-transition-rule",
        &side
            .merge(
                &format!("{agents}/compat-agent"),
                &json!({"spec": {"mode": "Node"}}),
            )
            .await,
    );
    t.answer(
        "agent-under-a-namespace",
        &side
            .post(&format!("{TASKS}/namespaces/{ns}/agents"), &agent)
            .await,
    );
    t.answer(
        "delete-precondition-uid",
        &side
            .delete(
                &valid,
                Some(&json!({"preconditions": {"uid": "00000000-0000-0000-0000-000000000000"}})),
            )
            .await,
    );
    t.answer(
        "delete-precondition-resource-version",
        &side
            .delete(
                &valid,
                Some(&json!({"preconditions": {"resourceVersion": created.rv()}})),
            )
            .await,
    );
    t.answer("list", &side.get(&tasks).await);
    t.answer(
        "list-by-name",
        &side
            .get(&format!("{tasks}?fieldSelector=metadata.name%3Dvalid"))
            .await,
    );
    t.answer(
        "list-by-an-unsupported-field",
        &side
            .get(&format!("{tasks}?fieldSelector=spec.os%3DWindows"))
            .await,
    );
    t.answer("delete", &side.delete(&valid, None).await);
    t.answer("delete-again", &side.delete(&valid, None).await);
    t.answer(
        "agent-delete",
        &side.delete(&format!("{agents}/compat-agent"), None).await,
    );
    t
}

/// The same for built-in kinds: ConfigMaps, Secrets, Namespaces.
async fn core_object_errors(side: &Side) -> Transcript {
    let mut t = Transcript::default();
    let ns = "compat-core";
    side.namespace(ns).await;
    let cms = format!("/api/v1/namespaces/{ns}/configmaps");
    let created = side.post(&cms, &config_map("c1", json!({"a": "1"}))).await;
    t.answer("create", &created);
    t.answer(
        "create-again",
        &side.post(&cms, &config_map("c1", json!({}))).await,
    );
    let bogus = set(config_map("bogus", json!({})), "/bogus", json!(true));
    for validation in ["Strict", "Warn"] {
        let body = set(
            bogus.clone(),
            "/metadata/name",
            json!(format!("bogus-{}", validation.to_lowercase())),
        );
        t.answer(
            &format!("unknown-field-{validation}"),
            &side
                .post(&format!("{cms}?fieldValidation={validation}"), &body)
                .await,
        );
    }
    t.answer(
        "bad-name",
        &side.post(&cms, &config_map("Bad_Name", json!({}))).await,
    );
    t.answer(
        "bad-data-key",
        &side
            .post(&cms, &config_map("bad-key", json!({"no spaces": "x"})))
            .await,
    );
    let c1 = format!("{cms}/c1");
    t.answer(
        "update",
        &side
            .put(&c1, &set(created.body.clone(), "/data/a", json!("2")))
            .await,
    );
    t.answer(
        "update-stale",
        &side
            .put(&c1, &set(created.body.clone(), "/data/a", json!("3")))
            .await,
    );
    t.answer("get-missing", &side.get(&format!("{cms}/nope")).await);
    t.answer("delete", &side.delete(&c1, None).await);
    t.answer("delete-again", &side.delete(&c1, None).await);
    let secrets = format!("/api/v1/namespaces/{ns}/secrets");
    t.answer(
        "secret-string-data",
        &side
            .post(
                &secrets,
                &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s1"},
                        "stringData": {"password": "s3cret"}}),
            )
            .await,
    );
    let contents = side
        .get(&format!("/api/v1/namespaces/{ns}/configmaps"))
        .await;
    let names: Vec<&Value> = contents.body["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| &i["metadata"]["name"])
        .collect();
    t.record("configmaps-in-a-new-namespace", json!(names));
    let gone = "compat-core-gone";
    side.namespace(gone).await;
    side.post(
        &format!("/api/v1/namespaces/{gone}/configmaps"),
        &config_map("x", json!({})),
    )
    .await;
    t.answer(
        "delete-namespace",
        &side
            .delete(&format!("/api/v1/namespaces/{gone}"), None)
            .await,
    );
    t.answer(
        "namespace-gone",
        &side
            .wait_for(&format!("/api/v1/namespaces/{gone}"), SETTLE, |a| {
                a.code == 404
            })
            .await,
    );
    t
}

/// Watch events for a series of writes, with selectors, bookmarks, initial events and a
/// resourceVersion that is too old.
async fn watch_events(side: &Side) -> Transcript {
    let mut t = Transcript::default();
    let ns = "compat-watch";
    side.namespace(ns).await;
    let cms = format!("/api/v1/namespaces/{ns}/configmaps");
    let labelled = |name: &str, tier: &str| {
        set(
            config_map(name, json!({"v": "1"})),
            "/metadata/labels",
            json!({"app": "compat", "tier": tier}),
        )
    };
    let start = side.post(&cms, &labelled("w0", "gold")).await;
    let rv = start.rv();

    // Bookmarks are best-effort on the real server; a longer watch gives a loaded
    // machine's apiserver time to send one.
    let all = side.watch(
        &format!(
            "{cms}?watch=true&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=12"
        ),
        Duration::from_secs(25),
        |events| saw_added(events, "sentinel") && events.iter().any(|e| e["type"] == "BOOKMARK"),
    );
    let gold = side.watch(
        &format!(
            "{cms}?watch=true&resourceVersion={rv}&labelSelector=tier%3Dgold&timeoutSeconds=10"
        ),
        Duration::from_secs(20),
        |events| saw_added(events, "sentinel"),
    );
    side.post(&cms, &labelled("w1", "silver")).await;
    side.merge(&format!("{cms}/w1"), &json!({"data": {"v": "2"}}))
        .await;
    let current = side.get(&format!("{cms}/w1")).await;
    side.put(
        &format!("{cms}/w1"),
        &set(current.body, "/data/v", json!("3")),
    )
    .await;
    // No change, no event.
    side.merge(&format!("{cms}/w1"), &json!({"data": {"v": "3"}}))
        .await;
    side.merge(
        &format!("{cms}/w1"),
        &json!({"metadata": {"labels": {"tier": "gold"}}}),
    )
    .await;
    side.merge(&format!("{cms}/w1"), &json!({"data": {"v": "4"}}))
        .await;
    side.merge(
        &format!("{cms}/w1"),
        &json!({"metadata": {"labels": {"tier": "silver"}}}),
    )
    .await;
    side.delete(&format!("{cms}/w1"), None).await;
    let sentinel = side.post(&cms, &labelled("sentinel", "gold")).await;

    let all = all.await.unwrap();
    let changes: Vec<&Value> = all.iter().filter(|e| e["type"] != "BOOKMARK").collect();
    t.record("events", json!(changes));
    let mut bookmark = events_of(&all, "BOOKMARK").first().cloned();
    if bookmark.is_none() {
        // kube-apiserver sends bookmarks on its own timer, and a busy one can let a
        // 12 s watch end without one: ask once more, on a quiet watch from the last
        // write, before calling the bookmark missing.
        let quiet = side.watch(
            &format!(
                "{cms}?watch=true&resourceVersion={}&allowWatchBookmarks=true&timeoutSeconds=30",
                sentinel.rv()
            ),
            Duration::from_secs(40),
            |events| events.iter().any(|e| e["type"] == "BOOKMARK"),
        );
        bookmark = events_of(&quiet.await.unwrap(), "BOOKMARK")
            .first()
            .cloned();
    }
    t.record("bookmark", bookmark.unwrap_or(Value::Null));
    t.record(
        "selected-sequence",
        json!(names_and_types(&gold.await.unwrap())),
    );

    let initial = side
        .watch(
            &format!("{cms}?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&labelSelector=app%3Dcompat&timeoutSeconds=10"),
            Duration::from_secs(20),
            |events| events.iter().any(|e| e["type"] == "BOOKMARK" && !e["object"]["metadata"]["annotations"].is_null()),
        )
        .await
        .unwrap();
    t.record("initial-events", json!(names_and_types(&initial)));
    t.record(
        "initial-events-end",
        initial
            .iter()
            .find(|e| e["type"] == "BOOKMARK")
            .cloned()
            .unwrap_or(Value::Null),
    );
    // Neither server has compacted its history yet: a watch from the beginning of
    // time replays it.
    let replayed = side
        .watch(
            &format!(
                "{cms}?watch=true&resourceVersion=1&labelSelector=app%3Dcompat&timeoutSeconds=5"
            ),
            Duration::from_secs(10),
            |events| saw_added(events, "sentinel"),
        )
        .await
        .unwrap();
    t.record("replay-from-the-start", json!(names_and_types(&replayed)));

    // A custom resource: spec, status and delete.
    let scripts = format!("{TASKS}/namespaces/{ns}/scripts");
    let script = json!({
        "apiVersion": "fleetpatch.io/v1alpha1", "kind": "Script", "metadata": {"name": "s1"},
        "spec": {"language": "Bash", "content": "echo hi"},
    });
    let created = side.post(&scripts, &script).await;
    let events = side.watch(
        &format!(
            "{scripts}?watch=true&resourceVersion={}&timeoutSeconds=10",
            created.rv()
        ),
        Duration::from_secs(20),
        |events| events.iter().any(|e| e["type"] == "DELETED"),
    );
    side.merge(
        &format!("{scripts}/s1/status"),
        &json!({"status": {"observedGeneration": 1}}),
    )
    .await;
    side.merge(
        &format!("{scripts}/s1"),
        &json!({"spec": {"content": "echo bye"}}),
    )
    .await;
    side.delete(&format!("{scripts}/s1"), None).await;
    t.record("custom-resource-events", json!(events.await.unwrap()));
    t
}

/// Server-side apply: managedFields (managers, operations, fieldsV1), conflicts with
/// appliers and updaters, force, fields an applier stops applying, the status
/// subresource.
async fn server_side_apply(side: &Side) -> Transcript {
    let mut t = Transcript::default();
    let ns = "compat-apply";
    side.namespace(ns).await;
    let path = format!("{TASKS}/namespaces/{ns}/tasks/applied");
    let alice = task("applied");
    t.answer(
        "alice-creates",
        &side.apply(&path, "alice", false, &alice).await,
    );
    let again = side.apply(&path, "alice", false, &alice).await;
    t.answer("alice-again", &again);
    let bob = json!({
        "apiVersion": "fleetpatch.io/v1alpha1", "kind": "Task", "metadata": {"name": "applied"},
        "spec": {"os": "Windows", "type": "ChangeRegistryKey", "successExitCodes": [0, 3010]},
    });
    t.answer(
        "bob-shares-and-adds",
        &side.apply(&path, "bob", false, &bob).await,
    );
    t.answer(
        "carol-updates",
        &side
            .send_json(
                Method::PATCH,
                &format!("{path}?fieldManager=carol"),
                "application/merge-patch+json",
                &json!({"spec": {"timeoutMinutes": 9}}),
            )
            .await,
    );
    t.answer(
        "alice-conflicts-with-an-updater",
        &side
            .apply(
                &path,
                "alice",
                false,
                &set(alice.clone(), "/spec/timeoutMinutes", json!(10)),
            )
            .await,
    );
    let bob_takes = set(
        set(
            bob.clone(),
            "/spec/changeRegistryKey",
            json!({"valueData": "2"}),
        ),
        "/spec/description",
        json!("bob's now"),
    );
    t.answer(
        "bob-conflicts-with-an-applier",
        &side.apply(&path, "bob", false, &bob_takes).await,
    );
    t.answer(
        "bob-forces",
        &side.apply(&path, "bob", true, &bob_takes).await,
    );
    let alice_lets_go = unset(
        unset(alice.clone(), "/spec/changeRegistryKey/createIfMissing"),
        "/spec/changeRegistryKey/valueName",
    );
    t.answer(
        "alice-stops-applying-fields",
        &side.apply(&path, "alice", false, &alice_lets_go).await,
    );
    t.answer(
        "status-apply",
        &side
            .apply(
                &format!("{path}/status"),
                "controller",
                true,
                &json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "Task",
                        "metadata": {"name": "applied"}, "status": {"observedGeneration": 1}}),
            )
            .await,
    );
    t.answer(
        "apply-without-manager",
        &side
            .send_json(Method::PATCH, &path, "application/apply-patch+yaml", &alice)
            .await,
    );
    t.answer(
        "apply-invalid",
        &side
            .apply(
                &path,
                "alice",
                true,
                &set(alice.clone(), "/spec/os", json!("Solaris")),
            )
            .await,
    );
    t.answer(
        "update-by-put",
        &side
            .put(
                &format!("{path}?fieldManager=dave"),
                &set(
                    side.get(&path).await.body,
                    "/spec/timeoutMinutes",
                    json!(11),
                ),
            )
            .await,
    );
    // A built-in kind with associative lists: containers keyed by name.
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [
                    {"name": "app", "image": "app:1", "ports": [{"containerPort": 80, "protocol": "TCP"}],
                     "env": [{"name": "MODE", "value": "fast"}]},
                    {"name": "sidecar", "image": "sidecar:1"},
                ]},
            },
        },
    });
    let deployments = format!("/apis/apps/v1/namespaces/{ns}/deployments/web");
    let applied = side.apply(&deployments, "alice", false, &deployment).await;
    t.record(
        "deployment-managed-fields",
        applied.body["metadata"]["managedFields"].clone(),
    );
    let conflict = side
        .apply(
            &deployments,
            "bob",
            false,
            &set(
                deployment.clone(),
                "/spec/template/spec/containers/0/image",
                json!("app:2"),
            ),
        )
        .await;
    t.answer("deployment-conflict", &conflict);
    t
}

/// Table output (`as=Table`) for the printer columns of our CRDs and a built-in kind.
async fn tables(side: &Side) -> Transcript {
    let mut t = Transcript::default();
    let ns = "compat-tables";
    side.namespace(ns).await;
    let api = format!("{TASKS}/namespaces/{ns}");
    side.post(&format!("{api}/tasks"), &task("t1")).await;
    side.post(
        &format!("{api}/tasks"),
        &json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "Task", "metadata": {"name": "t2"},
                "spec": {"os": "Linux", "type": "Reboot", "reboot": {}}}),
    )
    .await;
    let ready = json!({"status": {"observedGeneration": 1, "conditions": [{
        "type": "Ready", "status": "True", "reason": "Resolved", "message": "ok",
        "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
    side.merge(&format!("{api}/tasks/t1/status"), &ready).await;
    side.post(
        &format!("{api}/scripts"),
        &json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "Script", "metadata": {"name": "s1"},
                "spec": {"language": "Bash", "content": "echo hi"}}),
    )
    .await;
    side.post(
        &format!("{api}/workflows"),
        &json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "Workflow", "metadata": {"name": "w1"},
                "spec": {"os": "Linux", "default": true,
                         "preTasks": [{"taskRef": {"name": "t1"}}], "postTasks": [{"taskRef": {"name": "t2"}}]}}),
    )
    .await;
    side.post(
        &format!("{api}/remediationplans"),
        &json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "RemediationPlan", "metadata": {"name": "p1"},
                "spec": {"targets": [{"name": "all", "os": "Linux", "selector": {}, "workflowRef": {"name": "w1"}}],
                         "patches": {"classifications": ["Security"]},
                         "schedule": {"cron": "0 2 * * 6", "windowMinutes": 60}}}),
    )
    .await;
    side.post(
        &format!("{api}/patchjobs"),
        &json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "PatchJob", "metadata": {"name": "j1"},
                "spec": {"agent": "host-1", "plan": "p1", "run": "1", "os": "Linux"}}),
    )
    .await;
    side.merge(
        &format!("{api}/patchjobs/j1/status"),
        &json!({"status": {"phase": "Running", "progress": "1/2"}}),
    )
    .await;
    side.post(
        &format!("{TASKS}/agents"),
        &json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "Agent", "metadata": {"name": "compat-table-agent"},
                "spec": {"mode": "External", "os": "Linux"}}),
    )
    .await;
    side.post(
        &format!("/api/v1/namespaces/{ns}/configmaps"),
        &config_map("c1", json!({"a": "1", "b": "2"})),
    )
    .await;
    const TABLE: &str = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json";
    for plural in [
        "tasks",
        "scripts",
        "workflows",
        "remediationplans",
        "patchjobs",
    ] {
        t.answer(
            plural,
            &side.get_as(&format!("{api}/{plural}"), TABLE).await,
        );
    }
    t.answer(
        "agents",
        &side
            .get_as(
                &format!("{TASKS}/agents?fieldSelector=metadata.name%3Dcompat-table-agent"),
                TABLE,
            )
            .await,
    );
    t.answer(
        "one-task",
        &side.get_as(&format!("{api}/tasks/t1"), TABLE).await,
    );
    t.answer(
        "include-object-none",
        &side
            .get_as(&format!("{api}/tasks?includeObject=None"), TABLE)
            .await,
    );
    t.answer(
        "include-object-object",
        &side
            .get_as(&format!("{api}/tasks?includeObject=Object"), TABLE)
            .await,
    );
    t.answer(
        "configmaps",
        &side
            .get_as(&format!("/api/v1/namespaces/{ns}/configmaps?fieldSelector=metadata.name%21%3Dkube-root-ca.crt"), TABLE)
            .await,
    );
    side.delete(&format!("{TASKS}/agents/compat-table-agent"), None)
        .await;
    t
}

/// Owner-reference garbage collection: background, foreground (held by a dependent's
/// finalizer), orphan, a dependent with a second owner, dry-run.
async fn garbage_collection(side: &Side) -> Transcript {
    let mut t = Transcript::default();
    let ns = "compat-gc";
    side.namespace(ns).await;
    let cms = format!("/api/v1/namespaces/{ns}/configmaps");
    let secrets = format!("/api/v1/namespaces/{ns}/secrets");
    let gone = |a: &Answer| a.code == 404;

    let owner = side.post(&cms, &config_map("owner-bg", json!({}))).await;
    side.post(
        &cms,
        &owned_by(config_map("dep-bg", json!({})), &[&owner], false),
    )
    .await;
    side.post(
        &secrets,
        &owned_by(
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "dep-bg"}}),
            &[&owner],
            true,
        ),
    )
    .await;
    t.answer(
        "background-delete",
        &side
            .delete(
                &format!("{cms}/owner-bg"),
                Some(&json!({"propagationPolicy": "Background"})),
            )
            .await,
    );
    t.answer(
        "background-dependent",
        &side.wait_for(&format!("{cms}/dep-bg"), SETTLE, gone).await,
    );
    t.answer(
        "background-dependent-secret",
        &side
            .wait_for(&format!("{secrets}/dep-bg"), SETTLE, gone)
            .await,
    );

    let owner = side.post(&cms, &config_map("owner-fg", json!({}))).await;
    let held = set(
        owned_by(config_map("dep-fg", json!({})), &[&owner], true),
        "/metadata/finalizers",
        json!(["example.com/hold"]),
    );
    side.post(&cms, &held).await;
    t.answer(
        "foreground-delete",
        &side
            .delete(
                &format!("{cms}/owner-fg"),
                Some(&json!({"propagationPolicy": "Foreground"})),
            )
            .await,
    );
    t.answer(
        "foreground-dependent-marked",
        &side
            .wait_for(&format!("{cms}/dep-fg"), SETTLE, |a| {
                a.body["metadata"]["deletionTimestamp"].is_string()
            })
            .await,
    );
    t.answer(
        "foreground-owner-waits",
        &side.get(&format!("{cms}/owner-fg")).await,
    );
    t.answer(
        "foreground-release",
        &side
            .merge(
                &format!("{cms}/dep-fg"),
                &json!({"metadata": {"finalizers": null}}),
            )
            .await,
    );
    t.answer(
        "foreground-owner-gone",
        &side
            .wait_for(&format!("{cms}/owner-fg"), SETTLE, gone)
            .await,
    );

    let owner = side.post(&cms, &config_map("owner-or", json!({}))).await;
    side.post(
        &cms,
        &owned_by(config_map("dep-or", json!({})), &[&owner], true),
    )
    .await;
    t.answer(
        "orphan-delete",
        &side
            .delete(
                &format!("{cms}/owner-or"),
                Some(&json!({"propagationPolicy": "Orphan"})),
            )
            .await,
    );
    t.answer(
        "orphan-owner-gone",
        &side
            .wait_for(&format!("{cms}/owner-or"), SETTLE, gone)
            .await,
    );
    t.answer(
        "orphaned-dependent",
        &side
            .wait_for(&format!("{cms}/dep-or"), SETTLE, |a| {
                a.body["metadata"]["ownerReferences"].is_null()
            })
            .await,
    );

    let a = side.post(&cms, &config_map("owner-a", json!({}))).await;
    let b = side.post(&cms, &config_map("owner-b", json!({}))).await;
    t.record(
        "two-owners",
        json!([a.body["metadata"]["uid"], b.body["metadata"]["uid"]]),
    );
    side.post(
        &cms,
        &owned_by(config_map("dep-ab", json!({})), &[&a, &b], false),
    )
    .await;
    t.answer(
        "one-of-two-owners-delete",
        &side.delete(&format!("{cms}/owner-a"), None).await,
    );
    t.answer(
        "dependent-keeps-the-other-owner",
        &side
            .wait_for(&format!("{cms}/dep-ab"), SETTLE, |a| {
                a.body["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|r| r.len() == 1)
            })
            .await,
    );

    side.post(&cms, &config_map("lonely", json!({}))).await;
    t.answer(
        "foreground-without-dependents",
        &side
            .delete(
                &format!("{cms}/lonely"),
                Some(&json!({"propagationPolicy": "Foreground"})),
            )
            .await,
    );
    t.answer(
        "foreground-without-dependents-gone",
        &side.wait_for(&format!("{cms}/lonely"), SETTLE, gone).await,
    );

    side.post(&cms, &config_map("kept", json!({}))).await;
    t.answer(
        "dry-run-delete",
        &side.delete(&format!("{cms}/kept?dryRun=All"), None).await,
    );
    t.answer("dry-run-kept", &side.get(&format!("{cms}/kept")).await);
    t
}

/// Repeats `ask` until its answer satisfies `done` or `limit` passes; the last answer.
async fn settle<F: std::future::Future<Output = Answer>>(
    limit: Duration,
    ask: impl Fn() -> F,
    done: impl Fn(&Answer) -> bool,
) -> Answer {
    let deadline = Instant::now() + limit;
    loop {
        let answer = ask().await;
        if done(&answer) || Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn pod(name: &str, account: &str, node: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "nodeName": node, "serviceAccountName": account, "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "app", "image": "app:1"}],
        },
    })
}

fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
}

fn token_request(audiences: &[&str], bound: Option<Value>) -> Value {
    let mut spec = json!({"expirationSeconds": 600});
    if !audiences.is_empty() {
        spec["audiences"] = json!(audiences);
    }
    if let Some(bound) = bound {
        spec["boundObjectRef"] = bound;
    }
    json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
}

/// TokenRequest and TokenReview: audiences, pod-bound tokens and their user.extra,
/// tokens for the wrong audience, bindings the server must refuse.
async fn tokens(side: &Side) -> Transcript {
    let mut t = Transcript::default();
    let ns = "compat-tokens";
    side.namespace(ns).await;
    let accounts = format!("/api/v1/namespaces/{ns}/serviceaccounts");
    for name in ["agent", "other"] {
        side.post(
            &accounts,
            &json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}}),
        )
        .await;
    }
    side.post("/api/v1/nodes", &node("compat-token-node")).await;
    let pods = format!("/api/v1/namespaces/{ns}/pods");
    let agent_pod = side
        .post(
            &pods,
            &pod("agent-pod", "agent", "compat-token-node", json!({})),
        )
        .await;
    // The whole pod once, for what the API server adds to a pod it admits.
    t.answer("pod-as-created", &agent_pod);
    side.post(
        &pods,
        &pod("other-pod", "other", "compat-token-node", json!({})),
    )
    .await;
    let agent_token = format!("{accounts}/agent/token");
    let request = |body: Value| {
        let path = agent_token.clone();
        async move { side.post(&path, &body).await }
    };
    let review = |token: &Answer, audiences: &[&str]| {
        let mut spec = json!({"token": token.body["status"]["token"]});
        if !audiences.is_empty() {
            spec["audiences"] = json!(audiences);
        }
        let body =
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec});
        async move {
            side.post("/apis/authentication.k8s.io/v1/tokenreviews", &body)
                .await
        }
    };

    let for_a = request(token_request(&["audience-a"], None)).await;
    t.answer("request-for-a", &for_a);
    t.answer("review-for-a-as-a", &review(&for_a, &["audience-a"]).await);
    t.answer(
        "review-for-a-as-a-or-b",
        &review(&for_a, &["audience-b", "audience-a"]).await,
    );
    t.answer("review-for-a-as-b", &review(&for_a, &["audience-b"]).await);
    t.answer("review-for-a-without-audience", &review(&for_a, &[]).await);
    let default = request(token_request(&[], None)).await;
    t.answer("request-default-audience", &default);
    t.answer(
        "review-default-without-audience",
        &review(&default, &[]).await,
    );
    t.answer(
        "review-default-as-a",
        &review(&default, &["audience-a"]).await,
    );

    let bound_to = |name: &str, uid: &Value| {
        Some(json!({"kind": "Pod", "apiVersion": "v1", "name": name, "uid": uid}))
    };
    let uid = agent_pod.body["metadata"]["uid"].clone();
    let bound = request(token_request(&["audience-a"], bound_to("agent-pod", &uid))).await;
    t.answer("request-bound-to-pod", &bound);
    t.answer(
        "review-bound-to-pod",
        &review(&bound, &["audience-a"]).await,
    );
    t.answer(
        "request-bound-to-pod-of-another-account",
        &request(token_request(
            &["audience-a"],
            bound_to("other-pod", &Value::Null),
        ))
        .await,
    );
    t.answer(
        "request-bound-to-missing-pod",
        &request(token_request(
            &["audience-a"],
            bound_to("nope", &Value::Null),
        ))
        .await,
    );
    t.answer(
        "request-bound-to-pod-with-wrong-uid",
        &request(token_request(
            &["audience-a"],
            bound_to("agent-pod", &json!("00000000-0000-0000-0000-000000000000")),
        ))
        .await,
    );
    t.answer(
        "request-bound-to-a-configmap",
        &request(token_request(
            &["audience-a"],
            Some(json!({"kind": "ConfigMap", "apiVersion": "v1", "name": "x"})),
        ))
        .await,
    );
    t.answer(
        "request-too-short",
        &request(set(
            token_request(&["audience-a"], None),
            "/spec/expirationSeconds",
            json!(60),
        ))
        .await,
    );
    t.answer(
        "request-for-missing-account",
        &side
            .post(
                &format!("{accounts}/nobody/token"),
                &token_request(&[], None),
            )
            .await,
    );
    t.answer(
        "review-garbage",
        &side
            .post(
                "/apis/authentication.k8s.io/v1/tokenreviews",
                &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                        "spec": {"token": "not-a-token"}}),
            )
            .await,
    );
    t.answer(
        "review-empty",
        &side
            .post(
                "/apis/authentication.k8s.io/v1/tokenreviews",
                &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {}}),
            )
            .await,
    );
    // As a bearer token on a request, a token is good for the API audience only.
    let token = |a: &Answer| {
        a.body["status"]["token"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    t.answer(
        "api-with-a-token-for-the-api",
        &side.get_with_token("/api", &token(&default)).await,
    );
    t.answer(
        "api-with-a-token-for-another-audience",
        &side.get_with_token("/api", &token(&for_a)).await,
    );
    let deleted = side.delete(&format!("{pods}/agent-pod"), None).await;
    t.record(
        "delete-bound-pod",
        json!({"code": deleted.code, "metadata": deleted.body["metadata"]}),
    );
    // The real server checks bound objects against its informer cache, which catches
    // up with the deletion a moment later.
    let refused = |a: &Answer| a.body["status"]["authenticated"] != true;
    t.answer(
        "review-bound-to-deleted-pod",
        &settle(SETTLE, || review(&bound, &["audience-a"]), refused).await,
    );
    t.answer(
        "delete-account",
        &side.delete(&format!("{accounts}/agent"), None).await,
    );
    t.answer(
        "review-of-deleted-account",
        &settle(SETTLE, || review(&for_a, &["audience-a"]), refused).await,
    );
    side.delete("/api/v1/nodes/compat-token-node", None).await;
    t
}

/// PodDisruptionBudgets and the eviction subresource: the budget's status as the
/// disruption controller computes it, evictions decrementing it, refusals, pods that
/// skip the budget, dry runs.
async fn evictions(side: &Side) -> Transcript {
    let mut t = Transcript::default();
    let ns = "compat-evict";
    side.namespace(ns).await;
    side.post("/api/v1/nodes", &node("compat-evict-node")).await;
    let replica_sets = format!("/apis/apps/v1/namespaces/{ns}/replicasets");
    let owner = side
        .post(
            &replica_sets,
            &json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "web"},
                    "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                             "template": {"metadata": {"labels": {"app": "web"}},
                                          "spec": {"containers": [{"name": "app", "image": "app:1"}]}}}}),
        )
        .await;
    let pods = format!("/api/v1/namespaces/{ns}/pods");
    let mut controller = owned_by(json!({"metadata": {}}), &[&owner], true);
    controller["metadata"]["ownerReferences"][0]["controller"] = json!(true);
    let running = |ready: &str| {
        json!({"status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": ready, "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
    };
    for name in ["web-0", "web-1", "web-2"] {
        let mut body = pod(name, "default", "compat-evict-node", json!({"app": "web"}));
        body["metadata"]["ownerReferences"] = controller["metadata"]["ownerReferences"].clone();
        side.post(&pods, &body).await;
        side.merge(&format!("{pods}/{name}/status"), &running("True"))
            .await;
    }
    side.post(
        &pods,
        &pod(
            "web-pending",
            "default",
            "compat-evict-node",
            json!({"app": "web"}),
        ),
    )
    .await;
    let budgets = format!("/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets");
    let budget = format!("{budgets}/web");
    // Who owns a budget's status fields depends on whether the eviction handler and
    // the disruption controller wrote within the same second (a changed timestamp
    // changes hands, an unchanged one does not): budgets are compared without
    // managedFields, which the server_side_apply scenario covers.
    let without_owners = |mut a: Answer| {
        if let Some(meta) = a.body["metadata"].as_object_mut() {
            meta.remove("managedFields");
        }
        a
    };
    t.answer(
        "create-budget",
        &side
            .post(
                &budgets,
                &json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "web"},
                        "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "web"}}}}),
            )
            .await,
    );
    let settled = |healthy: i64, expected: i64| {
        move |a: &Answer| {
            let s = &a.body["status"];
            s["observedGeneration"] == 1
                && s["currentHealthy"] == healthy
                && s["expectedPods"] == expected
                && s["disruptedPods"].is_null()
        }
    };
    t.answer(
        "budget-computed",
        &without_owners(side.wait_for(&budget, SETTLE, settled(3, 4)).await),
    );
    let evict = |name: &str, query: &str| {
        let body =
            json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name}});
        let path = format!("{pods}/{name}/eviction{query}");
        async move { side.post(&path, &body).await }
    };
    t.answer("evict-pending-pod", &evict("web-pending", "").await);
    t.answer(
        "budget-after-pending",
        &without_owners(side.wait_for(&budget, SETTLE, settled(3, 3)).await),
    );
    t.answer("evict-dry-run", &evict("web-0", "?dryRun=All").await);
    t.answer(
        "budget-after-dry-run",
        &without_owners(side.get(&budget).await),
    );
    t.answer("evict-allowed", &evict("web-0", "").await);
    t.answer(
        "evicted-pod-gone",
        &side
            .wait_for(&format!("{pods}/web-0"), SETTLE, |a| a.code == 404)
            .await,
    );
    t.answer(
        "budget-after-eviction",
        &without_owners(side.wait_for(&budget, SETTLE, settled(2, 2)).await),
    );
    t.answer("evict-refused", &evict("web-1", "").await);
    t.answer(
        "evict-name-mismatch",
        &side
            .post(
                &format!("{pods}/web-1/eviction"),
                &json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "web-2"}}),
            )
            .await,
    );
    t.answer("evict-missing", &evict("nope", "").await);
    side.merge(&format!("{pods}/web-1/status"), &running("False"))
        .await;
    t.answer(
        "budget-with-an-unready-pod",
        &without_owners(side.wait_for(&budget, SETTLE, settled(1, 2)).await),
    );
    t.answer("evict-unready-refused", &evict("web-1", "").await);
    t.answer(
        "relax-budget",
        &without_owners(
            side.merge(&budget, &json!({"spec": {"minAvailable": 1}}))
                .await,
        ),
    );
    t.answer(
        "budget-relaxed",
        &without_owners(
            side.wait_for(&budget, SETTLE, |a| {
                a.body["status"]["observedGeneration"] == 2
            })
            .await,
        ),
    );
    t.answer("evict-unready-allowed", &evict("web-1", "").await);
    t.answer("evict-last-refused", &evict("web-2", "").await);
    let second = side
        .post(
            &budgets,
            &json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "web-too"},
                    "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "web"}}}}),
        )
        .await;
    t.answer("second-budget", &second);
    t.answer("evict-with-two-budgets", &evict("web-2", "").await);
    side.delete("/api/v1/nodes/compat-evict-node", None).await;
    t
}
