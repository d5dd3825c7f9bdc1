//! The Helm chart (`charts/fleetpatch`) and the files for external hosts (`deploy/`):
//! lint with default, full and broken values; the rendered manifests' security-relevant
//! properties; the manifests checked against the API schemas by `fleetpatch dev`; a real
//! `helm install`, upgrade and uninstall; and the agent install script.
//!
//! helm 4 and the newer kubectl come from `scripts/install-test-tools.sh` (into
//! target/tools/bin). Without them these tests skip loudly on a developer machine and fail
//! when `CI` is set.

#![cfg(feature = "full")]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::Deserialize;
use serde_json::{Value, json};

use support::prerequisite::tool;
use support::{Cluster, Kubectl, repo};

const NAMESPACE: &str = "fleetpatch-system";
const RELEASE: &str = "fleetpatch";

fn chart() -> PathBuf {
    repo().join("charts/fleetpatch")
}

fn full_values() -> PathBuf {
    chart().join("ci/full-values.yaml")
}

/// helm with its own cache, config and data directories (no repositories, no plugins).
struct Helm {
    bin: PathBuf,
    home: tempfile::TempDir,
}

impl Helm {
    fn new() -> Option<Self> {
        Some(Self {
            bin: tool("helm")?,
            home: tempfile::tempdir().unwrap(),
        })
    }

    fn isolate(&self, command: &mut Command) {
        let home = self.home.path();
        command
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .current_dir(repo());
    }

    fn output(&self, args: &[&str]) -> Output {
        let mut command = Command::new(&self.bin);
        command
            .args(args)
            .env("KUBECONFIG", self.home.path().join("no-cluster"));
        self.isolate(&mut command);
        command.output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        succeeded(&format!("helm {args:?}"), self.output(args))
    }

    /// helm against a cluster.
    fn ok_on(&self, server: &impl Kubectl, args: &[&str]) -> String {
        let mut command = server.command(self.bin.to_str().unwrap());
        command.args(args);
        self.isolate(&mut command);
        succeeded(&format!("helm {args:?}"), command.output().unwrap())
    }

    fn render(&self, extra: &[&str]) -> Manifests {
        let chart = chart();
        let mut args = vec![
            "template",
            RELEASE,
            chart.to_str().unwrap(),
            "--namespace",
            NAMESPACE,
        ];
        args.extend_from_slice(extra);
        let text = self.ok(&args);
        Manifests::parse(&text)
    }
}

fn succeeded(what: &str, output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Rendered objects, in order, with the YAML they came from.
struct Manifests {
    text: String,
    objects: Vec<Value>,
}

impl Manifests {
    fn parse(text: &str) -> Self {
        let mut objects = Vec::new();
        for document in serde_yaml_ng::Deserializer::from_str(text) {
            let value = Value::deserialize(document).expect("helm renders valid YAML");
            if !value.is_null() {
                objects.push(value);
            }
        }
        Self {
            text: text.to_string(),
            objects,
        }
    }

    fn kinds(&self) -> BTreeSet<String> {
        self.objects
            .iter()
            .map(|o| format!("{}/{}", o["kind"].as_str().unwrap(), name(o)))
            .collect()
    }

    fn find(&self, kind: &str, name_: &str) -> Option<&Value> {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind && name(o) == name_)
    }

    fn get(&self, kind: &str, name_: &str) -> &Value {
        self.find(kind, name_)
            .unwrap_or_else(|| panic!("{kind}/{name_} is not rendered; have {:?}", self.kinds()))
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    /// The rendered YAML without the kinds `fleetpatch dev` does not serve.
    fn yaml_without(&self, kinds: &[&str]) -> String {
        self.objects
            .iter()
            .filter(|o| !kinds.contains(&o["kind"].as_str().unwrap()))
            .map(|o| format!("---\n{}", serde_yaml_ng::to_string(o).unwrap()))
            .collect()
    }
}

fn name(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn container<'a>(workload: &'a Value, name_: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name_)
        .unwrap_or_else(|| panic!("no container {name_} in {}", name(workload)))
}

/// The value of `--flag=value` in a container's args.
fn flag(container: &Value, flag: &str) -> Option<String> {
    let prefix = format!("{flag}=");
    strings(&container["args"])
        .into_iter()
        .find_map(|a| a.strip_prefix(&prefix).map(String::from))
}

fn volume<'a>(workload: &'a Value, name_: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name_)
        .unwrap_or_else(|| panic!("no volume {name_} in {}", name(workload)))
}

/// Where the volume holding `path` (a file) is mounted: (volume name, file inside it).
fn volume_of_file<'a>(container: &'a Value, path: &str) -> (&'a str, String) {
    container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|m| {
            let dir = m["mountPath"]
                .as_str()
                .unwrap()
                .trim_end_matches(['/', '\\']);
            let rest = path.strip_prefix(dir)?;
            let rest = rest.strip_prefix(['/', '\\'])?;
            Some((m["name"].as_str().unwrap(), rest.to_string()))
        })
        .unwrap_or_else(|| panic!("{path} is on no volume mount of {}", container["name"]))
}

/// A volume's projected ServiceAccount token source.
fn token_source(volume: &Value) -> &Value {
    volume["projected"]["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["serviceAccountToken"])
        .find(|s| !s.is_null())
        .expect("a serviceAccountToken source")
}

/// (apiGroup, resource, resourceName or "") → verbs, over every rule of a role.
fn grants(role: &Value) -> BTreeMap<(String, String, String), BTreeSet<String>> {
    let mut out: BTreeMap<_, BTreeSet<String>> = BTreeMap::new();
    for rule in role["rules"].as_array().unwrap() {
        let names = match strings(&rule["resourceNames"]) {
            names if names.is_empty() => vec![String::new()],
            names => names,
        };
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for resource_name in &names {
                    out.entry((group.clone(), resource.clone(), resource_name.clone()))
                        .or_default()
                        .extend(strings(&rule["verbs"]));
                }
            }
        }
    }
    out
}

