//! End-to-end: the real `fleetpatch dev` driven by the installed kubectl, the way a
//! person uses a cluster.

#![cfg(feature = "full")]

mod support;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use support::kubectl::kubectl_bin;
use support::{DevServer, Kubectl, eventually};

fn server() -> (tempfile::TempDir, DevServer) {
    let home = tempfile::tempdir().unwrap();
    let server = DevServer::start(home.path(), None);
    (home, server)
}

fn with_examples(server: &DevServer) {
    server.kubectl_ok(&["apply", "-f", "crds/"]);
    server.kubectl_ok(&["create", "namespace", "fleetpatch-system"]);
    server.kubectl_ok(&["apply", "-f", "examples/", "--recursive"]);
}

const PATCH_JOB: &str = "apiVersion: fleetpatch.io/v1alpha1
kind: PatchJob
metadata:
  name: job-1
  namespace: default
  labels:
    team: web
spec:
  agent: host-1
  plan: weekly-security
  run: \"1\"
  os: Linux
";

#[test]
fn api_resources_lists_our_kinds_with_short_names_and_categories() {
    let (_home, server) = server();
    let before = server.kubectl_ok(&["api-resources"]);
    for builtin in [
        "namespaces",
        "configmaps",
        "leases",
        "customresourcedefinitions",
        "deployments",
    ] {
        assert!(before.contains(builtin), "{builtin} missing:\n{before}");
    }
    server.kubectl_ok(&["apply", "-f", "crds/"]);
    let after = server.kubectl_ok(&["api-resources", "--api-group=fleetpatch.io", "-o", "wide"]);
    for (plural, short) in [
        ("patchjobs", "pj"),
        ("tasks", "fptask"),
        ("workflows", "fpwf"),
        ("remediationplans", "rplan"),
        ("scripts", "fpscript"),
        ("agents", "fpagent"),
    ] {
        let line = after
            .lines()
            .find(|l| l.starts_with(plural))
            .unwrap_or_else(|| panic!("{plural} missing:\n{after}"));
        assert!(line.contains(short), "{line}");
        assert!(line.contains("fleetpatch"), "category missing: {line}");
    }
}

#[test]
fn examples_apply_and_show_printer_columns_yaml_and_explain() {
    let (_home, server) = server();
    with_examples(&server);
    // Applying again changes nothing that matters and does not fail.
    server.kubectl_ok(&["apply", "-f", "examples/", "--recursive"]);

    let all = server.kubectl_ok(&["get", "fleetpatch"]);
    for name in [
        "task.fleetpatch.io/ie-disable-first-run",
        "workflow.fleetpatch.io/windows-standard",
        "remediationplan.fleetpatch.io/weekly-security",
    ] {
        assert!(all.contains(name), "{name} missing:\n{all}");
    }
    let tasks = server.kubectl_ok(&["get", "tasks"]);
    let header = tasks.lines().next().unwrap();
    for column in ["NAME", "OS", "TYPE", "TIMEOUT", "AGE"] {
        assert!(header.contains(column), "column {column} missing: {header}");
    }
    let ie = tasks
        .lines()
        .find(|l| l.starts_with("ie-disable-first-run"))
        .unwrap();
    assert!(
        ie.contains("Windows") && ie.contains("ChangeRegistryKey"),
        "{ie}"
    );

    let yaml = server.kubectl_ok(&["get", "task", "ie-disable-first-run", "-o", "yaml"]);
    assert!(yaml.contains("uid: "), "{yaml}");
    assert!(yaml.contains("generation: 1"), "{yaml}");
    assert!(
        yaml.contains("successExitCodes:"),
        "defaults were not applied:\n{yaml}"
    );

    let explain = server.kubectl_ok(&["explain", "patchjob.spec"]);
    assert!(explain.contains("KIND:       PatchJob"), "{explain}");
    assert!(explain.contains("agent"), "{explain}");
}

