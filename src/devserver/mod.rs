//! `fleetpatch dev`: an embedded, Kubernetes-compatible API server for development
//! and tests — NOT for production. It speaks enough of the real API (discovery,
//! OpenAPI v3, CRDs with validation, CRUD, watch, patches, server-side apply, Table
//! output) for kubectl, helm and kube-rs clients, over plain HTTP on loopback with a
//! bearer token it issues itself.
//!
//! Layout: [`store`] objects, resourceVersions and watch fan-out; [`persist`] the
//! `--data-dir` journal; [`registry`] served kinds; [`handlers`] routing and verbs;
//! [`admission`] validation; [`patch`] and [`managed`] patches and server-side apply;
//! [`table`] printer columns; [`discovery`] discovery and OpenAPI; [`auth`] tokens;
//! [`selector`] label and field selectors; [`errors`] `Status` errors. This file owns
//! start-up, the kubeconfig, and what follows writes: CRD registration, namespace
//! clean-up, ownerReference garbage collection and PodDisruptionBudget checks.

pub mod admission;
pub mod auth;
pub mod discovery;
pub mod errors;
pub mod handlers;
pub mod managed;
pub mod patch;
pub mod persist;
pub mod protobuf;
pub mod registry;
pub mod selector;
pub mod store;
pub mod table;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use self::auth::Auth;
use self::registry::{Registry, ResourceKind};
use self::selector::LabelSelector;
use self::store::{Store, StoreError};

/// Namespaces every cluster has.
const SYSTEM_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public", "kube-node-lease"];
const CRD_KEY: &str = "apiextensions.k8s.io/customresourcedefinitions";
const NAMESPACE_KEY: &str = "/namespaces";

#[derive(Debug, thiserror::Error)]
pub enum DevServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "refusing to listen on {0}: the dev server serves plain HTTP without authentication and only listens on loopback addresses"
    )]
    NotLoopback(SocketAddr),
    #[error("cannot write the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the server stopped: {0}")]
    Serve(std::io::Error),
}

const FOREGROUND_FINALIZER: &str = "foregroundDeletion";

/// What happens to an object's dependents when it is deleted (`propagationPolicy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Propagation {
    /// The object goes now; dependents are garbage-collected after it.
    Background,
    /// The object stays (finalizer `foregroundDeletion`) until its dependents are gone.
    Foreground,
    /// Dependents stay and lose their reference to the object.
    Orphan,
}

impl Propagation {
    pub fn parse(text: Option<&str>) -> Self {
        match text {
            Some("Foreground") => Self::Foreground,
            Some("Orphan") => Self::Orphan,
            _ => Self::Background,
        }
    }
}

/// Options of `fleetpatch dev`.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub kubeconfig: PathBuf,
    pub data_dir: Option<PathBuf>,
    /// How often watches that asked for bookmarks get one.
    pub bookmark_interval: Duration,
}

/// Shared state of a running dev server.
pub struct Server {
    pub store: Store,
    pub registry: Registry,
    pub auth: Auth,
    /// host:port clients reach us on.
    pub address: String,
    pub bookmark_interval: Duration,
    /// Successful writes by verb and resource, served at `/metrics` so benchmarks can
    /// count what a component costs the API server.
    pub writes: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Server {
    pub fn open(config: &Config, address: String) -> Result<Arc<Self>, DevServerError> {
        let store = Store::open(config.data_dir.as_deref())?;
        let auth = Auth::open(config.data_dir.as_deref())?;
        let server = Arc::new(Self {
            store,
            registry: Registry::new(),
            auth,
            address,
            bookmark_interval: config.bookmark_interval,
            writes: Default::default(),
        });
        server.refresh_crds();
        for name in SYSTEM_NAMESPACES {
            if server.store.get(NAMESPACE_KEY, "", name).is_none() {
                let namespace = json!({
                    "apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": name, "uid": uuid::Uuid::new_v4().to_string(),
                                 "creationTimestamp": handlers::now(),
                                 "labels": {"kubernetes.io/metadata.name": name}},
                    "spec": {}, "status": {"phase": "Active"},
                });
                let stored = server.store.create(NAMESPACE_KEY, namespace)?;
                let kind = server
                    .registry
                    .find("", "v1", "namespaces")
                    .expect("built in");
                server.after_write(&kind, &stored);
            }
        }
        Ok(server)
    }

