//! Cluster nodes, end to end with real processes: node agents authenticate over HTTPS
//! with ServiceAccount tokens bound to their pod and node, and a node's reboot is
//! wrapped in cordon, drain (evictions that respect PodDisruptionBudgets, whose status
//! the disruption controller computes) and uncordon, one node of a plan at a time.
//! The cluster is the real control plane (or `fleetpatch dev`) without kubelets: Nodes
//! and Pods are objects only, so the tests set their status, and workload pods have a
//! termination grace period of 0 because no kubelet would finish a graceful deletion.

#![cfg(feature = "full")]

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::e2e::{self as e2e_support, BIN, Process, curl, free_port};
use support::{Cluster, Kubectl, eventually};

const NS: &str = "fleetpatch-system";

/// A private CA and a serving certificate for 127.0.0.1, as files.
struct Certificates {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn certificates(dir: &std::path::Path) -> Certificates {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "fleetpatch test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "fleetpatch gateway");
    let cert = params.signed_by(&key, &issuer).unwrap();
    let files = Certificates {
        ca: dir.join("ca.pem"),
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
    };
    std::fs::write(&files.ca, ca_cert.pem()).unwrap();
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    files
}

struct Nodes {
    cluster: Cluster,
    /// The controller's kubeconfig: its ServiceAccount with the chart's RBAC.
    controller_kubeconfig: PathBuf,
    certs: Certificates,
    gateway: String,
    gateway_port: u16,
    /// Last, so it is removed after the cluster that keeps its files there stopped.
    home: tempfile::TempDir,
}

impl Nodes {
    /// A cluster with the CRDs, the chart's ServiceAccounts and RBAC, the node agent
    /// DaemonSet, and the given Ready nodes, each with its node agent pod.
    fn start(nodes: &[&str]) -> Self {
        let home = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(home.path());
        cluster.install_crds();
        let controller_kubeconfig = cluster.controller_kubeconfig(NS);
        // Made by the chart's templates above; by hand when helm is missing.
        cluster.apply(&format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: fleetpatch-node-agent, namespace: {NS}}}\n"
        ));
        cluster.create_namespace("default");
        let certs = certificates(home.path());
        let gateway_port = free_port();
        let cluster = Nodes {
            gateway: format!("https://127.0.0.1:{gateway_port}"),
            gateway_port,
            certs,
            home,
            cluster,
            controller_kubeconfig,
        };
        cluster.apply(&format!(
            "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: fleetpatch-node-agent, namespace: {NS}}}\nspec:\n  selector: {{matchLabels: {{app: node-agent}}}}\n  template:\n    metadata: {{labels: {{app: node-agent}}}}\n    spec: {{serviceAccountName: fleetpatch-node-agent, containers: [{{name: agent, image: fleetpatch}}]}}\n"
        ));
        let daemonset_uid = cluster.get(&[
            "-n",
            NS,
            "get",
            "daemonset",
            "fleetpatch-node-agent",
            "-o",
            "jsonpath={.metadata.uid}",
        ]);
        for node in nodes {
            cluster.apply(&format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: {node}, labels: {{kubernetes.io/os: linux}}}}\n"
            ));
            cluster.set_node_ready(node, true);
            cluster.apply(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: agent-{node}\n  namespace: {NS}\n  labels: {{app: node-agent}}\n  ownerReferences: [{{apiVersion: apps/v1, kind: DaemonSet, name: fleetpatch-node-agent, uid: {daemonset_uid}, controller: true}}]\nspec:\n  nodeName: {node}\n  serviceAccountName: fleetpatch-node-agent\n  containers: [{{name: agent, image: fleetpatch}}]\n"
            ));
            cluster.set_pod_running(NS, &format!("agent-{node}"));
        }
        cluster
    }

    fn apply(&self, manifest: &str) {
        self.cluster.apply(manifest);
    }

    fn get(&self, args: &[&str]) -> String {
        self.cluster.kubectl_ok(args)
    }

    fn set_node_ready(&self, node: &str, ready: bool) {
        let status = if ready { "True" } else { "False" };
        self.get(&[
            "patch",
            "node",
            node,
            "--subresource=status",
            "--type=merge",
            "-p",
            &format!(
                "{{\"status\":{{\"conditions\":[{{\"type\":\"Ready\",\"status\":\"{status}\",\"reason\":\"KubeletReady\"}}]}}}}"
            ),
        ]);
    }

    fn set_pod_running(&self, namespace: &str, pod: &str) {
        self.get(&[
            "-n",
            namespace,
            "patch",
            "pod",
            pod,
            "--subresource=status",
            "--type=merge",
            "-p",
            "{\"status\":{\"phase\":\"Running\",\"conditions\":[{\"type\":\"Ready\",\"status\":\"True\"}]}}",
        ]);
    }

    /// A workload pod on `node`.
    fn pod(&self, name: &str, node: &str, labels: &str) {
        self.owned_pod(name, node, labels, "");
    }

    /// A workload pod on `node` with `owner` as its metadata's ownerReferences (YAML flow).
    fn owned_pod(&self, name: &str, node: &str, labels: &str, owner: &str) {
        let owner = if owner.is_empty() {
            String::new()
        } else {
            format!(", ownerReferences: [{owner}]")
        };
        self.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{{labels}}}{owner}}}\nspec:\n  nodeName: {node}\n  terminationGracePeriodSeconds: 0\n  containers: [{{name: app, image: app}}]\n"
        ));
        self.set_pod_running("default", name);
    }

    /// A projected-style token of the node agent's ServiceAccount, bound to the agent
    /// pod on `node`, with the given audience.
    fn node_token(&self, node: &str, audience: &str) -> PathBuf {
        let token = self.get(&[
            "-n",
            NS,
            "create",
            "token",
            "fleetpatch-node-agent",
            "--audience",
            audience,
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            &format!("agent-{node}"),
        ]);
        let safe: String = audience
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = self.home.path().join(format!("token-{node}-{safe}"));
        std::fs::write(&path, token.trim()).unwrap();
        path
    }

    fn controller(&self) -> Process {
        self.controller_with(&[])
    }

    /// The controller with extra flags.
    fn controller_with(&self, extra: &[&str]) -> Process {
        let gateway = format!("127.0.0.1:{}", self.gateway_port);
        // The gateway line comes once the controller leads and its caches are filled.
        let mut args = vec![
            "--namespace",
            NS,
            "--node-agent-plan-namespaces",
            "default",
            "--gateway-listen",
            &gateway,
            "--metrics-listen",
            "127.0.0.1:0",
            "--tls-cert-file",
            self.certs.cert.to_str().unwrap(),
            "--tls-key-file",
            self.certs.key.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (process, _) = e2e_support::start_controller(
            &self.controller_kubeconfig,
            &args,
            &format!("gateway listening on https://{gateway}"),
        );
        process
    }

    fn node_agent(&self, node: &str, group: &str) -> Process {
        let child = Command::new(BIN)
            .args(["agent", "run", "--server", &self.gateway, "--node", node])
            .arg("--service-account-token-file")
            .arg(self.node_token(node, "fleetpatch-gateway"))
            .arg("--ca-file")
            .arg(&self.certs.ca)
            .args([
                "--label",
                &format!("fleetpatch.io/group={group}"),
                "--heartbeat-seconds",
                "1",
                "--simulate-reboot",
                "--state-dir",
            ])
            .arg(self.home.path().join(format!("agent-{node}")))
            .env("RUST_LOG", e2e_support::child_log_level())
            .env("FLEETPATCH_FORBID_REAL_REBOOT", "1")
            .stdout(Stdio::null())
            .stderr(e2e_support::child_log())
            .spawn()
            .unwrap();
        Process(child)
    }

    fn wait_for_ready_agents(&self, count: usize) {
        e2e_support::wait_for_ready_agents(&self.cluster, count);
    }

    fn node_field(&self, node: &str, path: &str) -> String {
        self.get(&["get", "node", node, "-o", &format!("jsonpath={path}")])
    }

    fn cordoned(&self, node: &str) -> bool {
        self.node_field(node, "{.spec.unschedulable}") == "true"
    }

    fn job_field(&self, node: &str, path: &str) -> String {
        self.get(&[
            "get",
            "pj",
            "-l",
            &format!("fleetpatch.io/agent={node}"),
            "-o",
            &format!("jsonpath={{.items[0]{path}}}"),
        ])
    }

    fn run_plan(&self, name: &str) {
        e2e_support::run_plan(&self.cluster.kubeconfig, name);
    }

    fn events(&self, node: &str) -> String {
        self.get(&[
            "get",
            "events.events.k8s.io",
            "-A",
            "--field-selector",
            &format!("regarding.kind=Node,regarding.name={node}"),
            "-o",
            "jsonpath={range .items[*]}{.reason}: {.note}{\"\\n\"}{end}",
        ])
    }
}