fn expected(
    rows: &[(&str, &str, &str, &[&str])],
) -> BTreeMap<(String, String, String), BTreeSet<String>> {
    rows.iter()
        .map(|(group, resource, name_, verbs)| {
            (
                (group.to_string(), resource.to_string(), name_.to_string()),
                verbs.iter().map(|v| v.to_string()).collect(),
            )
        })
        .collect()
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .unwrap()
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
}

fn decode(data: &Value) -> String {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.as_str().unwrap())
        .unwrap();
    String::from_utf8(bytes).unwrap()
}

/// `openssl x509` on a PEM certificate: its subject alternative names (None without openssl).
fn certificate_names(pem: &str) -> Option<String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cert.pem");
    std::fs::write(&path, pem).unwrap();
    let output = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(&path)
        .output()
        .ok()?;
    Some(succeeded("openssl x509", output))
}

fn openssl_verifies(ca: &str, cert: &str) -> Option<bool> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca).unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert).unwrap();
    let output = Command::new("openssl")
        .args(["verify", "-CAfile", "ca.pem", "cert.pem"])
        .current_dir(dir.path())
        .output()
        .ok()?;
    Some(output.status.success())
}

#[test]
fn chart_crds_are_the_generated_crds_and_app_version_is_the_crate_version() {
    let generated = repo().join("crds");
    let copied = chart().join("crds");
    let names = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(
        names(&generated),
        names(&copied),
        "charts/fleetpatch/crds/ must hold exactly the files of crds/: cp crds/*.yaml charts/fleetpatch/crds/"
    );
    assert_eq!(names(&copied).len(), 6);
    for file in names(&generated) {
        assert!(
            std::fs::read(generated.join(&file)).unwrap()
                == std::fs::read(copied.join(&file)).unwrap(),
            "charts/fleetpatch/crds/{file} differs from crds/{file}: cp crds/*.yaml charts/fleetpatch/crds/"
        );
    }

    let chart_yaml: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(chart().join("Chart.yaml")).unwrap())
            .unwrap();
    assert_eq!(chart_yaml["apiVersion"], "v2");
    assert_eq!(chart_yaml["appVersion"], env!("CARGO_PKG_VERSION"));
    assert_eq!(chart_yaml["kubeVersion"], ">=1.33.0-0");
}

#[test]
fn every_rbac_verb_says_why() {
    let text = std::fs::read_to_string(chart().join("templates/rbac.yaml")).unwrap();
    let verb = regex::Regex::new(
        r"^\s+- (get|list|watch|create|update|patch|delete|deletecollection|\*)\b(.*)$",
    )
    .unwrap();
    let mut seen = 0;
    for line in text.lines() {
        if let Some(found) = verb.captures(line) {
            seen += 1;
            let reason = found[2].trim();
            assert!(
                reason.starts_with('#') && reason.len() > 10,
                "RBAC verb without a reason: {line:?}"
            );
        }
    }
    assert!(seen >= 25, "only {seen} verbs found in rbac.yaml");
}

#[test]
fn lint_accepts_default_and_full_values() {
    let Some(helm) = Helm::new() else { return };
    let chart = chart();
    let chart = chart.to_str().unwrap();
    let full = full_values();
    for args in [
        vec!["lint", chart],
        vec!["lint", "--strict", chart],
        vec!["lint", "--strict", chart, "-f", full.to_str().unwrap()],
        vec![
            "lint",
            "--strict",
            chart,
            "--set",
            "controller.replicas=1,nodeAgent.linux.enabled=false,nodeAgent.windows.enabled=true",
        ],
    ] {
        let out = helm.ok(&args);
        assert!(out.contains("0 chart(s) failed"), "{out}");
    }
}

#[test]
fn lint_rejects_bad_values_and_names_the_field() {
    let Some(helm) = Helm::new() else { return };
    let dir = tempfile::tempdir().unwrap();
    let chart = chart();
    for (case, values, field) in [
        (
            "typo",
            "controller:\n  replica: 3\n",
            "'replica' not allowed",
        ),
        (
            "wrong type",
            "controller:\n  replicas: two\n",
            "/controller/replicas",
        ),
        (
            "top-level typo",
            "nodeAgnet:\n  linux: {enabled: true}\n",
            "'nodeAgnet' not allowed",
        ),
        (
            "typo in tls",
            "gateway:\n  tls:\n    existingSecert: x\n",
            "'existingSecert' not allowed",
        ),
        (
            "token without a token",
            "bootstrapTokens:\n  - name: join\n    usage: multi\n",
            "missing property 'token'",
        ),
        (
            "unknown usage",
            "bootstrapTokens:\n  - {name: join, token: abc, usage: sometimes}\n",
            "/bootstrapTokens/0/usage",
        ),
        (
            "expiration not RFC 3339",
            "bootstrapTokens:\n  - {name: join, token: abc, expiration: tomorrow}\n",
            "/bootstrapTokens/0/expiration",
        ),
        (
            "service type",
            "gateway:\n  service:\n    type: Ingress\n",
            "/gateway/service/type",
        ),
    ] {
        let file = dir.path().join(format!("{}.yaml", case.replace(' ', "-")));
        std::fs::write(&file, values).unwrap();
        let output = helm.output(&[
            "lint",
            chart.to_str().unwrap(),
            "-f",
            file.to_str().unwrap(),
        ]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            !output.status.success(),
            "{case}: helm lint accepted it:\n{text}"
        );
        assert!(
            text.contains("values don't meet the specifications of the schema"),
            "{case}: not a schema error:\n{text}"
        );
        assert!(
            text.contains(field),
            "{case}: the error does not name {field}:\n{text}"
        );
        // install and template check the same schema.
        let output = helm.output(&[
            "template",
            "x",
            chart.to_str().unwrap(),
            "-f",
            file.to_str().unwrap(),
        ]);
        assert!(
            !output.status.success(),
            "{case}: helm template accepted it"
        );
    }
}