#[test]
fn patch_label_status_and_wait_like_a_cluster() {
    let (home, server) = server();
    server.kubectl_ok(&["apply", "-f", "crds/"]);
    server.kubectl_ok(&["create", "namespace", "fleetpatch-system"]);
    server.kubectl_ok(&["apply", "-f", "examples/linux/", "--recursive"]);

    // Merge patch of the spec bumps the generation.
    server.kubectl_ok(&[
        "patch",
        "task",
        "check-disk-space",
        "--type=merge",
        "-p",
        r#"{"spec":{"timeoutMinutes":7}}"#,
    ]);
    let task = server.kubectl_ok(&[
        "get",
        "task",
        "check-disk-space",
        "-o",
        "jsonpath={.spec.timeoutMinutes} {.metadata.generation}",
    ]);
    assert_eq!(task, "7 2");
    // A label is metadata: no new generation.
    server.kubectl_ok(&["label", "task", "check-disk-space", "tier=gold"]);
    let labelled = server.kubectl_ok(&["get", "tasks", "-l", "tier=gold", "-o", "name"]);
    assert_eq!(labelled.trim(), "task.fleetpatch.io/check-disk-space");
    let generation = server.kubectl_ok(&[
        "get",
        "task",
        "check-disk-space",
        "-o",
        "jsonpath={.metadata.generation}",
    ]);
    assert_eq!(generation, "2");

    // Server-side apply twice; the second leaves a label out, and it is gone.
    let first = home.path().join("job.yaml");
    std::fs::write(&first, PATCH_JOB).unwrap();
    server.kubectl_ok(&["apply", "--server-side", "-f", first.to_str().unwrap()]);
    let second = home.path().join("job2.yaml");
    std::fs::write(&second, PATCH_JOB.replace("  labels:\n    team: web\n", "")).unwrap();
    server.kubectl_ok(&["apply", "--server-side", "-f", second.to_str().unwrap()]);
    let labels = server.kubectl_ok(&["get", "pj", "job-1", "-o", "jsonpath={.metadata.labels}"]);
    assert!(!labels.contains("team"), "label still there: {labels}");
    // Another manager changing an applied field conflicts unless forced.
    let changed = home.path().join("job3.yaml");
    std::fs::write(
        &changed,
        PATCH_JOB.replace("plan: weekly-security", "plan: other"),
    )
    .unwrap();
    let err = server.kubectl_err(&[
        "apply",
        "--server-side",
        "--field-manager=someone-else",
        "-f",
        changed.to_str().unwrap(),
    ]);
    assert!(err.contains("conflict"), "{err}");
    assert!(err.contains(".spec.plan"), "{err}");

    // Status through the status subresource, then kubectl wait sees the condition.
    server.kubectl_ok(&[
        "patch", "pj", "job-1", "--subresource=status", "--type=merge", "-p",
        r#"{"status":{"phase":"Running","conditions":[{"type":"Ready","status":"True","reason":"Started","message":"running","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#,
    ]);
    server.kubectl_ok(&["wait", "--for=condition=Ready", "pj/job-1", "--timeout=20s"]);
    let row = server.kubectl_ok(&["get", "pj", "job-1", "--no-headers"]);
    assert!(row.contains("Running") && row.contains("host-1"), "{row}");
    // Status written to the main resource is ignored.
    server.kubectl_ok(&[
        "patch",
        "pj",
        "job-1",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Failed"}}"#,
    ]);
    let phase = server.kubectl_ok(&["get", "pj", "job-1", "-o", "jsonpath={.status.phase}"]);
    assert_eq!(phase, "Running");
    // The spec of a PatchJob is immutable (a CEL transition rule with oldSelf).
    let err = server.kubectl_err(&[
        "patch",
        "pj",
        "job-1",
        "--type=merge",
        "-p",
        r#"{"spec":{"agent":"host-2"}}"#,
    ]);
    assert!(
        err.contains("is invalid") && err.contains("immutable"),
        "{err}"
    );
}