/// A plan over the node agents of `group` that always reboots: a Bash action, then the reboot.
fn reboot_plan(name: &str, group: &str, max_nodes: u32, drain: &str) -> String {
    format!(
        "apiVersion: fleetpatch.io/v1alpha1\nkind: Script\nmetadata: {{name: hello}}\nspec:\n  language: Bash\n  content: echo patched\n---\n\
         apiVersion: fleetpatch.io/v1alpha1\nkind: Task\nmetadata: {{name: hello}}\nspec: {{os: Linux, type: RunScript, timeoutMinutes: 2, runScript: {{scriptRef: {{name: hello}}}}}}\n---\n\
         apiVersion: fleetpatch.io/v1alpha1\nkind: Workflow\nmetadata: {{name: nodes}}\nspec: {{os: Linux, preTasks: [{{taskRef: {{name: hello}}}}], postTasks: []}}\n---\n\
         apiVersion: fleetpatch.io/v1alpha1\nkind: RemediationPlan\nmetadata: {{name: {name}}}\nspec:\n  targets:\n  - {{name: nodes, os: Linux, selector: {{matchLabels: {{fleetpatch.io/group: {group}}}}}, workflowRef: {{name: nodes}}}}\n  patches: {{skip: true}}\n  rollout: {{maxConcurrent: 10, maxFailures: 10}}\n  reboot: {{policy: Always, maxConcurrentNodes: {max_nodes}, drain: {drain}}}\n"
    )
}