    fn refresh_crds(&self) {
        let (crds, _) = self.store.list(CRD_KEY, None);
        self.registry.set_crds(crds.iter().map(|c| &**c));
    }

    /// Side effects of a stored write.
    pub fn after_write(self: &Arc<Self>, kind: &ResourceKind, object: &Value) {
        match kind.storage_key().as_str() {
            CRD_KEY => self.refresh_crds(),
            NAMESPACE_KEY => {
                // The ServiceAccount controller's job in a real cluster.
                let ns = object["metadata"]["name"].as_str().unwrap_or_default();
                if object["metadata"]["deletionTimestamp"].is_null()
                    && self.store.get("/serviceaccounts", ns, "default").is_none()
                {
                    let account = json!({
                        "apiVersion": "v1", "kind": "ServiceAccount",
                        "metadata": {"name": "default", "namespace": ns,
                                     "uid": uuid::Uuid::new_v4().to_string(),
                                     "creationTimestamp": handlers::now()},
                    });
                    if let Err(err) = self.store.create("/serviceaccounts", account) {
                        tracing::debug!(%err, ns, "default ServiceAccount not created");
                    }
                }
            }
            _ => {}
        }
    }

    /// Deletes an object as a DELETE request does: marks it when finalizers hold it,
    /// removes it otherwise. Foreground deletion holds the object (finalizer
    /// `foregroundDeletion`) until its dependents are gone; Orphan leaves them alone.
    pub fn delete_object(
        self: &Arc<Self>,
        kind: &ResourceKind,
        object: &Value,
        propagation: Propagation,
    ) -> Result<Arc<Value>, StoreError> {
        let key = kind.storage_key();
        let ns = object["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        if key == NAMESPACE_KEY {
            self.delete_namespace_contents(name);
        }
        let uid = object["metadata"]["uid"].as_str().unwrap_or_default();
        if propagation == Propagation::Foreground
            && object["metadata"]["deletionTimestamp"].is_null()
            && !uid.is_empty()
        {
            let dependents = self.store.dependents_of(uid);
            if !dependents.is_empty() {
                let mut marked = object.clone();
                let mut finalizers = marked["metadata"]["finalizers"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                finalizers.push(json!(FOREGROUND_FINALIZER));
                marked["metadata"]["finalizers"] = json!(finalizers);
                marked["metadata"]["deletionTimestamp"] = json!(handlers::now());
                marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                let stored = self.store.replace(&key, marked, None)?;
                for (dependent_key, dependent) in dependents {
                    if let Some(dependent_kind) = self.kind_for_key(&dependent_key)
                        && let Err(err) =
                            self.delete_object(&dependent_kind, &dependent, Propagation::Foreground)
                    {
                        tracing::debug!(%err, "dependent already gone");
                    }
                }
                return Ok(stored);
            }
        }
        let orphan = propagation == Propagation::Orphan;
        let has_finalizers = object["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if object["metadata"]["deletionTimestamp"].is_string() {
                return Ok(Arc::new(object.clone()));
            }
            let mut marked = object.clone();
            marked["metadata"]["deletionTimestamp"] = json!(handlers::now());
            marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            if key == NAMESPACE_KEY {
                marked["status"]["phase"] = json!("Terminating");
            }
            let stored = self.store.replace(&key, marked, None)?;
            return Ok(stored);
        }
        self.remove_object(&key, ns, name, orphan)
    }

    fn kind_for_key(&self, key: &str) -> Option<Arc<ResourceKind>> {
        self.registry
            .all()
            .iter()
            .find(|k| k.storage_key() == key)
            .cloned()
    }