#[test]
fn get_watch_sees_an_update() {
    let (_home, server) = server();
    with_examples(&server);
    let mut watch = server
        .command(&kubectl_bin())
        .args(["get", "tasks", "--watch", "--output-watch-events"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // The initial listing comes first.
    let first = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("watch prints");
    assert!(
        first.contains("EVENT") || first.contains("ADDED"),
        "{first}"
    );
    std::thread::sleep(Duration::from_millis(500));
    server.kubectl_ok(&[
        "patch",
        "task",
        "check-disk-space",
        "--type=merge",
        "-p",
        r#"{"spec":{"timeoutMinutes":9}}"#,
    ]);
    let mut seen = false;
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(15)) {
        if line.contains("MODIFIED") && line.contains("check-disk-space") {
            assert!(line.contains(" 9 "), "new timeout not shown: {line}");
            seen = true;
            break;
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(seen, "kubectl get --watch did not show the update");
}

#[test]
fn delete_waits_for_finalizers_and_owners_take_dependents_along() {
    let (_home, server) = server();
    server.kubectl_ok(&["create", "configmap", "held", "--from-literal=a=b"]);
    server.kubectl_ok(&[
        "patch",
        "configmap",
        "held",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":["example.com/hold"]}}"#,
    ]);
    let mut delete = server
        .command(&kubectl_bin())
        .args(["delete", "configmap", "held", "--timeout=60s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        delete.try_wait().unwrap().is_none(),
        "delete returned while the finalizer was there"
    );
    let stamp = server.kubectl_ok(&[
        "get",
        "configmap",
        "held",
        "-o",
        "jsonpath={.metadata.deletionTimestamp}",
    ]);
    assert!(!stamp.is_empty(), "no deletionTimestamp");
    server.kubectl_ok(&[
        "patch",
        "configmap",
        "held",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ]);
    let finished = eventually(Duration::from_secs(20), || {
        delete.try_wait().unwrap().is_some()
    });
    assert!(
        finished,
        "delete did not finish after the finalizer was removed"
    );
    assert!(delete.wait().unwrap().success());
    let err = server.kubectl_err(&["get", "configmap", "held"]);
    assert!(
        err.contains("NotFound") || err.contains("not found"),
        "{err}"
    );

    // Garbage collection: a dependent goes when its only owner goes.
    server.kubectl_ok(&["create", "configmap", "owner"]);
    let uid = server.kubectl_ok(&[
        "get",
        "configmap",
        "owner",
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    let dependent = format!(
        r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"dependent","ownerReferences":[{{"apiVersion":"v1","kind":"ConfigMap","name":"owner","uid":"{uid}"}}]}}}}"#
    );
    let out = server.kubectl_stdin(&["apply", "-f", "-"], &dependent);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.kubectl_ok(&["delete", "configmap", "owner"]);
    let collected = eventually(Duration::from_secs(10), || {
        !server
            .kubectl(&["get", "configmap", "dependent"])
            .status
            .success()
    });
    assert!(collected, "the dependent was not garbage-collected");

    // Foreground deletion: the owner waits for its dependents, here one held by a finalizer.
    server.kubectl_ok(&["create", "configmap", "parent"]);
    let uid = server.kubectl_ok(&[
        "get",
        "configmap",
        "parent",
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    let child = format!(
        r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"child","finalizers":["example.com/hold"],"ownerReferences":[{{"apiVersion":"v1","kind":"ConfigMap","name":"parent","uid":"{uid}","blockOwnerDeletion":true}}]}}}}"#
    );
    let out = server.kubectl_stdin(&["apply", "-f", "-"], &child);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.kubectl_ok(&[
        "delete",
        "configmap",
        "parent",
        "--cascade=foreground",
        "--wait=false",
    ]);
    let parent = server.kubectl_ok(&[
        "get",
        "configmap",
        "parent",
        "-o",
        "jsonpath={.metadata.finalizers}",
    ]);
    assert!(parent.contains("foregroundDeletion"), "{parent}");
    let child_stamp = server.kubectl_ok(&[
        "get",
        "configmap",
        "child",
        "-o",
        "jsonpath={.metadata.deletionTimestamp}",
    ]);
    assert!(
        !child_stamp.is_empty(),
        "the child was not marked for deletion"
    );
    server.kubectl_ok(&[
        "patch",
        "configmap",
        "child",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ]);
    let both_gone = eventually(Duration::from_secs(10), || {
        !server
            .kubectl(&["get", "configmap", "parent"])
            .status
            .success()
            && !server
                .kubectl(&["get", "configmap", "child"])
                .status
                .success()
    });
    assert!(both_gone, "foreground deletion did not finish");
}