#[test]
fn a_node_agent_speaks_https_and_is_bound_to_its_node() {
    let cluster = Nodes::start(&["node-a", "node-b"]);
    let _controller = cluster.controller();
    let _agent = cluster.node_agent("node-a", "nodes");
    cluster.wait_for_ready_agents(1);
    assert_eq!(
        cluster.get(&[
            "get",
            "agent",
            "node-a",
            "-o",
            "jsonpath={.spec.mode} {.spec.nodeName}"
        ]),
        "Node node-a"
    );
    // The agent reports the host's platform; the status shows it.
    let arch = cluster.get(&[
        "get",
        "agent",
        "node-a",
        "-o",
        "jsonpath={.status.platform.arch}",
    ]);
    assert_eq!(arch, std::env::consts::ARCH);

    let ca = cluster.certs.ca.to_str().unwrap().to_string();
    let token_a =
        std::fs::read_to_string(cluster.node_token("node-a", "fleetpatch-gateway")).unwrap();
    let url = format!("{}/agent/v1/assignments", cluster.gateway);
    let ask = |node: &str, token: &str| {
        curl(&[
            "--cacert",
            &ca,
            "-H",
            &format!("Authorization: Bearer {token}"),
            "-H",
            &format!("x-fleetpatch-node: {node}"),
            &url,
        ])
    };
    // Its own node: fine.
    assert!(
        ask("node-a", &token_a).ends_with("\n200"),
        "{}",
        ask("node-a", &token_a)
    );
    // node-a's token cannot speak for node-b: the one answer every bad credential gets.
    let answer = ask("node-b", &token_a);
    assert!(answer.ends_with("\n401"), "{answer}");
    assert!(answer.contains("{\"error\":\"unauthorized\"}"), "{answer}");
    // A token for another audience (say, the API server's) is refused.
    let wrong_audience =
        std::fs::read_to_string(cluster.node_token("node-a", "https://kubernetes.default.svc"))
            .unwrap();
    let answer = ask("node-a", &wrong_audience);
    assert!(answer.ends_with("\n401"), "{answer}");
    // Another ServiceAccount's token, even bound to a pod on the right node, is not the
    // node agent. (A token can only be bound to a pod that runs as its ServiceAccount.)
    cluster.get(&["-n", NS, "create", "serviceaccount", "intruder"]);
    cluster.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: intruder-a, namespace: {NS}}}\nspec: {{nodeName: node-a, serviceAccountName: intruder, containers: [{{name: x, image: x}}]}}\n"
    ));
    let intruder = cluster.get(&[
        "-n",
        NS,
        "create",
        "token",
        "intruder",
        "--audience",
        "fleetpatch-gateway",
        "--bound-object-kind",
        "Pod",
        "--bound-object-name",
        "intruder-a",
    ]);
    let answer = ask("node-a", intruder.trim());
    assert!(answer.ends_with("\n401"), "{answer}");
    // The gateway speaks only TLS, and only with a certificate the agent trusts.
    let plain = curl(&[&url.replace("https://", "http://")]);
    assert!(!plain.ends_with("\n200"), "{plain}");
    let untrusted = curl(&[&url]);
    assert!(untrusted.ends_with("\n000"), "{untrusted}");
}

