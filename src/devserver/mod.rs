//! `fleetpatch dev`: an embedded, Kubernetes-compatible API server for development
//! and tests — NOT for production. It speaks enough of the real API (discovery,
//! OpenAPI v3, CRDs with validation, CRUD, watch, patches, server-side apply, Table
//! output) for kubectl, helm and kube-rs clients, over plain HTTP on loopback with a
//! bearer token it issues itself.
//!
//! Layout: [`store`] objects, resourceVersions and watch fan-out; [`persist`] the
//! `--data-dir` journal; [`registry`] served kinds; [`handlers`] routing and what every
//! verb shares, with the verbs in [`read`] (get, list, watch), [`write`](mod@write) (create,
//! update), [`apply`] (patches, server-side apply) and [`deletion`] (delete, garbage
//! collection, namespace clean-up), and the subresources [`eviction`] and [`tokens`]
//! (TokenRequest, TokenReview); [`events`] the two APIs of Events; [`body`] request decoding; [`admission`] validation;
//! [`patch`] and [`managed`] patches and field ownership; [`disruption`]
//! PodDisruptionBudget status; [`table`] printer columns; [`discovery`] discovery and
//! OpenAPI; [`auth`] signed tokens; [`selector`] label and field selectors; [`errors`]
//! `Status` errors. This file owns start-up, the kubeconfig, and what follows writes:
//! CRD registration, default ServiceAccounts, budgets to recompute.

pub mod admission;
pub mod apply;
pub mod auth;
pub mod body;
pub mod deletion;
pub mod discovery;
pub mod disruption;
pub mod errors;
pub mod events;
pub mod eviction;
pub mod handlers;
pub mod managed;
pub mod patch;
pub mod persist;
pub mod protobuf;
pub mod read;
pub mod registry;
pub mod selector;
pub mod store;
pub mod table;
pub mod tokens;
pub mod write;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

pub use self::deletion::{DeleteOptions, Deleted, Propagation};

use self::auth::Auth;
use self::registry::{Registry, ResourceKind};
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
    pub writes: parking_lot::Mutex<std::collections::BTreeMap<String, u64>>,
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
                    "spec": {"finalizers": [deletion::NAMESPACE_FINALIZER]}, "status": {"phase": "Active"},
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
            key if disruption::affects_budgets(key) => {
                // The disruption controller's job in a real cluster.
                if let Some(ns) = object["metadata"]["namespace"].as_str() {
                    self.sync_budgets(ns);
                }
            }
            _ => {}
        }
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