    /// After a dependent is gone: an owner held by foreground deletion whose
    /// dependents are all gone loses that finalizer (and goes, if it was the last).
    fn release_foreground_owners(self: &Arc<Self>, removed: &Value) {
        for owner in removed["metadata"]["ownerReferences"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let Some(uid) = owner["uid"].as_str() else {
                continue;
            };
            let Some((key, ns, name)) = self.store.locate_uid(uid) else {
                continue;
            };
            let Some(current) = self.store.get(&key, &ns, &name) else {
                continue;
            };
            let finalizers: Vec<Value> = current["metadata"]["finalizers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if !finalizers.contains(&json!(FOREGROUND_FINALIZER))
                || !self.store.dependents_of(uid).is_empty()
            {
                continue;
            }
            let remaining: Vec<Value> = finalizers
                .into_iter()
                .filter(|f| f != FOREGROUND_FINALIZER)
                .collect();
            let mut updated = (*current).clone();
            updated["metadata"]["finalizers"] = json!(remaining);
            let result = self.store.replace(&key, updated, None);
            if result.is_ok() && remaining.is_empty() {
                let _ = self.remove_object(&key, &ns, &name, false);
            }
        }
    }

    /// Removes an object whose last finalizer is gone.
    pub fn remove_now(self: &Arc<Self>, kind: &ResourceKind, ns: &str, name: &str) {
        if let Err(err) = self.remove_object(&kind.storage_key(), ns, name, false) {
            tracing::debug!(%err, ns, name, "object already gone");
        }
    }

    fn remove_object(
        self: &Arc<Self>,
        key: &str,
        ns: &str,
        name: &str,
        orphan: bool,
    ) -> Result<Arc<Value>, StoreError> {
        let removed = self.store.remove(key, ns, name, None)?;
        if key == CRD_KEY {
            let group = removed["spec"]["group"].as_str().unwrap_or_default();
            let plural = removed["spec"]["names"]["plural"]
                .as_str()
                .unwrap_or_default();
            let objects_key = format!("{group}/{plural}");
            let (objects, _) = self.store.list(&objects_key, None);
            for object in objects {
                let meta = &object["metadata"];
                let _ = self.store.remove(
                    &objects_key,
                    meta["namespace"].as_str().unwrap_or_default(),
                    meta["name"].as_str().unwrap_or_default(),
                    None,
                );
            }
            self.refresh_crds();
        }
        self.release_foreground_owners(&removed);
        if let Some(uid) = removed["metadata"]["uid"].as_str() {
            let server = self.clone();
            let uid = uid.to_string();
            tokio::spawn(async move { server.collect_dependents(&uid, orphan) });
        }
        Ok(removed)
    }

    /// Background garbage collection: dependents whose owners are all gone are deleted;
    /// with `orphan` they only lose the reference.
    fn collect_dependents(self: &Arc<Self>, uid: &str, orphan: bool) {
        for (key, dependent) in self.store.dependents_of(uid) {
            let refs = dependent["metadata"]["ownerReferences"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let remaining: Vec<Value> = refs
                .into_iter()
                .filter(|r| r["uid"].as_str() != Some(uid))
                .collect();
            let alive = remaining.iter().any(|r| {
                r["uid"]
                    .as_str()
                    .is_some_and(|u| self.store.locate_uid(u).is_some())
            });
            if orphan || alive {
                let mut updated = (*dependent).clone();
                updated["metadata"]["ownerReferences"] = json!(remaining);
                if let Err(err) = self.store.replace(&key, updated, None) {
                    tracing::debug!(%err, "dependent changed while orphaning");
                }
                continue;
            }
            let Some(kind) = self.kind_for_key(&key) else {
                continue;
            };
            tracing::info!(
                kind = %kind.kind,
                name = dependent["metadata"]["name"].as_str().unwrap_or_default(),
                owner = uid,
                "garbage-collecting a dependent"
            );
            if let Err(err) = self.delete_object(&kind, &dependent, Propagation::Background) {
                tracing::debug!(%err, "dependent already gone");
            }
        }
    }

    fn delete_namespace_contents(self: &Arc<Self>, namespace: &str) {
        let kinds = self.registry.all();
        let mut seen = Vec::new();
        for kind in kinds.iter().filter(|k| k.namespaced && !k.is_virtual()) {
            let key = kind.storage_key();
            if seen.contains(&key) {
                continue;
            }
            seen.push(key.clone());
            let (objects, _) = self.store.list(&key, Some(namespace));
            for object in objects {
                if let Err(err) = self.delete_object(kind, &object, Propagation::Background) {
                    tracing::debug!(%err, "namespace content already gone");
                }
            }
        }
    }

    /// The PodDisruptionBudget an eviction of `pod` would violate, if any.
    pub fn blocking_budget(&self, pod: &Value) -> Option<String> {
        let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
        let (budgets, _) = self.store.list("policy/poddisruptionbudgets", Some(ns));
        let (pods, _) = self.store.list("/pods", Some(ns));
        let healthy = |p: &Value| {
            p["metadata"]["deletionTimestamp"].is_null()
                && (p["status"]["phase"] == "Running"
                    || p["status"]["conditions"].as_array().is_some_and(|c| {
                        c.iter()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    }))
        };
        if !healthy(pod) {
            return None;
        }
        for budget in budgets {
            let selector = LabelSelector::from_object(&budget["spec"]["selector"]);
            if !selector.matches(pod) {
                continue;
            }
            let matching: Vec<&Arc<Value>> = pods.iter().filter(|p| selector.matches(p)).collect();
            let expected = matching.len() as i64;
            let healthy_after = matching.iter().filter(|p| healthy(p)).count() as i64 - 1;
            let resolve = |v: &Value, round_up: bool| -> Option<i64> {
                match v {
                    Value::Number(n) => n.as_i64(),
                    Value::String(s) => {
                        let pct: f64 = s.trim_end_matches('%').parse().ok()?;
                        let raw = pct * expected as f64 / 100.0;
                        Some(if round_up { raw.ceil() } else { raw.floor() } as i64)
                    }
                    _ => None,
                }
            };
            let spec = &budget["spec"];
            let violates = if let Some(min) = resolve(&spec["minAvailable"], true) {
                healthy_after < min
            } else if let Some(max) = resolve(&spec["maxUnavailable"], false) {
                expected - healthy_after > max
            } else {
                false
            };
            if violates {
                return budget["metadata"]["name"].as_str().map(str::to_string);
            }
        }
        None
    }
}

/// The kubeconfig a client uses to reach the server.
pub fn kubeconfig(server_url: &str, token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: fleetpatch-dev
  cluster:
    server: {server_url}
contexts:
- name: fleetpatch-dev
  context:
    cluster: fleetpatch-dev
    user: fleetpatch-dev-admin
    namespace: default
current-context: fleetpatch-dev
users:
- name: fleetpatch-dev-admin
  user:
    token: {token}
"
    )
}

fn write_kubeconfig(path: &Path, contents: &str) -> Result<(), DevServerError> {
    let err = |source| DevServerError::Kubeconfig {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).map_err(err)?;
    auth::owner_only(&tmp).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Binds, writes the kubeconfig, and serves until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), DevServerError> {
    if !config.listen.ip().is_loopback() {
        return Err(DevServerError::NotLoopback(config.listen));
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| DevServerError::Listen {
            address: config.listen,
            source,
        })?;
    let address = listener
        .local_addr()
        .map_err(|source| DevServerError::Listen {
            address: config.listen,
            source,
        })?;
    let server = Server::open(&config, address.to_string())?;
    let url = format!("http://{address}");
    write_kubeconfig(
        &config.kubeconfig,
        &kubeconfig(&url, &server.auth.admin_token()),
    )?;
    let kubeconfig_path =
        std::path::absolute(&config.kubeconfig).unwrap_or(config.kubeconfig.clone());
    tracing::info!(%url, kubeconfig = %kubeconfig_path.display(), "fleetpatch dev server listening (development and tests only, not for production)");
    // Tests read these two lines from standard output.
    println!("fleetpatch dev: listening on {url}");
    println!("export KUBECONFIG={}", kubeconfig_path.display());

    let app = axum::Router::new()
        .fallback(handlers::dispatch)
        .with_state(server);
    let serve = axum::serve(listener, app);
    tokio::select! {
        result = serve => result.map_err(DevServerError::Serve),
        () = shutdown => {
            // Open watches never end by themselves; dropping the server closes them.
            tracing::info!("fleetpatch dev server stopping");
            Ok(())
        }
    }
}
