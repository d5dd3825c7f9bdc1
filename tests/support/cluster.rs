//! The cluster an end-to-end test runs against. By default the real control plane
//! (kube-apiserver with RBAC, etcd, the controller manager's garbage collector,
//! disruption, namespace and ServiceAccount controllers); `FLEETPATCH_TEST_SUBSTRATE=dev`
//! runs the same test on `fleetpatch dev` instead. Where the two differ, the real one is
//! right.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::control_plane::{self, ControlPlane};
use super::dev::DevServer;
use super::prerequisite;
use super::{Kubectl, eventually, repo};

/// Which API server a cluster is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Substrate {
    /// kube-apiserver built from its Go module.
    Real,
    /// `fleetpatch dev`.
    Dev,
}

impl Substrate {
    /// The substrate chosen for this run: `FLEETPATCH_TEST_SUBSTRATE`, else real.
    pub fn chosen() -> Self {
        match std::env::var("FLEETPATCH_TEST_SUBSTRATE").as_deref() {
            Ok("dev") => Substrate::Dev,
            Ok("real") | Err(_) => Substrate::Real,
            Ok(other) => panic!("FLEETPATCH_TEST_SUBSTRATE={other}: expected real or dev"),
        }
    }
}

enum Server {
    /// A control plane this test owns.
    Private(ControlPlane),
    /// The run's shared control plane: the test must keep to its own namespaces and names.
    Shared,
    Dev(DevServer),
}

pub struct Cluster {
    server: Server,
    pub substrate: Substrate,
    pub home: PathBuf,
    pub kubeconfig: PathBuf,
}

impl Kubectl for Cluster {
    fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    fn home(&self) -> &Path {
        &self.home
    }
}

impl Cluster {
    /// A cluster of this test's own, on the chosen substrate. Without the control plane's
    /// binaries this fails under CI and falls back to `fleetpatch dev` (saying so) on a
    /// developer machine.
    pub fn start(home: &Path) -> Self {
        match Substrate::chosen() {
            Substrate::Dev => Self::dev(home),
            Substrate::Real => Self::real(home).unwrap_or_else(|| {
                eprintln!("!!!!! falling back to fleetpatch dev for this test !!!!!");
                Self::dev(home)
            }),
        }
    }

    /// A private real control plane, or `None` (reported by [`prerequisite::missing`])
    /// when its binaries are not built.
    pub fn real(home: &Path) -> Option<Self> {
        if !control_plane::built() {
            prerequisite::missing(&format!(
                "the control plane is not built in {}; run scripts/control-plane.sh build",
                control_plane::bin_dir().display()
            ));
            return None;
        }
        let plane = ControlPlane::start(&home.join("control-plane"));
        Some(Self {
            kubeconfig: plane.kubeconfig.clone(),
            server: Server::Private(plane),
            substrate: Substrate::Real,
            home: home.to_path_buf(),
        })
    }

    /// A `fleetpatch dev` server of this test's own.
    pub fn dev(home: &Path) -> Self {
        let dev = DevServer::start(home, None);
        Self {
            kubeconfig: dev.kubeconfig.clone(),
            server: Server::Dev(dev),
            substrate: Substrate::Dev,
            home: home.to_path_buf(),
        }
    }

    /// The run's shared real control plane when `scripts/test-all.sh` started one, else
    /// a cluster of this test's own. For tests that keep to their own namespaces and do
    /// not run a controller.
    pub fn shared(home: &Path) -> Self {
        match (Substrate::chosen(), control_plane::shared()) {
            (Substrate::Real, Some(kubeconfig)) => Self {
                server: Server::Shared,
                substrate: Substrate::Real,
                home: home.to_path_buf(),
                kubeconfig,
            },
            _ => Self::start(home),
        }
    }

    pub fn is_real(&self) -> bool {
        self.substrate == Substrate::Real
    }

    /// The dev server behind this cluster, if it is one.
    pub fn dev_server(&self) -> Option<&DevServer> {
        match &self.server {
            Server::Dev(dev) => Some(dev),
            _ => None,
        }
    }

    /// The API server's audit log of what fleetpatch's ServiceAccounts did (a private real
    /// control plane only), one JSON event per line.
    pub fn audit_log(&self) -> Option<String> {
        match &self.server {
            Server::Private(plane) => {
                std::fs::read_to_string(plane.dir.join("logs/audit.log")).ok()
            }
            _ => None,
        }
    }