#[test]
fn default_render_is_least_privilege_and_wired_together() {
    let Some(helm) = Helm::new() else { return };
    let out = helm.render(&[]);
    let kinds = out.kinds();
    for expected in [
        "ServiceAccount/fleetpatch-controller",
        "ServiceAccount/fleetpatch-node-agent",
        "ClusterRole/fleetpatch-controller",
        "ClusterRoleBinding/fleetpatch-controller",
        "Role/fleetpatch-controller",
        "RoleBinding/fleetpatch-controller",
        "Deployment/fleetpatch-controller",
        "PodDisruptionBudget/fleetpatch-controller",
        "DaemonSet/fleetpatch-node-agent-linux",
        "Service/fleetpatch-gateway",
        "Service/fleetpatch-metrics",
        "Secret/fleetpatch-gateway-tls",
        "Secret/fleetpatch-gateway-ca",
        "ConfigMap/fleetpatch-gateway-ca",
        "ValidatingAdmissionPolicy/fleetpatch-builtin-library",
        "ValidatingAdmissionPolicyBinding/fleetpatch-builtin-library",
    ] {
        assert!(kinds.contains(expected), "{expected} missing: {kinds:?}");
    }
    for absent in [
        "DaemonSet/fleetpatch-node-agent-windows",
        "ServiceMonitor/fleetpatch-controller",
        "NetworkPolicy/fleetpatch-controller",
    ] {
        assert!(!kinds.contains(absent), "{absent} is on by default");
    }
    assert!(
        out.all("CustomResourceDefinition").is_empty(),
        "CRDs belong in crds/, not templates/"
    );
    for object in &out.objects {
        let cluster_scoped = [
            "ClusterRole",
            "ClusterRoleBinding",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ];
        if !cluster_scoped.contains(&object["kind"].as_str().unwrap_or_default()) {
            assert_eq!(
                object["metadata"]["namespace"],
                NAMESPACE,
                "{}",
                name(object)
            );
        }
    }

    // RBAC: exactly these grants, nothing else.
    let status: Vec<String> = [
        "scripts",
        "tasks",
        "workflows",
        "remediationplans",
        "patchjobs",
        "agents",
    ]
    .iter()
    .map(|r| format!("{r}/status"))
    .collect();
    let mut cluster = expected(&[
        (
            "fleetpatch.io",
            "scripts",
            "",
            &["list", "watch", "create", "patch"],
        ),
        (
            "fleetpatch.io",
            "tasks",
            "",
            &["list", "watch", "create", "patch"],
        ),
        (
            "fleetpatch.io",
            "workflows",
            "",
            &["list", "watch", "create", "patch"],
        ),
        ("fleetpatch.io", "remediationplans", "", &["list", "watch"]),
        (
            "fleetpatch.io",
            "patchjobs",
            "",
            &["get", "list", "watch", "create", "patch", "delete"],
        ),
        (
            "fleetpatch.io",
            "agents",
            "",
            &["list", "watch", "create", "patch", "delete"],
        ),
        ("events.k8s.io", "events", "", &["create", "patch"]),
        ("authentication.k8s.io", "tokenreviews", "", &["create"]),
        ("", "namespaces", "", &["list", "watch"]),
        ("", "nodes", "", &["get", "list", "watch", "patch"]),
        ("", "pods", "", &["list"]),
        ("", "pods/eviction", "", &["create"]),
    ]);
    for resource in &status {
        cluster.insert(
            ("fleetpatch.io".into(), resource.clone(), String::new()),
            ["patch"].iter().map(|v| v.to_string()).collect(),
        );
    }
    assert_eq!(
        grants(out.get("ClusterRole", "fleetpatch-controller")),
        cluster
    );
    let namespaced = expected(&[
        (
            "",
            "secrets",
            "",
            &["get", "list", "watch", "create", "patch", "delete"],
        ),
        ("", "pods", "", &["patch"]),
        (
            "coordination.k8s.io",
            "leases",
            "",
            &["get", "list", "watch", "create", "update", "patch"],
        ),
    ]);
    assert_eq!(grants(out.get("Role", "fleetpatch-controller")), namespaced);

    // Bindings: the controller's ServiceAccount only; the node agent's is bound to nothing.
    for (kind, role_kind) in [
        ("ClusterRoleBinding", "ClusterRole"),
        ("RoleBinding", "Role"),
    ] {
        let binding = out.get(kind, "fleetpatch-controller");
        assert_eq!(binding["roleRef"]["kind"], role_kind);
        assert_eq!(binding["roleRef"]["name"], "fleetpatch-controller");
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": "fleetpatch-controller", "namespace": NAMESPACE}])
        );
    }
    assert_eq!(
        out.all("ClusterRoleBinding").len() + out.all("RoleBinding").len(),
        2
    );
    assert!(
        !out.text
            .contains("name: fleetpatch-node-agent\n    namespace"),
        "node agent bound"
    );
    let agent_account = out.get("ServiceAccount", "fleetpatch-node-agent");
    assert_eq!(agent_account["automountServiceAccountToken"], false);

    // Controller: flags, downward API, probes, hardening.
    let deployment = out.get("Deployment", "fleetpatch-controller");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "fleetpatch-controller");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let controller = container(deployment, "controller");
    assert_eq!(
        controller["image"],
        format!(
            "ghcr.io/fleetpatch/fleetpatch:{}",
            env!("CARGO_PKG_VERSION")
        )
    );
    assert_eq!(strings(&controller["args"])[0], "controller");
    let security = &controller["securityContext"];
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert!(security.get("privileged").is_none_or(|p| p == false));
    assert!(controller["resources"]["requests"]["memory"].is_string());
    assert!(controller["resources"]["limits"]["memory"].is_string());
    let env: BTreeMap<String, Value> = controller["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect();
    assert_eq!(
        env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(
        env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    let ports: BTreeMap<&str, &Value> = controller["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), &p["containerPort"]))
        .collect();
    assert_eq!(ports["gateway"], 8443);
    assert_eq!(ports["metrics"], 8080);
    assert_eq!(
        flag(controller, "--metrics-listen").unwrap(),
        "0.0.0.0:8080"
    );
    assert_eq!(
        flag(controller, "--gateway-listen").unwrap(),
        "0.0.0.0:8443"
    );
    assert_eq!(
        controller["livenessProbe"]["httpGet"],
        json!({"path": "/healthz", "port": "metrics"})
    );
    assert_eq!(
        controller["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": "metrics"})
    );
    // The certificate files come from the TLS Secret the chart made.
    for (flag_name, key) in [
        ("--tls-cert-file", "tls.crt"),
        ("--tls-key-file", "tls.key"),
    ] {
        let path = flag(controller, flag_name).unwrap_or_else(|| panic!("{flag_name} missing"));
        let (volume_name, file) = volume_of_file(controller, &path);
        let source = &volume(deployment, volume_name)["secret"];
        assert_eq!(source["secretName"], "fleetpatch-gateway-tls");
        let items = source["items"].as_array().unwrap();
        assert!(
            items
                .iter()
                .any(|i| i["key"] == key && i["path"] == file.as_str()),
            "{key}"
        );
    }

    // The PDB covers the controller pods.
    let budget = out.get("PodDisruptionBudget", "fleetpatch-controller");
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert!(labels_match(
        &budget["spec"]["selector"]["matchLabels"],
        pod_labels
    ));
    assert!(labels_match(
        &deployment["spec"]["selector"]["matchLabels"],
        pod_labels
    ));
    assert_eq!(budget["spec"]["maxUnavailable"], 1);

    // Services: the gateway on 8443 to every controller pod (each replica serves it),
    // metrics to every controller pod.
    let gateway = out.get("Service", "fleetpatch-gateway");
    assert!(labels_match(&gateway["spec"]["selector"], pod_labels));
    assert!(
        gateway["spec"]["selector"]
            .get("fleetpatch.io/leader")
            .is_none(),
        "the gateway must not follow the leader"
    );
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap();
    assert!(
        args.contains(&json!("--node-agent-plan-namespaces=")),
        "{args:?}"
    );
    assert!(args.contains(&json!("--max-node-reboots=1")), "{args:?}");
    assert_eq!(gateway["spec"]["type"], "ClusterIP");
    assert_eq!(
        gateway["spec"]["ports"],
        json!([{"name": "gateway", "port": 8443, "targetPort": "gateway", "protocol": "TCP"}])
    );
    let metrics = out.get("Service", "fleetpatch-metrics");
    assert!(labels_match(&metrics["spec"]["selector"], pod_labels));
    assert_eq!(metrics["spec"]["ports"][0]["targetPort"], "metrics");

    // Linux node agent: host access exactly as documented, and wired to the gateway.
    let daemonset = out.get("DaemonSet", "fleetpatch-node-agent-linux");
    let agent_pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(agent_pod["hostPID"], true);
    assert!(agent_pod.get("hostNetwork").is_none_or(|h| h == false));
    assert_eq!(agent_pod["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(agent_pod["automountServiceAccountToken"], false);
    assert_eq!(agent_pod["serviceAccountName"], "fleetpatch-node-agent");
    assert_eq!(agent_pod["priorityClassName"], "system-node-critical");
    assert_eq!(agent_pod["tolerations"], json!([{"operator": "Exists"}]));
    assert_eq!(daemonset["spec"]["updateStrategy"]["type"], "RollingUpdate");
    let agent = container(daemonset, "agent");
    // The agent build, not the controller's image (Dockerfile, target `agent`).
    assert_eq!(
        agent["image"],
        format!(
            "ghcr.io/fleetpatch/fleetpatch-agent:{}",
            env!("CARGO_PKG_VERSION")
        )
    );
    assert_eq!(agent["securityContext"]["privileged"], true);
    let host_paths: Vec<(&str, &str)> = agent_pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| !v["hostPath"].is_null())
        .map(|v| {
            (
                v["name"].as_str().unwrap(),
                v["hostPath"]["path"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        host_paths,
        [("host-root", "/"), ("state", "/var/lib/fleetpatch")]
    );
    let mounts: BTreeMap<&str, &str> = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap(),
                m["mountPath"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(mounts["host-root"], "/host");
    assert_eq!(
        mounts["state"], "/var/lib/fleetpatch",
        "the state dir must be at the host's path"
    );
    assert_eq!(strings(&agent["args"])[..2], ["agent", "run"]);
    assert!(strings(&agent["args"]).contains(&"--host-namespaces".to_string()));
    assert_eq!(flag(agent, "--state-dir").unwrap(), "/var/lib/fleetpatch");
    assert_eq!(
        flag(agent, "--server").unwrap(),
        format!("https://fleetpatch-gateway.{NAMESPACE}.svc:8443")
    );
    assert_eq!(flag(agent, "--node").unwrap(), "$(NODE_NAME)");
    let node_env = agent["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "NODE_NAME")
        .unwrap();
    assert_eq!(
        node_env["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    // The token the agent sends is the projected one for the controller's audience.
    let token_path = flag(agent, "--service-account-token-file").unwrap();
    let (token_volume, token_file) = volume_of_file(agent, &token_path);
    let token = token_source(volume(daemonset, token_volume));
    assert_eq!(token["path"], token_file.as_str());
    assert_eq!(token["expirationSeconds"], 3600);
    assert_eq!(token["audience"], "fleetpatch-gateway");
    assert_eq!(
        token["audience"].as_str().unwrap(),
        flag(controller, "--gateway-audience").unwrap()
    );
    assert_eq!(
        flag(controller, "--node-agent-service-account").unwrap(),
        agent_pod["serviceAccountName"].as_str().unwrap()
    );
    // The agent trusts the CA that signed the gateway's certificate, from a ConfigMap
    // (nodes can read what their pods mount, so never the Secret with the key).
    let ca_path = flag(agent, "--ca-file").unwrap();
    let (ca_volume, ca_file) = volume_of_file(agent, &ca_path);
    let ca_source = &volume(daemonset, ca_volume)["configMap"];
    assert_eq!(ca_source["name"], "fleetpatch-gateway-ca");
    assert_eq!(
        ca_source["items"],
        json!([{"key": "ca.crt", "path": ca_file}])
    );
    let ca_map = out.get("ConfigMap", "fleetpatch-gateway-ca");
    let tls = out.get("Secret", "fleetpatch-gateway-tls");
    assert_eq!(tls["type"], "kubernetes.io/tls");
    let ca_pem = decode(&tls["data"]["ca.crt"]);
    assert_eq!(
        ca_map["data"]["ca.crt"].as_str().unwrap().trim(),
        ca_pem.trim()
    );
    assert!(ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(decode(&tls["data"]["tls.key"]).contains("PRIVATE KEY"));
    let cert_pem = decode(&tls["data"]["tls.crt"]);
    if let Some(names) = certificate_names(&cert_pem) {
        for dns in [
            "fleetpatch-gateway",
            "fleetpatch-gateway.fleetpatch-system.svc",
            "fleetpatch-gateway.fleetpatch-system.svc.cluster.local",
        ] {
            assert!(
                names.contains(&format!("DNS:{dns},"))
                    || names.trim_end().ends_with(&format!("DNS:{dns}")),
                "{dns} not in {names}"
            );
        }
        assert_eq!(openssl_verifies(&ca_pem, &cert_pem), Some(true));
    } else {
        eprintln!("openssl is missing: the certificate's names are not checked");
    }

    // One replica: no PDB (it would block every eviction).
    let single = helm.render(&["--set", "controller.replicas=1"]);
    assert!(
        single
            .find("PodDisruptionBudget", "fleetpatch-controller")
            .is_none()
    );
    assert_eq!(
        single.get("Deployment", "fleetpatch-controller")["spec"]["replicas"],
        1
    );
}

#[test]
fn full_render_wires_every_option() {
    let Some(helm) = Helm::new() else { return };
    let full = full_values();
    let out = helm.render(&["-f", full.to_str().unwrap()]);

    let deployment = out.get("Deployment", "fleetpatch-controller");
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert!(
        out.find("PodDisruptionBudget", "fleetpatch-controller")
            .is_some()
    );
    let controller = container(deployment, "controller");
    assert_eq!(
        flag(controller, "--gateway-audience").unwrap(),
        "fleetpatch-test-audience"
    );
    assert!(strings(&controller["args"]).contains(&"--job-ttl-hours=72".to_string()));
    // existingSecret: nothing generated, the controller serves that Secret.
    assert!(out.find("Secret", "fleetpatch-gateway-tls").is_none());
    assert!(out.find("Secret", "fleetpatch-gateway-ca").is_none());
    assert!(out.find("ConfigMap", "fleetpatch-gateway-ca").is_none());
    let (tls_volume, _) = volume_of_file(controller, &flag(controller, "--tls-cert-file").unwrap());
    assert_eq!(
        volume(deployment, tls_volume)["secret"]["secretName"],
        "gateway-cert"
    );

    let gateway = out.get("Service", "fleetpatch-gateway");
    assert_eq!(gateway["spec"]["type"], "LoadBalancer");
    assert_eq!(gateway["spec"]["ports"][0]["port"], 9443);
    assert_eq!(
        gateway["spec"]["loadBalancerSourceRanges"],
        json!(["10.0.0.0/8"])
    );

    for os in ["linux", "windows"] {
        let daemonset = out.get("DaemonSet", &format!("fleetpatch-node-agent-{os}"));
        let pod = &daemonset["spec"]["template"]["spec"];
        assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], os);
        assert_eq!(pod["os"]["name"], os);
        assert!(
            pod.get("priorityClassName").is_none(),
            "priorityClassName \"\" leaves it unset"
        );
        let agent = container(daemonset, "agent");
        assert_eq!(
            flag(agent, "--server").unwrap(),
            format!("https://fleetpatch-gateway.{NAMESPACE}.svc:9443")
        );
        assert!(strings(&agent["args"]).contains(&"--heartbeat-seconds=30".to_string()));
        let (token_volume, _) =
            volume_of_file(agent, &flag(agent, "--service-account-token-file").unwrap());
        assert_eq!(
            token_source(volume(daemonset, token_volume))["audience"]
                .as_str()
                .unwrap(),
            flag(controller, "--gateway-audience").unwrap(),
            "{os}: token audience and controller flag differ"
        );
        // With existingSecret the agents mount only its ca.crt.
        let (ca_volume, _) = volume_of_file(agent, &flag(agent, "--ca-file").unwrap());
        let ca = &volume(daemonset, ca_volume)["secret"];
        assert_eq!(ca["secretName"], "gateway-cert");
        assert_eq!(ca["items"], json!([{"key": "ca.crt", "path": "ca.crt"}]));
    }
    let windows = out.get("DaemonSet", "fleetpatch-node-agent-windows");
    let pod = &windows["spec"]["template"]["spec"];
    assert_eq!(
        pod["securityContext"]["windowsOptions"]["hostProcess"],
        true
    );
    assert_eq!(
        pod["securityContext"]["windowsOptions"]["runAsUserName"],
        "NT AUTHORITY\\SYSTEM"
    );
    assert_eq!(pod["hostNetwork"], true);
    assert!(pod.get("hostPID").is_none());
    assert!(container(windows, "agent")["securityContext"].is_null());
    assert!(
        !strings(&container(windows, "agent")["args"]).contains(&"--host-namespaces".to_string())
    );
    assert_eq!(
        container(windows, "agent")["image"],
        format!(
            "ghcr.io/fleetpatch/fleetpatch-windows:{}",
            env!("CARGO_PKG_VERSION")
        )
    );

    // ServiceMonitor: scrapes the metrics Service.
    let monitor = out.get("ServiceMonitor", "fleetpatch-controller");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    let metrics = out.get("Service", "fleetpatch-metrics");
    assert!(labels_match(
        &monitor["spec"]["selector"]["matchLabels"],
        &metrics["metadata"]["labels"]
    ));
    assert!(!labels_match(
        &monitor["spec"]["selector"]["matchLabels"],
        &gateway["metadata"]["labels"]
    ));
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(
        monitor["spec"]["namespaceSelector"]["matchNames"],
        json!([NAMESPACE])
    );

    // NetworkPolicy: the gateway from anywhere, metrics from the selected namespaces.
    let policy = out.get("NetworkPolicy", "fleetpatch-controller");
    assert!(labels_match(
        &policy["spec"]["podSelector"]["matchLabels"],
        &deployment["spec"]["template"]["metadata"]["labels"]
    ));
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress"]));
    let rules = policy["spec"]["ingress"].as_array().unwrap();
    assert_eq!(rules.len(), 2);
    assert_eq!(
        rules[0],
        json!({"ports": [{"port": "gateway", "protocol": "TCP"}]})
    );
    assert_eq!(
        rules[1]["ports"],
        json!([{"port": "metrics", "protocol": "TCP"}])
    );
    assert_eq!(
        rules[1]["from"],
        json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}}])
    );
    // `fleetpatch dev` does not serve NetworkPolicy: check its shape against the
    // Kubernetes type instead (a field the type lacks is lost in the round trip).
    let typed: k8s_openapi::api::networking::v1::NetworkPolicy =
        serde_json::from_value(policy.clone()).expect("a NetworkPolicy");
    assert_eq!(&serde_json::to_value(&typed).unwrap(), policy);

    // Bootstrap tokens in the gateway's format.
    let web = out.get("Secret", "join-web");
    assert_eq!(web["type"], "fleetpatch.io/bootstrap-token");
    assert_eq!(
        web["stringData"],
        json!({"token": "web-join-token-0123456789", "usage": "multi", "expiration": "2030-01-01T00:00:00Z"})
    );
    let db = out.get("Secret", "join-db");
    assert_eq!(
        db["stringData"],
        json!({"token": "db-join-token-9876543210", "usage": "single"})
    );
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(web.clone()).unwrap();
    let token = fleetpatch::gateway::credentials::BootstrapToken::from_secret(&secret).unwrap();
    assert!(!token.single_use);
    assert!(token.expires.is_some());
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(db.clone()).unwrap();
    assert!(
        fleetpatch::gateway::credentials::BootstrapToken::from_secret(&secret)
            .unwrap()
            .single_use
    );
}

#[test]
fn rendered_manifests_pass_server_side_strict_validation() {
    let Some(helm) = Helm::new() else { return };
    let Some(kubectl) = tool("kubectl") else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let server = Cluster::start(home.path());
    let kubectl_ok = |args: &[&str]| {
        let mut command = server.command(kubectl.to_str().unwrap());
        command.args(args);
        succeeded(&format!("kubectl {args:?}"), command.output().unwrap())
    };
    kubectl_ok(&["create", "namespace", NAMESPACE]);
    let full = full_values();
    // No cluster here serves ServiceMonitor (a Prometheus Operator CRD), and fleetpatch
    // dev serves no NetworkPolicy: full_render_wires_every_option checks those instead.
    let unserved: &[&str] = if server.is_real() {
        &["ServiceMonitor"]
    } else {
        &["ServiceMonitor", "NetworkPolicy"]
    };
    for (case, extra) in [
        ("default", vec![]),
        ("full", vec!["-f", full.to_str().unwrap()]),
    ] {
        let rendered = helm.render(&extra);
        let file = home.path().join(format!("{case}.yaml"));
        std::fs::write(&file, rendered.yaml_without(unserved)).unwrap();
        let applied = kubectl_ok(&[
            "apply",
            "--dry-run=server",
            "--validate=strict",
            "-f",
            file.to_str().unwrap(),
        ]);
        let count = applied.matches("(server dry run)").count();
        assert_eq!(
            count,
            rendered.objects.len()
                - rendered
                    .objects
                    .iter()
                    .filter(|o| unserved.contains(&o["kind"].as_str().unwrap()))
                    .count(),
            "{case}: {applied}"
        );
    }
    // The check is real: a field the DaemonSet schema lacks is refused.
    let rendered = helm.render(&[]);
    let broken = rendered
        .text
        .replacen("hostPID: true", "hostPID: true\n      hostPIDs: true", 1);
    assert_ne!(broken, rendered.text);
    let file = home.path().join("broken.yaml");
    std::fs::write(&file, broken).unwrap();
    let mut command = server.command(kubectl.to_str().unwrap());
    command.args([
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-f",
        file.to_str().unwrap(),
    ]);
    let output = command.output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("hostPIDs"));
}

#[test]
fn helm_installs_upgrades_and_uninstalls_keeping_the_crds_and_the_certificate() {
    let Some(helm) = Helm::new() else { return };
    let Some(kubectl) = tool("kubectl") else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let server = Cluster::start(home.path());
    let kubectl_ok = |args: &[&str]| {
        let mut command = server.command(kubectl.to_str().unwrap());
        command.args(args);
        succeeded(&format!("kubectl {args:?}"), command.output().unwrap())
    };
    let chart = chart();
    let chart = chart.to_str().unwrap();
    let installed = helm.ok_on(
        &server,
        &[
            "install",
            RELEASE,
            chart,
            "--namespace",
            NAMESPACE,
            "--create-namespace",
            "--wait=hookOnly",
        ],
    );
    assert!(installed.contains("STATUS: deployed"), "{installed}");
    assert!(
        installed.contains("kubectl get agents"),
        "NOTES say what to do next:\n{installed}"
    );

    let crds = kubectl_ok(&["get", "crd", "-o", "name"]);
    for kind in [
        "agents",
        "patchjobs",
        "remediationplans",
        "scripts",
        "tasks",
        "workflows",
    ] {
        assert!(
            crds.contains(&format!("{kind}.fleetpatch.io")),
            "{kind}: {crds}"
        );
    }
    let cluster = kubectl_ok(&[
        "get",
        "clusterrole,clusterrolebinding",
        "-o",
        "name",
        "-l",
        "app.kubernetes.io/instance=fleetpatch",
    ]);
    for object in [
        "clusterrole.rbac.authorization.k8s.io/fleetpatch-controller",
        "clusterrolebinding.rbac.authorization.k8s.io/fleetpatch-controller",
    ] {
        assert!(cluster.contains(object), "{object}: {cluster}");
    }
    let namespaced = kubectl_ok(&[
        "get",
        "role,rolebinding,serviceaccount,deployment,daemonset,service,poddisruptionbudget,secret,configmap",
        "-n",
        NAMESPACE,
        "-o",
        "name",
    ]);
    for object in [
        "role.rbac.authorization.k8s.io/fleetpatch-controller",
        "rolebinding.rbac.authorization.k8s.io/fleetpatch-controller",
        "serviceaccount/fleetpatch-controller",
        "serviceaccount/fleetpatch-node-agent",
        "deployment.apps/fleetpatch-controller",
        "daemonset.apps/fleetpatch-node-agent-linux",
        "service/fleetpatch-gateway",
        "service/fleetpatch-metrics",
        "poddisruptionbudget.policy/fleetpatch-controller",
        "secret/fleetpatch-gateway-tls",
        "secret/fleetpatch-gateway-ca",
        "configmap/fleetpatch-gateway-ca",
    ] {
        assert!(namespaced.contains(object), "{object}: {namespaced}");
    }

    library_is_read_only_but_to_the_controller(&|args: &[&str]| {
        let mut command = server.command(kubectl.to_str().unwrap());
        command.args(args);
        command.output().unwrap()
    });

    let secret_data = |name_: &str, key: &str| {
        kubectl_ok(&[
            "get",
            "secret",
            name_,
            "-n",
            NAMESPACE,
            "-o",
            &format!("jsonpath={{.data.{}}}", key.replace('.', "\\.")),
        ])
    };
    let cert = secret_data("fleetpatch-gateway-tls", "tls.crt");
    let ca = secret_data("fleetpatch-gateway-ca", "ca.crt");
    assert!(!cert.is_empty() && !ca.is_empty());
    // Upgrading with the same names keeps the certificate (lookup), not a fresh one.
    helm.ok_on(
        &server,
        &["upgrade", RELEASE, chart, "--namespace", NAMESPACE],
    );
    assert_eq!(
        secret_data("fleetpatch-gateway-tls", "tls.crt"),
        cert,
        "the certificate rotated on upgrade"
    );
    assert_eq!(secret_data("fleetpatch-gateway-ca", "ca.crt"), ca);
    // A new name: a new serving certificate from the same CA.
    helm.ok_on(
        &server,
        &[
            "upgrade",
            RELEASE,
            chart,
            "--namespace",
            NAMESPACE,
            "--set",
            "gateway.tls.extraDnsNames[0]=patch.example.com",
        ],
    );
    let renewed = secret_data("fleetpatch-gateway-tls", "tls.crt");
    assert_ne!(renewed, cert, "a new name needs a new certificate");
    assert_eq!(
        secret_data("fleetpatch-gateway-ca", "ca.crt"),
        ca,
        "the CA must stay"
    );
    assert_eq!(secret_data("fleetpatch-gateway-tls", "ca.crt"), ca);
    let renewed_pem = decode(&Value::String(renewed));
    if let Some(names) = certificate_names(&renewed_pem) {
        assert!(names.contains("DNS:patch.example.com"), "{names}");
        assert_eq!(
            openssl_verifies(&decode(&Value::String(ca)), &renewed_pem),
            Some(true)
        );
    }

    helm.ok_on(&server, &["uninstall", RELEASE, "--namespace", NAMESPACE]);
    let left = kubectl_ok(&[
        "get",
        "deployment,daemonset,service,secret",
        "-n",
        NAMESPACE,
        "-o",
        "name",
    ]);
    assert!(
        !left.contains("fleetpatch-controller") && !left.contains("fleetpatch-gateway"),
        "left behind: {left}"
    );
    let cluster = kubectl_ok(&["get", "clusterrole", "-o", "name"]);
    assert!(!cluster.contains("fleetpatch-controller"), "{cluster}");
    let crds = kubectl_ok(&["get", "crd", "-o", "name"]);
    assert_eq!(
        crds.lines()
            .filter(|l| l.ends_with(".fleetpatch.io"))
            .count(),
        6,
        "helm uninstall must keep the CRDs: {crds}"
    );
}

/// The chart's ValidatingAdmissionPolicy, on the real API server: objects labelled as
/// built-in can be created, changed and deleted by the controller's ServiceAccount only;
/// anyone else (here the cluster admin) is refused with a message that says to duplicate
/// the object, and objects without the label are untouched.
fn library_is_read_only_but_to_the_controller(kubectl: &dyn Fn(&[&str]) -> Output) {
    let dir = tempfile::tempdir().unwrap();
    let manifest = |name_: &str, builtin: bool, content: &str| {
        let path = dir.path().join(format!("{name_}.yaml"));
        let labels = if builtin {
            "{fleetpatch.io/builtin: \"true\"}"
        } else {
            "{}"
        };
        std::fs::write(
            &path,
            format!("apiVersion: fleetpatch.io/v1alpha1\nkind: Script\nmetadata: {{name: {name_}, namespace: {NAMESPACE}, labels: {labels}}}\nspec: {{language: Bash, content: {content}}}\n"),
        )
        .unwrap();
        path.to_str().unwrap().to_string()
    };
    let controller = format!("--as=system:serviceaccount:{NAMESPACE}:fleetpatch-controller");
    let refused = |output: Output| {
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(!output.status.success(), "allowed: {stderr}");
        assert!(stderr.contains("duplicate it instead"), "{stderr}");
        assert!(stderr.contains("fleetpatch duplicate script"), "{stderr}");
    };
    // The policy takes effect once the API server has loaded it.
    let forged = manifest("forged", true, "echo forged");
    let loaded = support::eventually(std::time::Duration::from_secs(30), || {
        let output = kubectl(&["create", "-f", &forged]);
        String::from_utf8_lossy(&output.stderr).contains("duplicate it instead")
    });
    assert!(
        loaded,
        "nobody but the controller may create a built-in object"
    );
    let builtin = manifest("builtin", true, "echo v1");
    let applied = kubectl(&[
        "apply",
        "--server-side",
        "--field-manager=fleetpatch-controller",
        &controller,
        "-f",
        &builtin,
    ]);
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let edited = manifest("builtin", true, "echo v2");
    refused(kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        &edited,
    ]));
    refused(kubectl(&[
        "label",
        "script",
        "builtin",
        "-n",
        NAMESPACE,
        "fleetpatch.io/builtin-",
    ]));
    refused(kubectl(&["delete", "script", "builtin", "-n", NAMESPACE]));
    let applied = kubectl(&[
        "apply",
        "--server-side",
        "--field-manager=fleetpatch-controller",
        &controller,
        "-f",
        &edited,
    ]);
    assert!(
        applied.status.success(),
        "the controller keeps the library: {}",
        String::from_utf8_lossy(&applied.stderr)
    );
    // Not built-in: nothing to say.
    let own = manifest("own", false, "echo mine");
    let created = kubectl(&["create", "-f", &own]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    refused(kubectl(&[
        "label",
        "script",
        "own",
        "-n",
        NAMESPACE,
        "fleetpatch.io/builtin=true",
    ]));
    let deleted = kubectl(&["delete", "script", "own", "-n", NAMESPACE]);
    assert!(
        deleted.status.success(),
        "{}",
        String::from_utf8_lossy(&deleted.stderr)
    );
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn install_script_writes_the_agent_files_with_private_modes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-join-token\n").unwrap();
    let ca = dir.path().join("gateway-ca.pem");
    std::fs::write(
        &ca,
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    // A stand-in for the binary: the debug build is hundreds of megabytes.
    let binary = dir.path().join("fleetpatch-build");
    std::fs::write(&binary, "#!/bin/sh\nexit 0\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let script = repo().join("deploy/install-agent.sh");
    let install = |extra: &[&str]| {
        Command::new("bash")
            .arg(&script)
            .args(["--binary", binary.to_str().unwrap()])
            .args(["--server", "https://fleetpatch.example.com:8443"])
            .args(["--token-file", token.to_str().unwrap()])
            .args(["--ca-file", ca.to_str().unwrap()])
            .args([
                "--name",
                "web-1",
                "--label",
                "fleetpatch.io/group=web",
                "--label",
                "env=prod",
            ])
            .args(extra)
            .output()
            .unwrap()
    };

    // --dry-run says what it would do and writes nothing.
    let dry = succeeded(
        "install-agent.sh --dry-run",
        install(&["--prefix", root.to_str().unwrap(), "--dry-run"]),
    );
    assert!(
        dry.contains("would write") && dry.contains("agent.env"),
        "{dry}"
    );
    assert!(!root.exists(), "--dry-run wrote files");

    succeeded(
        "install-agent.sh --prefix",
        install(&["--prefix", root.to_str().unwrap()]),
    );
    let installed_binary = root.join("usr/local/bin/fleetpatch");
    assert_eq!(mode(&installed_binary), 0o755);
    assert_eq!(
        std::fs::read(&installed_binary).unwrap(),
        std::fs::read(&binary).unwrap()
    );
    let conf = root.join("etc/fleetpatch");
    assert_eq!(mode(&conf), 0o700);
    assert_eq!(mode(&conf.join("agent.env")), 0o600);
    assert_eq!(mode(&conf.join("bootstrap-token")), 0o600);
    assert_eq!(
        std::fs::read_to_string(conf.join("bootstrap-token")).unwrap(),
        "s3cret-join-token\n"
    );
    assert_eq!(
        std::fs::read(conf.join("ca.crt")).unwrap(),
        std::fs::read(&ca).unwrap()
    );
    assert_eq!(mode(&root.join("var/lib/fleetpatch")), 0o700);
    let env = std::fs::read_to_string(conf.join("agent.env")).unwrap();
    assert!(
        env.contains("FLEETPATCH_SERVER=https://fleetpatch.example.com:8443\n"),
        "{env}"
    );
    let prefix = root.to_str().unwrap();
    assert!(
        env.contains(&format!(
            "FLEETPATCH_AGENT_ARGS=\"--ca-file {prefix}/etc/fleetpatch/ca.crt --name web-1 --label fleetpatch.io/group=web --label env=prod\""
        )),
        "{env}"
    );
    let unit_path = root.join("etc/systemd/system/fleetpatch-agent.service");
    assert_eq!(mode(&unit_path), 0o644);
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    assert!(
        unit.contains(&format!(
            "EnvironmentFile={prefix}/etc/fleetpatch/agent.env"
        )),
        "{unit}"
    );
    assert!(
        unit.contains(&format!(
            "ExecStart={prefix}/usr/local/bin/fleetpatch agent run --server ${{FLEETPATCH_SERVER}}"
        )),
        "{unit}"
    );
    assert!(
        unit.contains("Restart=always") && unit.contains("RestartSec="),
        "{unit}"
    );
    assert!(
        unit.lines()
            .any(|l| l.starts_with("ExecStart=") && l.contains(" --allow-reboot")),
        "an installed host's agent may reboot it: {unit}"
    );

    // The flags the unit passes are flags `fleetpatch agent run` knows.
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    let env_args = env
        .lines()
        .find_map(|l| l.strip_prefix("FLEETPATCH_AGENT_ARGS="))
        .unwrap()
        .trim_matches('"');
    let help = succeeded(
        "fleetpatch agent run --help",
        Command::new(env!("CARGO_BIN_EXE_fleetpatch"))
            .args(["agent", "run", "--help"])
            .output()
            .unwrap(),
    );
    for word in exec.split_whitespace().chain(env_args.split_whitespace()) {
        if word.starts_with("--") {
            assert!(
                help.contains(word),
                "`fleetpatch agent run` has no {word}:\n{help}"
            );
        }
    }

    // Bad input is refused before anything is written.
    let elsewhere = dir.path().join("elsewhere");
    for (case, args) in [
        ("label", vec!["--label", "not a label"]),
        ("server", vec!["--server", "ftp://x"]),
    ] {
        let mut all = vec!["--prefix", elsewhere.to_str().unwrap()];
        all.extend(args);
        let output = install(&all);
        assert!(!output.status.success(), "{case} accepted");
        assert!(
            !elsewhere.exists(),
            "{case}: files written before the check"
        );
    }

    // systemd's own check of the installed unit, where systemd-analyze exists.
    match Command::new("systemd-analyze")
        .args(["verify"])
        .arg(&unit_path)
        .output()
    {
        Ok(output) => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                output.status.success(),
                "systemd-analyze verify failed:\n{stderr}"
            );
            // Unknown keys and bad values are only warnings: there must be none.
            assert!(
                stderr.trim().is_empty(),
                "systemd-analyze verify warned:\n{stderr}"
            );
        }
        Err(_) => eprintln!("systemd-analyze is missing: the unit is not verified"),
    }
}