#[test]
fn node_reboots_are_drained_one_node_at_a_time_and_uncordoned_after() {
    let cluster = Nodes::start(&["node-a", "node-b"]);
    cluster.pod("web-a", "node-a", "app: web");
    cluster.pod("web-b", "node-b", "app: web");
    cluster.pod("keep-a", "node-a", "fleetpatch.io/keep: \"yes\"");
    let _controller = cluster.controller();
    let mut agent_a = cluster.node_agent("node-a", "nodes");
    let mut agent_b = cluster.node_agent("node-b", "nodes");
    cluster.wait_for_ready_agents(2);
    cluster.apply(&reboot_plan(
        "nodes",
        "nodes",
        1,
        "{timeoutSeconds: 60, ignorePodSelector: {matchLabels: {fleetpatch.io/keep: \"yes\"}}}",
    ));
    cluster.run_plan("nodes");

    // One agent is allowed to reboot (its process ends); the other waits its turn.
    let mut first = None;
    eventually(Duration::from_secs(60), || {
        if !agent_a.running() {
            first = Some("node-a");
        } else if !agent_b.running() {
            first = Some("node-b");
        }
        first.is_some()
    });
    let first = first.unwrap_or_else(|| {
        panic!(
            "no node agent rebooted:\n{}",
            cluster.get(&["get", "pj,nodes", "-o", "yaml"])
        )
    });
    let second = if first == "node-a" {
        "node-b"
    } else {
        "node-a"
    };
    assert!(cluster.cordoned(first), "the rebooting node is cordoned");
    assert_eq!(
        cluster.node_field(first, "{.metadata.annotations.fleetpatch\\.io/cordoned}"),
        "true"
    );
    // Its workload was evicted; the DaemonSet pod and the ignored pod stayed.
    let pods = cluster.get(&["get", "pods", "-A", "-o", "name"]);
    let web_first = format!("pod/web-{}", &first[5..]);
    assert!(
        !pods.contains(&web_first),
        "{web_first} was evicted:\n{pods}"
    );
    assert!(pods.contains(&format!("pod/agent-{first}")), "{pods}");
    assert!(pods.contains("pod/keep-a"), "{pods}");
    assert_eq!(
        cluster.job_field(first, ".status.reboot.state"),
        "InProgress"
    );
    // The second node is neither cordoned nor drained while the first reboots.
    std::thread::sleep(Duration::from_secs(2));
    assert!(!cluster.cordoned(second), "two nodes of the plan at once");
    assert!(
        pods.contains(&format!("pod/web-{}", &second[5..])),
        "{pods}"
    );
    let waiting = cluster.job_field(
        second,
        ".metadata.annotations.fleetpatch\\.io/reboot-message",
    );
    assert!(
        waiting.starts_with("waiting: 1 node(s) of plan default/nodes"),
        "{waiting}"
    );

    // The "host" went down: the node is NotReady for a while, then the agent is back.
    cluster.set_node_ready(first, false);
    let _back = cluster.node_agent(first, "nodes");
    let job_done = eventually(Duration::from_secs(30), || {
        cluster.job_field(first, ".status.phase") == "Succeeded"
    });
    assert!(job_done, "{}", cluster.get(&["get", "pj", "-o", "yaml"]));
    assert_eq!(
        cluster.job_field(first, ".status.reboot.state"),
        "Completed"
    );
    // Not uncordoned while NotReady...
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        cluster.cordoned(first),
        "uncordoned before the node was Ready"
    );
    // ...and uncordoned once Ready, with our annotations gone.
    cluster.set_node_ready(first, true);
    assert!(
        eventually(Duration::from_secs(20), || !cluster.cordoned(first)),
        "the node was not uncordoned"
    );
    assert!(
        !cluster
            .node_field(first, "{.metadata.annotations}")
            .contains("fleetpatch.io/")
    );
    let events = cluster.events(first);
    for reason in ["Cordoned:", "Drained:", "Uncordoned:"] {
        assert!(events.contains(reason), "no {reason} event:\n{events}");
    }

    // Then the second node's turn.
    let mut second_agent = if second == "node-a" { agent_a } else { agent_b };
    assert_eq!(
        second_agent.wait_exit(Duration::from_secs(60)),
        Some(3),
        "the second node agent did not reboot:\n{}",
        cluster.get(&["get", "pj,nodes", "-o", "yaml"])
    );
    assert!(cluster.cordoned(second));
    let _second_back = cluster.node_agent(second, "nodes");
    assert!(eventually(Duration::from_secs(30), || {
        cluster.job_field(second, ".status.phase") == "Succeeded" && !cluster.cordoned(second)
    }));
}