    /// The end of the API server's log, for a failing test's message.
    pub fn server_log(&self) -> String {
        match &self.server {
            Server::Private(plane) => {
                let log = plane.apiserver_log();
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(40)..].join("\n")
            }
            _ => String::new(),
        }
    }

    /// Applies the CRDs from `crds/` and waits until the API server serves them.
    pub fn install_crds(&self) {
        self.kubectl_ok(&[
            "apply",
            "--server-side",
            "-f",
            repo().join("crds").to_str().unwrap(),
        ]);
        self.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "-f",
            repo().join("crds").to_str().unwrap(),
            "--timeout=60s",
        ]);
    }

    /// Creates a namespace (if missing) ready for pods: on a real server, pods can be
    /// created once the ServiceAccount controller has made the `default` ServiceAccount.
    pub fn create_namespace(&self, namespace: &str) {
        let exists = self
            .kubectl(&["get", "namespace", namespace, "-o", "name"])
            .status
            .success();
        if !exists {
            self.kubectl_ok(&["create", "namespace", namespace]);
        }
        if self.is_real() {
            let ready = eventually(Duration::from_secs(30), || {
                self.kubectl(&["-n", namespace, "get", "serviceaccount", "default"])
                    .status
                    .success()
            });
            assert!(ready, "namespace {namespace} got no default ServiceAccount");
        }
    }

    /// A kubeconfig that authenticates as ServiceAccount `namespace/name` with a fresh
    /// token (one hour), against the same server.
    pub fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> PathBuf {
        let token = self.kubectl_ok(&[
            "-n",
            namespace,
            "create",
            "token",
            name,
            "--duration",
            "3600s",
        ]);
        let server = self.kubectl_ok(&[
            "config",
            "view",
            "--raw",
            "--minify",
            "-o",
            "jsonpath={.clusters[0].cluster.server}",
        ]);
        let ca = self.kubectl_ok(&[
            "config",
            "view",
            "--raw",
            "--minify",
            "-o",
            "jsonpath={.clusters[0].cluster.certificate-authority-data}",
        ]);
        let ca_line = if ca.is_empty() {
            String::new()
        } else {
            format!("\n    certificate-authority-data: {ca}")
        };
        let path = self.home.join(format!("kubeconfig-{namespace}-{name}"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}{ca_line}\nusers:\n- name: {name}\n  user:\n    token: {}\ncontexts:\n- name: c\n  context: {{cluster: c, user: {name}, namespace: {namespace}}}\ncurrent-context: c\n",
                token.trim()
            ),
        )
        .unwrap();
        path
    }

    /// The chart's ServiceAccounts and RBAC (rendered by `helm template` for release
    /// `fleetpatch` in `namespace`), applied; returns a kubeconfig for the controller's
    /// ServiceAccount. So the controller runs with exactly the chart's permissions: one it
    /// lacks fails the test. Without helm (reported by [`prerequisite::tool`]) the admin's
    /// kubeconfig.
    pub fn controller_kubeconfig(&self, namespace: &str) -> PathBuf {
        self.create_namespace(namespace);
        let Some(helm) = prerequisite::tool("helm") else {
            return self.kubeconfig.clone();
        };
        let helm_home = self.home.join("helm");
        let output = std::process::Command::new(helm)
            .args(["template", "fleetpatch"])
            .arg(repo().join("charts/fleetpatch"))
            .args(["--namespace", namespace])
            .args(["--show-only", "templates/serviceaccounts.yaml"])
            .args(["--show-only", "templates/rbac.yaml"])
            .env("HELM_CACHE_HOME", helm_home.join("cache"))
            .env("HELM_CONFIG_HOME", helm_home.join("config"))
            .env("HELM_DATA_HOME", helm_home.join("data"))
            .env("KUBECONFIG", self.home.join("no-cluster"))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "helm template: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        self.apply(&String::from_utf8(output.stdout).unwrap());
        let kubeconfig = self.service_account_kubeconfig(namespace, "fleetpatch-controller");
        if self.is_real() {
            // The point of the exercise: this identity holds the chart's grants, no more.
            let can = self
                .command(&super::kubectl::kubectl_bin())
                .env("KUBECONFIG", &kubeconfig)
                .args(["auth", "can-i", "list", "secrets", "--all-namespaces"])
                .output()
                .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&can.stdout).trim(),
                "no",
                "the controller's ServiceAccount may read every Secret"
            );
        }
        kubeconfig
    }
}