#[test]
fn invalid_manifests_are_refused_with_the_field_named() {
    let (home, server) = server();
    server.kubectl_ok(&["apply", "-f", "crds/"]);
    let example = std::fs::read_to_string(
        support::repo().join("examples/windows/internet-explorer-registry.yaml"),
    )
    .unwrap();
    let bad = example.replace(
        r"keyPath: HKEY_LOCAL_MACHINE\SOFTWARE\Policies\Microsoft\Internet Explorer\Main",
        r#"keyPath: "HKEY_LOCAL_MACHINE\\SOFTWARE\\Policies\\""#,
    );
    assert_ne!(bad, example);
    let path = home.path().join("bad.yaml");
    std::fs::write(&path, &bad).unwrap();
    let err = server.kubectl_err(&["apply", "-f", path.to_str().unwrap()]);
    assert!(err.contains("is invalid"), "{err}");
    assert!(err.contains("spec.changeRegistryKey.keyPath"), "{err}");
    assert!(err.contains("backslash"), "{err}");

    // Structural schema: an enum.
    let bad_os = example.replace("os: Windows", "os: Solaris");
    std::fs::write(&path, &bad_os).unwrap();
    let err = server.kubectl_err(&["apply", "-f", path.to_str().unwrap()]);
    assert!(
        err.contains("spec.os") && err.contains("Unsupported value"),
        "{err}"
    );

    // Unknown fields: kubectl asks for strict validation by default...
    let unknown = example.replace(
        "  timeoutMinutes: 5\n",
        "  timeoutMinutes: 5\n  bogus: true\n",
    );
    std::fs::write(&path, &unknown).unwrap();
    let err = server.kubectl_err(&["apply", "-f", path.to_str().unwrap()]);
    assert!(err.contains(r#"unknown field "spec.bogus""#), "{err}");
    // ...and without it the field is pruned, with a warning.
    let out = server.kubectl(&["apply", "--validate=false", "-f", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spec = server.kubectl_ok(&[
        "get",
        "task",
        "ie-disable-first-run",
        "-o",
        "jsonpath={.spec}",
    ]);
    assert!(!spec.contains("bogus"), "{spec}");

    // The same test fixtures the offline validator uses are refused by the server.
    let fixture = support::repo().join("tests/fixtures/bad/registry-key-trailing-backslash.yaml");
    if fixture.exists() {
        let err = server.kubectl_err(&["apply", "-f", fixture.to_str().unwrap()]);
        assert!(err.contains("keyPath"), "{err}");
    }
}

#[test]
fn paging_and_field_selectors() {
    let (_home, server) = server();
    with_examples(&server);
    let all = server.kubectl_ok(&["get", "tasks", "-o", "name"]);
    let paged = server.kubectl_ok(&["get", "tasks", "-o", "name", "--chunk-size=2"]);
    assert_eq!(all.lines().count(), 7, "{all}");
    assert_eq!(paged, all);
    let one = server.kubectl_ok(&[
        "get",
        "tasks",
        "-o",
        "name",
        "--field-selector",
        "metadata.name=check-disk-space",
    ]);
    assert_eq!(one.trim(), "task.fleetpatch.io/check-disk-space");
    let none = server.kubectl_ok(&[
        "get",
        "tasks",
        "-A",
        "-o",
        "name",
        "--field-selector",
        "metadata.namespace=elsewhere",
    ]);
    assert!(none.trim().is_empty(), "{none}");
}

#[test]
fn drain_respects_disruption_budgets_and_token_review_accepts_our_tokens() {
    let (home, server) = server();
    let manifests = "apiVersion: v1
kind: Node
metadata: {name: node-1}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: default, labels: {app: db}}
spec: {nodeName: node-1, terminationGracePeriodSeconds: 0, containers: [{name: c, image: db}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db-2, namespace: default, labels: {app: db}}
spec: {nodeName: node-1, terminationGracePeriodSeconds: 0, containers: [{name: c, image: db}]}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: {name: db, namespace: default}
spec: {minAvailable: 1, selector: {matchLabels: {app: db}}}
";
    let path = home.path().join("node.yaml");
    std::fs::write(&path, manifests).unwrap();
    server.kubectl_ok(&["apply", "-f", path.to_str().unwrap()]);
    // As on a cluster, a pod's status is the kubelet's to set: here, through the
    // status subresource. Pending pods would be evicted without asking the budget.
    for pod in ["db-1", "db-2"] {
        server.kubectl_ok(&[
            "patch",
            "pod",
            pod,
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"phase":"Running","conditions":[{"type":"Ready","status":"True"}]}}"#,
        ]);
    }
    let allowed = eventually(Duration::from_secs(10), || {
        server.kubectl_ok(&[
            "get",
            "pdb",
            "db",
            "-o",
            "jsonpath={.status.disruptionsAllowed}",
        ]) == "1"
    });
    assert!(allowed, "the budget's status does not allow one disruption");
    // One pod may go; the budget keeps the other, so the drain times out.
    let out = server.kubectl(&["drain", "node-1", "--force", "--timeout=4s"]);
    assert!(!out.status.success());
    let pods = server.kubectl_ok(&["get", "pods", "-o", "name"]);
    assert_eq!(pods.lines().count(), 1, "{pods}");
    let unschedulable = server.kubectl_ok(&[
        "get",
        "node",
        "node-1",
        "-o",
        "jsonpath={.spec.unschedulable}",
    ]);
    assert_eq!(unschedulable, "true");

    // ServiceAccount tokens the server issued pass a TokenReview; others do not.
    server.kubectl_ok(&["create", "serviceaccount", "agent"]);
    let token = server.kubectl_ok(&[
        "create",
        "token",
        "agent",
        "--audience",
        "fleetpatch-gateway",
    ]);
    let review = |token: &str| {
        let body = format!(
            r#"{{"apiVersion":"authentication.k8s.io/v1","kind":"TokenReview","spec":{{"token":"{}","audiences":["fleetpatch-gateway"]}}}}"#,
            token.trim()
        );
        let out = server.kubectl_stdin(&["create", "-f", "-", "-o", "json"], &body);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let accepted = review(&token);
    assert_eq!(accepted["status"]["authenticated"], true, "{accepted}");
    assert_eq!(
        accepted["status"]["user"]["username"],
        "system:serviceaccount:default:agent"
    );
    // As from a real server, a refusal says why and leaves `authenticated` out.
    let refused = review("fpdev.forged.token");
    assert_ne!(refused["status"]["authenticated"], true, "{refused}");
    assert_eq!(
        refused["status"]["error"], "invalid bearer token",
        "{refused}"
    );
}

#[test]
fn malformed_writes_are_refused_and_the_server_keeps_serving() {
    let (home, server) = server();
    server.kubectl_ok(&["create", "configmap", "shape"]);
    for patch in [
        r#"{"metadata":{"labels":"oops"}}"#,
        r#"{"metadata":"oops"}"#,
        r#"{"metadata":{"finalizers":{"a":1}}}"#,
    ] {
        let err = server.kubectl_err(&["patch", "configmap", "shape", "--type=merge", "-p", patch]);
        assert!(
            err.contains("BadRequest") || err.contains("must be"),
            "{patch}: {err}"
        );
    }
    let bad = home.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"x","labels":["a"]}}"#,
    )
    .unwrap();
    let out = server.kubectl(&["apply", "--server-side", "-f", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    server.kubectl_ok(&["get", "configmap", "shape"]);
}

#[test]
fn kubectl_create_commands_for_builtins_work() {
    // These kubectl commands send protobuf bodies, which the server decodes.
    let (_home, server) = server();
    server.kubectl_ok(&["create", "namespace", "team-a", "--dry-run=server"]);
    server.kubectl_ok(&["create", "namespace", "team-a"]);
    server.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "creds",
        "-n",
        "team-a",
        "--from-literal=password=s3cret",
    ]);
    let data = server.kubectl_ok(&[
        "get",
        "secret",
        "creds",
        "-n",
        "team-a",
        "-o",
        "jsonpath={.data.password}",
    ]);
    assert_eq!(data, "czNjcmV0");
    server.kubectl_ok(&[
        "create",
        "configmap",
        "settings",
        "-n",
        "team-a",
        "--from-literal=mode=fast",
    ]);
    let mode = server.kubectl_ok(&[
        "get",
        "configmap",
        "settings",
        "-n",
        "team-a",
        "-o",
        "jsonpath={.data.mode}",
    ]);
    assert_eq!(mode, "fast");
    server.kubectl_ok(&["create", "serviceaccount", "robot", "-n", "team-a"]);
    // Every namespace gets its default ServiceAccount.
    let accounts = server.kubectl_ok(&["get", "serviceaccounts", "-n", "team-a", "-o", "name"]);
    assert!(
        accounts.contains("serviceaccount/default") && accounts.contains("serviceaccount/robot"),
        "{accounts}"
    );
    let namespaces = server.kubectl_ok(&["get", "namespaces"]);
    assert!(
        namespaces.contains("team-a") && namespaces.contains("Active"),
        "{namespaces}"
    );
    // Deleting the namespace takes its contents along.
    server.kubectl_ok(&["delete", "namespace", "team-a"]);
    let left = server.kubectl_ok(&["get", "configmaps,secrets", "-A", "-o", "name"]);
    assert!(
        !left.contains("settings") && !left.contains("creds"),
        "{left}"
    );
}