#[test]
fn a_budget_that_forbids_eviction_times_out_and_the_node_is_uncordoned() {
    let cluster = Nodes::start(&["node-a"]);
    cluster.pod("db-0", "node-a", "app: db");
    cluster.apply(
        "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata: {name: db, namespace: default}\nspec: {minAvailable: 1, selector: {matchLabels: {app: db}}}\n",
    );
    let _controller = cluster.controller();
    let mut agent = cluster.node_agent("node-a", "nodes");
    cluster.wait_for_ready_agents(1);
    cluster.apply(&reboot_plan("db", "nodes", 1, "{timeoutSeconds: 3}"));
    cluster.run_plan("db");

    let failed = eventually(Duration::from_secs(60), || {
        cluster.job_field("node-a", ".status.phase") == "Failed"
    });
    assert!(failed, "{}", cluster.get(&["get", "pj", "-o", "yaml"]));
    let message = cluster.job_field("node-a", ".status.message");
    assert!(
        message.contains("drain of node node-a timed out"),
        "{message}"
    );
    assert!(message.contains("default/db-0"), "{message}");
    assert!(message.contains("disruption budget"), "{message}");
    assert_eq!(
        cluster.job_field("node-a", ".status.reboot.state"),
        "RequiredNotPerformed"
    );
    // The pod is still there, the host did not reboot, the node is schedulable again.
    cluster.get(&["get", "pod", "db-0"]);
    assert!(agent.running(), "the agent rebooted despite the denial");
    assert!(eventually(Duration::from_secs(10), || !cluster.cordoned("node-a")));
    assert!(cluster.events("node-a").contains("DrainTimedOut:"));
    // `kubectl wait` sees the failure.
    cluster.get(&[
        "wait",
        "--for=condition=Failed",
        "pj",
        "--all",
        "--timeout=10s",
    ]);
}

#[test]
fn a_cordoned_node_is_uncordoned_after_a_controller_restart_when_its_plan_is_gone() {
    let cluster = Nodes::start(&["node-a"]);
    cluster.pod("db-0", "node-a", "app: db");
    cluster.apply(
        "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata: {name: db, namespace: default}\nspec: {minAvailable: 1, selector: {matchLabels: {app: db}}}\n",
    );
    let mut controller = cluster.controller();
    let _agent = cluster.node_agent("node-a", "nodes");
    cluster.wait_for_ready_agents(1);
    cluster.apply(&reboot_plan("db", "nodes", 1, "{timeoutSeconds: 600}"));
    cluster.run_plan("db");
    // The drain is stuck on the budget: the node stays cordoned.
    assert!(
        eventually(Duration::from_secs(60), || cluster.cordoned("node-a")),
        "the node was not cordoned"
    );
    let _ = controller.0.kill();
    let _ = controller.0.wait();
    // With the controller down, the plan (and with it its jobs) is deleted. The garbage
    // collector deletes the jobs; a real one learns of new CRDs from discovery every
    // 30 s, so this can take that long after the CRDs were installed. They stay
    // (Terminating) until the controller removes its finalizer.
    cluster.get(&["delete", "rplan", "db", "--wait=false"]);
    assert!(eventually(Duration::from_secs(90), || {
        !cluster
            .get(&[
                "get",
                "pj",
                "-o",
                "jsonpath={.items[*].metadata.deletionTimestamp}",
            ])
            .is_empty()
    }));
    assert!(cluster.cordoned("node-a"));
    let _controller = cluster.controller();
    assert!(
        eventually(Duration::from_secs(30), || cluster
            .get(&["get", "pj", "-o", "name"])
            .is_empty()),
        "the deleted jobs stayed after the restart"
    );
    assert!(
        eventually(Duration::from_secs(30), || !cluster.cordoned("node-a")),
        "the node stayed cordoned after the restart"
    );
    assert!(
        !cluster
            .node_field("node-a", "{.metadata.annotations}")
            .contains("fleetpatch.io/")
    );
}

