//! A fleet on this host for end-to-end tests: a cluster (the real control plane unless
//! told otherwise), the controller with the chart's RBAC, a multi-use bootstrap token
//! whose hosts accept plans from `default`, `fleetpatch agent run` processes, and the
//! manifests (scripts, workflows, plans) tests build their scenarios from.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::e2e::{self as e2e_support, BIN, Process, free_port};
use super::{Cluster, Kubectl, eventually};

pub struct Fleet {
    pub cluster: Cluster,
    /// The controller's kubeconfig: its ServiceAccount with the chart's RBAC.
    pub controller_kubeconfig: PathBuf,
    /// Fixed for the fleet's lifetime so a restarted controller is found at the same address.
    pub gateway: String,
    pub gateway_port: u16,
    pub metrics: std::sync::Mutex<String>,
    /// Last, so it is removed after the cluster that keeps its files there stopped.
    pub home: tempfile::TempDir,
}

impl Fleet {
    pub fn start() -> Self {
        let home = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(home.path());
        cluster.install_crds();
        let controller_kubeconfig = cluster.controller_kubeconfig("fleetpatch-system");
        cluster.kubectl_stdin(
            &["apply", "-f", "-"],
            "apiVersion: v1\nkind: Secret\nmetadata: {name: join, namespace: fleetpatch-system}\ntype: fleetpatch.io/bootstrap-token\nstringData: {token: let-me-in, usage: multi, plan-namespaces: default}\n",
        );
        std::fs::write(home.path().join("token"), "let-me-in\n").unwrap();
        let gateway_port = free_port();
        Fleet {
            gateway: format!("http://127.0.0.1:{gateway_port}"),
            gateway_port,
            metrics: Default::default(),
            home,
            cluster,
            controller_kubeconfig,
        }
    }

    pub fn controller(&self) -> Process {
        self.controller_with("e2e-controller", &[])
    }

    /// A controller replica named `identity`, with extra flags, serving the fleet's
    /// gateway address unless `extra` gives its own `--gateway-listen` (only one replica
    /// can listen there).
    /// The controller, logging at `info` into `log`.
    pub fn controller_logging(&self, log: &std::path::Path) -> Process {
        self.start_controller("e2e-controller", &[], Some(log))
    }

    pub fn controller_with(&self, identity: &str, extra: &[&str]) -> Process {
        self.start_controller(identity, extra, None)
    }

    fn start_controller(
        &self,
        identity: &str,
        extra: &[&str],
        log: Option<&std::path::Path>,
    ) -> Process {
        let gateway = format!("127.0.0.1:{}", self.gateway_port);
        let mut args = vec!["--namespace", "fleetpatch-system"];
        if !extra.contains(&"--gateway-listen") {
            args.extend(["--gateway-listen", &gateway]);
        }
        args.extend(["--metrics-listen", "127.0.0.1:0", "--identity", identity]);
        args.extend_from_slice(extra);
        let (process, line) = e2e_support::start_controller_logging(
            &self.controller_kubeconfig,
            &args,
            "metrics listening on",
            log,
        );
        *self.metrics.lock().unwrap() = line.rsplit(' ').next().unwrap().to_string();
        process
    }

    /// Waits until the gateway at `url` answers (the controller has filled its caches).
    pub fn wait_for_gateway(&self, url: &str) {
        let up = eventually(Duration::from_secs(60), || {
            super::e2e::curl(&[&format!("{url}/healthz")]).ends_with("\n200")
        });
        assert!(up, "the gateway at {url} did not come up");
    }

    /// `Authorization` header of a registered agent, from its saved credential.
    pub fn bearer(&self, name: &str) -> String {
        let saved: serde_json::Value = serde_json::from_slice(
            &std::fs::read(self.state_dir(name).join("credential.json")).unwrap(),
        )
        .unwrap();
        format!(
            "Authorization: Bearer {name}.{}",
            saved["credential"].as_str().unwrap()
        )
    }

    pub fn state_dir(&self, name: &str) -> PathBuf {
        self.home.path().join(format!("agent-{name}"))
    }

    pub fn agent(&self, name: &str, group: &str) -> Process {
        self.agent_with(name, group, &[])
    }

    /// An agent with extra flags of `agent run`.
    pub fn agent_with(&self, name: &str, group: &str, extra: &[&str]) -> Process {
        self.agent_on(name, group, &self.gateway, extra)
    }

    /// An agent of another gateway (another controller replica's).
    pub fn agent_at(&self, name: &str, group: &str, gateway: &str) -> Process {
        self.agent_on(name, group, gateway, &[])
    }

