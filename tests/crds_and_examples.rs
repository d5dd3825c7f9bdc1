//! The checked-in CRDs are exactly what `fleetpatch crds` prints, the real API server
//! takes them (structural schemas, CEL rules within their cost budget), and the
//! examples a user starts from pass `fleetpatch validate` and `kubectl apply`.

#![cfg(feature = "full")]

mod support;

use std::path::Path;
use std::process::Command;

use fleetpatch::{api, crdgen};

const BIN: &str = env!("CARGO_BIN_EXE_fleetpatch");

#[test]
fn crds_directory_is_up_to_date() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let mut expected_files: Vec<String> = Vec::new();
    for crd in api::crds() {
        let file = crdgen::file_name(&crd);
        let on_disk = std::fs::read_to_string(dir.join(&file)).unwrap_or_default();
        assert!(
            on_disk == crdgen::render(&crd).unwrap(),
            "crds/{file} is stale or missing: run `cargo run -- crds --out-dir crds` and commit the result"
        );
        expected_files.push(file);
    }
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    present.sort();
    expected_files.sort();
    assert_eq!(
        present, expected_files,
        "crds/ holds files that `fleetpatch crds` does not generate"
    );
}

#[test]
fn crds_command_prints_the_six_kinds_of_one_group_version() {
    let output = Command::new(BIN).arg("crds").output().unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let mut from_disk = String::new();
    for crd in api::crds() {
        from_disk.push_str(&std::fs::read_to_string(dir.join(crdgen::file_name(&crd))).unwrap());
    }
    assert_eq!(
        text, from_disk,
        "`fleetpatch crds` output differs from crds/"
    );

    let crds: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let mut kinds: Vec<&str> = crds
        .iter()
        .map(|c| c["spec"]["names"]["kind"].as_str().unwrap())
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "Agent",
            "PatchJob",
            "RemediationPlan",
            "Script",
            "Task",
            "Workflow"
        ]
    );
    for crd in &crds {
        let kind = crd["spec"]["names"]["kind"].as_str().unwrap();
        assert_eq!(crd["spec"]["group"], "fleetpatch.io");
        assert_eq!(crd["spec"]["versions"].as_array().unwrap().len(), 1);
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        assert_eq!(
            version["subresources"]["status"],
            serde_json::json!({}),
            "{kind} has a status subresource"
        );
        assert_eq!(
            crd["spec"]["names"]["categories"],
            serde_json::json!(["fleetpatch"]),
            "{kind} category"
        );
        assert!(
            crd["spec"]["names"]["shortNames"]
                .as_array()
                .is_some_and(|s| !s.is_empty()),
            "{kind} short name"
        );
        let scope = if kind == "Agent" {
            "Cluster"
        } else {
            "Namespaced"
        };
        assert_eq!(crd["spec"]["scope"], scope, "{kind} scope");
        let conditions = &version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
            ["conditions"];
        assert_eq!(
            conditions["x-kubernetes-list-type"], "map",
            "{kind} conditions are a list-map"
        );
        assert_eq!(
            conditions["x-kubernetes-list-map-keys"],
            serde_json::json!(["type"])
        );
        assert!(
            version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["observedGeneration"].is_object(),
            "{kind} status has observedGeneration"
        );
    }
}

#[test]
fn patchjob_columns_answer_the_first_questions() {
    let crd = api::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == "PatchJob")
        .unwrap();
    let columns: Vec<String> = crd.spec.versions[0]
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .filter(|c| c.priority.unwrap_or(0) == 0)
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(columns, ["Plan", "Agent", "Phase", "Actions", "Age"]);
}

#[test]
fn examples_pass_validate() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let output = Command::new(BIN)
        .args(["validate", "-f"])
        .arg(&examples)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "validate examples/ failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.is_empty(),
        "no problem lines expected, got:\n{stdout}"
    );
    assert!(stderr.contains("objects checked, no problems"), "{stderr}");
}

#[test]
fn the_real_api_server_serves_the_crds_and_accepts_every_example() {
    use support::Kubectl;
    let home = tempfile::tempdir().unwrap();
    let cluster = support::Cluster::shared(home.path());
    if !cluster.is_real() {
        return;
    }
    // Established means the server accepted the structural schemas and compiled every
    // CEL rule within its cost budget; a rule over budget fails the apply.
    cluster.install_crds();
    let names = cluster.kubectl_ok(&[
        "get",
        "crd",
        "-o",
        "jsonpath={range .items[?(@.spec.group==\"fleetpatch.io\")]}{.metadata.name} {.status.conditions[?(@.type==\"NonStructuralSchema\")].status}{\"\\n\"}{end}",
    ]);
    assert_eq!(names.lines().count(), 6, "{names}");
    assert!(
        names.lines().all(|l| l.split_whitespace().count() == 1),
        "a CRD has a non-structural schema:\n{names}"
    );
    let namespace = "examples";
    cluster.create_namespace(namespace);
    cluster.create_namespace("fleetpatch-system");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let applied = cluster.kubectl_ok(&[
        "apply",
        "--validate=strict",
        "-n",
        namespace,
        "--recursive",
        "-f",
        examples.to_str().unwrap(),
    ]);
    let objects = applied.lines().count();
    assert_eq!(
        objects,
        example_documents(&examples),
        "not every example was applied:\n{applied}"
    );
    // Every object, read back, still says what the file said (nothing pruned).
    let listed = cluster.kubectl_ok(&["get", "fleetpatch", "-n", namespace, "-o", "name"]);
    assert_eq!(listed.lines().count(), objects, "{listed}");
}

/// How many YAML documents the files under `dir` hold.
fn example_documents(dir: &Path) -> usize {
    let mut count = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            count += example_documents(&path);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            count += serde_yaml_ng::Deserializer::from_str(&text).count();
        }
    }
    count
}

#[test]
fn validate_ignores_other_api_groups_with_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mixed.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {a: b}\n---\n\
         apiVersion: fleetpatch.io/v1alpha1\nkind: Script\nmetadata: {name: hello}\nspec: {language: Sh, content: 'echo hi'}\n",
    )
    .unwrap();
    let output = Command::new(BIN)
        .args(["validate", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("mixed.yaml:1 ConfigMap/settings: ignored"),
        "{stderr}"
    );
    assert!(stderr.contains("1 fleetpatch objects checked"), "{stderr}");
}