#[test]
fn client_side_apply_of_a_deployment_merges_containers_by_name() {
    let (home, server) = server();
    let deployment = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: api
spec:
  replicas: 1
  selector: {matchLabels: {app: api}}
  template:
    metadata: {labels: {app: api}}
    spec:
      containers:
      - name: api
        image: api:1
        env: [{name: MODE, value: slow}, {name: KEEP, value: \"yes\"}]
      - name: sidecar
        image: sidecar:1
";
    let path = home.path().join("deployment.yaml");
    std::fs::write(&path, deployment).unwrap();
    server.kubectl_ok(&["apply", "-f", path.to_str().unwrap()]);
    // A strategic merge patch from someone else adds a container...
    server.kubectl_ok(&[
        "patch",
        "deployment",
        "api",
        "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"debug","image":"busybox"}]}}}}"#,
    ]);
    // ...and re-applying the edited file changes only what the file changed.
    std::fs::write(
        &path,
        deployment
            .replace("api:1", "api:2")
            .replace("value: slow", "value: fast"),
    )
    .unwrap();
    let out = server.kubectl_ok(&["apply", "-f", path.to_str().unwrap()]);
    assert!(out.contains("configured"), "{out}");
    let containers = server.kubectl_ok(&[
        "get",
        "deployment",
        "api",
        "-o",
        r#"jsonpath={range .spec.template.spec.containers[*]}{.name}={.image};{end}"#,
    ]);
    assert_eq!(containers, "api=api:2;sidecar=sidecar:1;debug=busybox;");
    let env = server.kubectl_ok(&[
        "get",
        "deployment",
        "api",
        "-o",
        r#"jsonpath={range .spec.template.spec.containers[0].env[*]}{.name}={.value};{end}"#,
    ]);
    assert_eq!(env, "MODE=fast;KEEP=yes;");
    let generation = server.kubectl_ok(&[
        "get",
        "deployment",
        "api",
        "-o",
        "jsonpath={.metadata.generation}",
    ]);
    assert_eq!(generation, "3");

    // Built-in kinds are checked against their Kubernetes schema: a typo is refused...
    std::fs::write(&path, deployment.replace("replicas: 1", "replicaz: 1")).unwrap();
    let err = server.kubectl_err(&["apply", "-f", path.to_str().unwrap()]);
    assert!(err.contains(r#"unknown field "spec.replicaz""#), "{err}");
    // ...and explained.
    let explain = server.kubectl_ok(&["explain", "deployment.spec.replicas"]);
    assert!(explain.contains("<integer>"), "{explain}");
}

/// The first line of `fleetpatch dev`'s log (its "listening" line) when its standard
/// error is a terminal: run under `script`, which gives it a pseudo-terminal. `None`
/// when `script` (util-linux) is missing.
fn log_line_on_a_terminal(no_color: bool) -> Option<String> {
    if !support::prerequisite::on_path("script") {
        support::prerequisite::missing(
            "script (util-linux) is needed to give fleetpatch dev a terminal",
        );
        return None;
    }
    let home = tempfile::tempdir().unwrap();
    let dev = format!(
        "{} dev --listen 127.0.0.1:0 --kubeconfig {}",
        env!("CARGO_BIN_EXE_fleetpatch"),
        home.path().join("kubeconfig").display()
    );
    let mut command = std::process::Command::new("script");
    command
        .args(["-qfec", &dev, "/dev/null"])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if no_color {
        command.env("NO_COLOR", "1");
    }
    let mut child = support::e2e::Process(command.spawn().unwrap());
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("fleetpatch dev logs that it listens");
        if line.contains("dev server listening") {
            break line;
        }
    };
    drop(child);
    Some(line)
}

#[test]
fn its_log_is_coloured_only_on_a_terminal_and_never_with_no_color() {
    let home = tempfile::tempdir().unwrap();
    let log = home.path().join("dev.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fleetpatch"))
        .args(["dev", "--listen", "127.0.0.1:0", "--kubeconfig"])
        .arg(home.path().join("kubeconfig"))
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.contains("listening on"), "{first}");
    let mut written = String::new();
    let logged = eventually(Duration::from_secs(10), || {
        written = std::fs::read_to_string(&log).unwrap_or_default();
        written.contains("dev server listening")
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(logged, "{written}");
    assert!(
        !written.contains('\u{1b}'),
        "escape codes in a redirected log:\n{written:?}"
    );

    let Some(coloured) = log_line_on_a_terminal(false) else {
        return;
    };
    assert!(
        coloured.contains("\u{1b}["),
        "a terminal gets colour: {coloured:?}"
    );
    let plain = log_line_on_a_terminal(true).unwrap();
    assert!(
        !plain.contains('\u{1b}'),
        "NO_COLOR turns colour off: {plain:?}"
    );
}
