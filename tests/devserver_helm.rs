//! helm 4 (server-side apply) and the newer kubectl against `fleetpatch dev`.
//! The tools come from `scripts/install-test-tools.sh` (into the target directory's
//! tools/bin).
//! Without them the tests skip loudly on a developer machine, and fail under CI.

#![cfg(feature = "full")]

mod support;

use support::{DevServer, Kubectl, repo};

/// A tool from `scripts/install-test-tools.sh`, in the target directory (which
/// `CARGO_TARGET_DIR` moves); skipped loudly when missing, a failure under CI.
fn tool(name: &str) -> Option<std::path::PathBuf> {
    support::prerequisite::tool(name)
}

#[test]
fn helm_installs_upgrades_and_uninstalls_a_chart() {
    let Some(helm) = tool("helm") else { return };
    let home = tempfile::tempdir().unwrap();
    let server = DevServer::start(home.path(), None);
    server.kubectl_ok(&["apply", "-f", "crds/"]);
    let chart = repo().join("tests/fixtures/chart");
    let helm_run = |args: &[&str]| {
        let output = server
            .command(helm.to_str().unwrap())
            .args(args)
            .env("HELM_CACHE_HOME", home.path().join("helm-cache"))
            .env("HELM_CONFIG_HOME", home.path().join("helm-config"))
            .env("HELM_DATA_HOME", home.path().join("helm-data"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "helm {args:?} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    };
    let installed = helm_run(&[
        "install",
        "smoke",
        chart.to_str().unwrap(),
        "--wait=hookOnly",
    ]);
    assert!(installed.contains("STATUS: deployed"), "{installed}");
    let objects = server.kubectl_ok(&[
        "get",
        "configmap,serviceaccount,deployment,scripts",
        "-l",
        "app.kubernetes.io/instance=smoke",
        "-o",
        "name",
    ]);
    for name in [
        "configmap/smoke-settings",
        "serviceaccount/smoke-runner",
        "deployment.apps/smoke-web",
        "script.fleetpatch.io/smoke-hello",
    ] {
        assert!(objects.contains(name), "{name} missing:\n{objects}");
    }
    // helm keeps its release in a Secret.
    server.kubectl_ok(&["get", "secret", "sh.helm.release.v1.smoke.v1"]);

    helm_run(&[
        "upgrade",
        "smoke",
        chart.to_str().unwrap(),
        "--set",
        "greeting=bye",
        "--set",
        "replicas=2",
    ]);
    let greeting = server.kubectl_ok(&[
        "get",
        "configmap",
        "smoke-settings",
        "-o",
        "jsonpath={.data.greeting}",
    ]);
    assert_eq!(greeting, "bye");
    let replicas = server.kubectl_ok(&[
        "get",
        "deployment",
        "smoke-web",
        "-o",
        "jsonpath={.spec.replicas}",
    ]);
    assert_eq!(replicas, "2");
    let listed = helm_run(&["list"]);
    assert!(
        listed.contains("smoke") && listed.contains("deployed"),
        "{listed}"
    );

    helm_run(&["uninstall", "smoke"]);
    let left = server.kubectl_ok(&[
        "get",
        "configmap,deployment,scripts",
        "-l",
        "app.kubernetes.io/instance=smoke",
        "-o",
        "name",
    ]);
    assert!(left.trim().is_empty(), "left behind: {left}");
}

#[test]
fn the_newer_kubectl_works_too() {
    let Some(kubectl) = tool("kubectl") else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let server = DevServer::start(home.path(), None);
    let run = |args: &[&str]| {
        let output = server
            .command(kubectl.to_str().unwrap())
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    run(&["apply", "-f", "crds/"]);
    run(&["create", "namespace", "fleetpatch-system"]);
    run(&["apply", "-f", "examples/", "--recursive"]);
    run(&[
        "apply",
        "--server-side",
        "-f",
        "examples/linux/",
        "--recursive",
        "--force-conflicts",
    ]);
    let resources = run(&["api-resources", "--categories=fleetpatch"]);
    assert!(resources.contains("patchjobs"), "{resources}");
    let tasks = run(&["get", "tasks"]);
    assert!(tasks.contains("ChangeRegistryKey"), "{tasks}");
    let explain = run(&["explain", "task.spec.changeRegistryKey"]);
    assert!(explain.contains("keyPath"), "{explain}");
}