/// A budget of `maxUnavailable: 1` over a ReplicaSet of two, one pod on each of two
/// nodes that reboot together: the first eviction uses the one disruption the budget
/// allows (the disruption controller's `status.disruptionsAllowed`), so the second node's
/// drain is held, saying why, until the ReplicaSet's replacement is Ready elsewhere.
#[test]
fn a_budget_over_a_replicaset_holds_the_second_drain_until_a_replacement_is_ready() {
    let cluster = Nodes::start(&["node-a", "node-b", "node-c"]);
    cluster.apply(
        "apiVersion: apps/v1\nkind: ReplicaSet\nmetadata: {name: web, namespace: default}\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: app, image: app}]}\n",
    );
    let uid = cluster.get(&["get", "replicaset", "web", "-o", "jsonpath={.metadata.uid}"]);
    let owner = format!(
        "{{apiVersion: apps/v1, kind: ReplicaSet, name: web, uid: {uid}, controller: true}}"
    );
    cluster.owned_pod("web-a", "node-a", "app: web", &owner);
    cluster.owned_pod("web-b", "node-b", "app: web", &owner);
    cluster.apply(
        "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata: {name: web, namespace: default}\nspec: {maxUnavailable: 1, selector: {matchLabels: {app: web}}}\n",
    );
    let budget = |field: &str| {
        cluster.get(&[
            "get",
            "pdb",
            "web",
            "-o",
            &format!("jsonpath={{.status.{field}}}"),
        ])
    };
    assert!(
        eventually(Duration::from_secs(30), || budget("disruptionsAllowed")
            == "1"),
        "the budget never allowed a disruption: {}",
        cluster.get(&["get", "pdb", "web", "-o", "yaml"])
    );
    let _controller = cluster.controller_with(&["--max-node-reboots", "2"]);
    let mut agent_a = cluster.node_agent("node-a", "pair");
    let mut agent_b = cluster.node_agent("node-b", "pair");
    cluster.wait_for_ready_agents(2);
    cluster.apply(&reboot_plan("pair", "pair", 2, "{timeoutSeconds: 120}"));
    cluster.run_plan("pair");

    // One node drains and reboots; the other's eviction is refused by the budget.
    let mut first = None;
    eventually(Duration::from_secs(60), || {
        if !agent_a.running() {
            first = Some("node-a");
        } else if !agent_b.running() {
            first = Some("node-b");
        }
        first.is_some()
    });
    let first = first.unwrap_or_else(|| {
        panic!(
            "no node agent rebooted:\n{}",
            cluster.get(&["get", "pj,pdb,pods", "-A", "-o", "yaml"])
        )
    });
    let (second, second_pod) = if first == "node-a" {
        ("node-b", "web-b")
    } else {
        ("node-a", "web-a")
    };
    let mut held = String::new();
    let is_held = eventually(Duration::from_secs(30), || {
        held = cluster.job_field(
            second,
            ".metadata.annotations.fleetpatch\\.io/reboot-message",
        );
        held.contains("evictions refused") && held.contains(&format!("default/{second_pod}"))
    });
    assert!(
        is_held,
        "the second drain is not held by the budget: {held:?}"
    );
    assert!(held.contains("disruption budget"), "{held}");
    assert_eq!(budget("disruptionsAllowed"), "0");
    let second_agent = if second == "node-a" {
        &mut agent_a
    } else {
        &mut agent_b
    };
    assert!(
        second_agent.running(),
        "the second node rebooted past the budget"
    );
    cluster.get(&["get", "pod", second_pod]);

    // The ReplicaSet's replacement becomes Ready on the third node: one disruption is
    // allowed again, and the second drain completes.
    cluster.owned_pod("web-c", "node-c", "app: web", &owner);
    assert_eq!(
        second_agent.wait_exit(Duration::from_secs(60)),
        Some(3),
        "the second node agent did not reboot once the budget allowed it:\n{}",
        cluster.get(&["get", "pj,pdb", "-o", "yaml"])
    );
    assert!(
        cluster
            .cluster
            .kubectl(&["get", "pod", second_pod])
            .status
            .code()
            != Some(0),
        "{second_pod} was not evicted"
    );
}