    fn agent_on(&self, name: &str, group: &str, gateway: &str, extra: &[&str]) -> Process {
        let child = Command::new(BIN)
            .args(["agent", "run", "--server", gateway, "--token-file"])
            .arg(self.home.path().join("token"))
            .args([
                "--name",
                name,
                "--label",
                &format!("fleetpatch.io/group={group}"),
                "--heartbeat-seconds",
                "1",
                "--state-dir",
            ])
            .arg(self.state_dir(name))
            .args(extra)
            .env("RUST_LOG", e2e_support::child_log_level())
            .env("FLEETPATCH_FORBID_REAL_REBOOT", "1")
            .stdout(Stdio::null())
            .stderr(e2e_support::child_log())
            .spawn()
            .unwrap();
        Process(child)
    }

    pub fn apply(&self, manifest: &str) {
        self.cluster.apply(manifest);
    }

    pub fn get(&self, args: &[&str]) -> String {
        self.cluster.kubectl_ok(args)
    }

    pub fn run_plan(&self, name: &str) {
        e2e_support::run_plan(&self.cluster.kubeconfig, name);
    }

    pub fn wait_for_agents(&self, count: usize) {
        e2e_support::wait_for_ready_agents(&self.cluster, count);
    }

    pub fn wait_for_run(&self, plan: &str, phases: &[&str]) -> String {
        let mut phase = String::new();
        let ok = eventually(Duration::from_secs(60), || {
            phase = self.get(&[
                "get",
                "rplan",
                plan,
                "-o",
                "jsonpath={.status.currentRun.phase}",
            ]);
            let done = self.get(&[
                "get",
                "rplan",
                plan,
                "-o",
                "jsonpath={.status.currentRun.completionTime}",
            ]);
            phases.contains(&phase.as_str()) && !done.is_empty()
        });
        assert!(
            ok,
            "run of {plan} did not finish (phase {phase:?}):\n{}\n{}",
            self.get(&["get", "rplan", plan, "-o", "yaml"]),
            self.get(&["get", "pj"])
        );
        phase
    }
}

pub fn script(name: &str, body: &str) -> String {
    let body: String = body.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "apiVersion: fleetpatch.io/v1alpha1\nkind: Script\nmetadata: {{name: {name}}}\nspec:\n  language: Bash\n  content: |\n{body}---\n\
         apiVersion: fleetpatch.io/v1alpha1\nkind: Task\nmetadata: {{name: {name}}}\nspec:\n  os: Linux\n  type: RunScript\n  timeoutMinutes: 2\n  runScript: {{scriptRef: {{name: {name}}}}}\n---\n"
    )
}

pub fn workflow(name: &str, pre: &[&str], post: &[&str]) -> String {
    let steps = |tasks: &[&str]| {
        tasks
            .iter()
            .map(|t| format!("{{taskRef: {{name: {t}}}}}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "apiVersion: fleetpatch.io/v1alpha1\nkind: Workflow\nmetadata: {{name: {name}}}\nspec:\n  os: Linux\n  preTasks: [{}]\n  postTasks: [{}]\n---\n",
        steps(pre),
        steps(post)
    )
}

pub fn plan(
    name: &str,
    targets: &[(&str, &str, &str, i32)],
    max_concurrent: u32,
    max_failures: u32,
) -> String {
    let targets: String = targets
        .iter()
        .map(|(target, group, workflow, priority)| {
            format!("  - name: {target}\n    os: Linux\n    priority: {priority}\n    selector: {{matchLabels: {{fleetpatch.io/group: {group}}}}}\n    workflowRef: {{name: {workflow}}}\n")
        })
        .collect();
    format!(
        "apiVersion: fleetpatch.io/v1alpha1\nkind: RemediationPlan\nmetadata: {{name: {name}}}\nspec:\n  targets:\n{targets}  patches: {{skip: true}}\n  rollout: {{maxConcurrent: {max_concurrent}, maxFailures: {max_failures}}}\n  reboot: {{policy: Never}}\n"
    )
}

/// A plan over one group that reboots by `policy` (IfRequired, Never, Always).
pub fn plan_with_reboot(name: &str, group: &str, workflow: &str, policy: &str) -> String {
    format!(
        "apiVersion: fleetpatch.io/v1alpha1\nkind: RemediationPlan\nmetadata: {{name: {name}}}\nspec:\n  targets:\n  - {{name: {group}, os: Linux, selector: {{matchLabels: {{fleetpatch.io/group: {group}}}}}, workflowRef: {{name: {workflow}}}}}\n  patches: {{skip: true}}\n  rollout: {{maxConcurrent: 5, maxFailures: 5}}\n  reboot: {{policy: {policy}}}\n"
    )
}
