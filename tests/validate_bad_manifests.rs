//! `fleetpatch validate` on manifests that break one rule each: the exit status is 1
//! and the output line names the file, the document and the field that is wrong.
//!
//! One fixture per case lives in `tests/fixtures/bad/`; the few fixtures that would be
//! too large to commit are generated into a temporary directory at run time. Every
//! row is checked and all failures are reported together, so one run shows every
//! case that breaks.
//!
//! The real kube-apiserver gets every case too: what a CRD schema or CEL rule can refuse
//! it refuses, naming the same field as `validate`; what only `validate` can see (rules
//! across objects, checks no schema expresses) it accepts, so each row says which it is
//! and a rule that moves into the CRDs shows up here.

#![cfg(feature = "full")]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_fleetpatch");

/// Longest script body the API accepts, in characters and in bytes of UTF-8.
const SCRIPT_MAX: usize = 20480;

/// One invalid manifest and what the tool must say about it.
struct Case {
    /// File name under `tests/fixtures/bad/` (or of a generated fixture).
    file: &'static str,
    /// 1-based document of the file the problem is reported on.
    doc: usize,
    /// Substring of the field path the problem line must name.
    field: &'static str,
    /// Substring of the message, when the wording matters.
    message: Option<&'static str>,
}

const fn case(
    file: &'static str,
    doc: usize,
    field: &'static str,
    message: Option<&'static str>,
) -> Case {
    Case {
        file,
        doc,
        field,
        message,
    }
}

#[rustfmt::skip]
const CASES: &[Case] = &[
    // Registry key paths (ChangeRegistryKey and UninstallSoftware share the rules).
    case("registry-key-bad-root.yaml", 1, "spec.changeRegistryKey.keyPath", Some("must start with HKEY_CURRENT_USER")),
    case("registry-key-forward-slash.yaml", 1, "spec.changeRegistryKey.keyPath", Some("forward slash")),
    case("registry-key-trailing-backslash.yaml", 1, "spec.changeRegistryKey.keyPath", Some("must not end with a backslash")),
    case("registry-key-no-subkey.yaml", 1, "spec.changeRegistryKey.keyPath", Some("at least one subkey")),
    case("uninstall-key-bad-root.yaml", 1, "spec.uninstallSoftware.uninstallKey", Some("must start with HKEY_CURRENT_USER")),
    // Registry value data.
    case("registry-dword-not-numeric.yaml", 1, "spec.changeRegistryKey.valueData", Some("non-negative decimal number")),
    case("registry-qword-not-numeric.yaml", 1, "spec.changeRegistryKey.valueData", Some("non-negative decimal number")),
    case("registry-binary-not-numeric.yaml", 1, "spec.changeRegistryKey.valueData", Some("hexadecimal byte pairs")),
    case("registry-dword-too-large.yaml", 1, "spec.changeRegistryKey.valueData", Some("does not fit in a REG_DWORD")),
    case("registry-qword-too-large.yaml", 1, "spec.changeRegistryKey.valueData", Some("does not fit in a REG_QWORD")),
    case("registry-task-on-linux.yaml", 1, "spec.os", Some("Windows-only")),
    case("uninstall-task-on-linux.yaml", 1, "spec.os", Some("Windows-only")),
    // Scripts.
    case(GENERATED_TOO_LONG, 1, "spec.content", Some("longer than 20480 characters")),
    case(GENERATED_TOO_MANY_BYTES, 1, "spec.content", Some("at most 20480 bytes of UTF-8")),
    case("script-content-empty.yaml", 1, "spec.content", Some("must not be empty")),
    case("script-content-blank.yaml", 1, "spec.content", Some("must not be empty")),
    case("script-signature-on-bash.yaml", 1, "spec.signature", Some("only supported for PowerShell")),
    case("script-bash-syntax-error.yaml", 1, "spec.content", Some("Bash syntax error: 4:1: missing `fi`")),
    case("script-bash-stray-fi.yaml", 1, "spec.content", Some("Bash syntax error: 2:1")),
    case("script-language-python.yaml", 1, "spec.language", Some("Unsupported value: \"Python\"")),
    case("script-missing-name.yaml", 1, "metadata.name", Some("Required value")),
    case("script-name-uppercase.yaml", 1, "metadata.name", Some("Invalid value: \"Hello_World\"")),
    case("script-parameter-not-env-name.yaml", 1, "spec.parameters[0].name", Some("\"1bad\"")),
    // Installing software.
    case("install-sha256-not-hex.yaml", 1, "spec.installSoftware.sha256", Some("exactly 64 hexadecimal digits")),
    case("install-https-with-http-url.yaml", 1, "spec.installSoftware.source.url", Some("must start with https://")),
    case("install-http-with-https-url.yaml", 1, "spec.installSoftware.source.url", Some("must start with http://")),
    case("install-networkshare-without-unc.yaml", 1, "spec.installSoftware.source", Some("NetworkShare sources need unc")),
    case("install-networkshare-url-and-unc.yaml", 1, "spec.installSoftware.source", Some("not both")),
    case("install-unc-not-absolute.yaml", 1, "spec.installSoftware.source.unc", Some("UNC path")),
    case("install-filename-with-slash.yaml", 1, "spec.installSoftware.fileName", Some("plain file name")),
    case("install-parameter-not-env-name.yaml", 1, "spec.installSoftware.parameters", Some("environment variable names")),
    // Tasks.
    case("task-timeout-zero.yaml", 1, "spec.timeoutMinutes", Some("between 1 and 180")),
    case("task-timeout-181.yaml", 1, "spec.timeoutMinutes", Some("between 1 and 180")),
    case("task-timeout-not-integer.yaml", 1, "spec.timeoutMinutes", Some("must be of type integer, not string")),
    case("task-missing-os.yaml", 1, "spec.os", Some("Required value")),
    case("task-unknown-field.yaml", 1, "spec.colour", Some("unknown field")),
    case("task-runscript-with-installsoftware.yaml", 1, "spec.installSoftware", Some("only then")),
    case("task-installsoftware-without-struct.yaml", 1, "spec.installSoftware", Some("must be set when type is InstallSoftware")),
    case("task-reboot-struct-on-runscript.yaml", 1, "spec.reboot", Some("only be set when type is Reboot")),
    case("task-parameter-not-env-name.yaml", 1, "spec.runScript.parameters", Some("environment variable names")),
    case("task-parameter-reserved-name.yaml", 1, "spec.runScript.parameters", Some("must not be PATH")),
    case("task-bash-script-on-windows.yaml", 1, "spec.runScript.scriptRef", Some("Script hello is Bash but the task is for Windows")),
    case("task-powershell-script-on-linux.yaml", 1, "spec.runScript.scriptRef", Some("Script hello is PowerShell but the task is for Linux")),
    case("task-script-missing.yaml", 1, "spec.runScript.scriptRef", Some("does not exist")),
    case("task-script-foreign-namespace.yaml", 1, "spec.runScript.scriptRef", Some("may not name namespace team-b")),
    case("task-undeclared-parameter.yaml", 1, "spec.runScript.parameters.COLOUR", Some("no script of this task declares")),
    case("task-required-parameter-missing.yaml", 1, "spec.runScript.parameters", Some("requires parameter PACKAGE")),
    // Workflows.
    case("workflow-six-pre-tasks.yaml", 1, "spec.preTasks", Some("at most 5 pre-patching tasks")),
    case("workflow-six-post-tasks.yaml", 1, "spec.postTasks", Some("at most 5 post-patching tasks")),
    case("workflow-pre-tasks-string.yaml", 1, "spec.preTasks", Some("must be of type array, not string")),
    case("workflow-reboot-not-last.yaml", 1, "spec.preTasks[0].taskRef", Some("must be the last task")),
    case("workflow-reboot-not-last-in-post.yaml", 1, "spec.postTasks[0].taskRef", Some("must be the last task")),
    case("workflow-internal-script.yaml", 3, "spec.preTasks[0].taskRef", Some("Internal-category Script rotate-agent-token")),
    case("workflow-two-defaults.yaml", 1, "spec.default", Some("weekly is also the default for Linux in namespace team-a")),
    case("workflow-two-defaults.yaml", 2, "spec.default", Some("nightly is also the default for Linux in namespace team-a")),
    case("workflow-missing-task.yaml", 1, "spec.preTasks[0].taskRef", Some("does not exist")),
    case("workflow-foreign-namespace.yaml", 1, "spec.preTasks[0].taskRef", Some("may not name namespace team-b")),
    case("workflow-windows-task.yaml", 1, "spec.postTasks[0].taskRef", Some("is for Windows but the workflow is for Linux")),
    // Remediation plans.
    case("plan-workflow-os-mismatch.yaml", 1, "spec.targets[1].workflowRef", Some("is for Linux but target sql is Windows")),
    case("plan-missing-workflow.yaml", 1, "spec.targets[0].workflowRef", Some("does not exist")),
    case("plan-max-concurrent-150-percent.yaml", 1, "spec.rollout.maxConcurrent", Some("percentage from 1% to 100%")),
    case("plan-cron-hour-out-of-range.yaml", 1, "spec.schedule.cron", Some("not a valid five-field expression")),
    case("plan-unknown-time-zone.yaml", 1, "spec.schedule.timeZone", Some("not an IANA time zone")),
    case("plan-max-failures-101-percent.yaml", 1, "spec.rollout.maxFailures", Some("percentage from 0% to 100%")),
    case("plan-cron-four-fields.yaml", 1, "spec.schedule.cron", Some("five fields")),
    case("plan-all-with-security.yaml", 1, "spec.patches.classifications", Some("All cannot be combined")),
    case("plan-priority-too-high.yaml", 1, "spec.targets[0].priority", Some("between 0 and 1000")),
    case("plan-duplicate-target-names.yaml", 1, "spec.targets[1]", Some("Duplicate value")),
    // Agents.
    case("agent-node-without-nodename.yaml", 1, "spec.nodeName", Some("required when mode is Node")),
    case("agent-with-namespace.yaml", 1, "metadata.namespace", Some("cluster-scoped")),
    // Documents, API versions, kinds and metadata.
    case("malformed-yaml.yaml", 1, "yaml", Some("not valid YAML")),
    case("api-version-v1.yaml", 1, "apiVersion", Some("fleetpatch.io/v1alpha1")),
    case("kind-unknown.yaml", 1, "kind", Some("unknown kind \"Gadget\"")),
    case("duplicate-object.yaml", 2, "metadata.name", Some("duplicate")),
    case("metadata-unknown-field.yaml", 1, "metadata.lables", Some("unknown field")),
    case("metadata-label-not-string.yaml", 1, "metadata.labels", None),
];

/// Cases the API server accepts, with why only `validate` refuses them. Every other case
/// must be refused by the API server too.
#[rustfmt::skip]
const VALIDATE_ONLY: &[(&str, &str)] = &[
    ("script-bash-syntax-error.yaml", "syntax is checked with tree-sitter, not by a schema"),
    ("script-bash-stray-fi.yaml", "syntax is checked with tree-sitter, not by a schema"),
    ("task-bash-script-on-windows.yaml", "needs the referenced Script"),
    ("task-powershell-script-on-linux.yaml", "needs the referenced Script"),
    ("task-script-missing.yaml", "needs the referenced Script"),
    ("task-script-foreign-namespace.yaml", "the library namespace is a controller setting, not part of the schema"),
    ("task-undeclared-parameter.yaml", "needs the referenced Script"),
    ("task-required-parameter-missing.yaml", "needs the referenced Script"),
    ("workflow-reboot-not-last.yaml", "needs the referenced Tasks"),
    ("workflow-reboot-not-last-in-post.yaml", "needs the referenced Tasks"),
    ("workflow-internal-script.yaml", "needs the referenced Task and Script"),
    ("workflow-two-defaults.yaml", "spans two Workflows"),
    ("workflow-missing-task.yaml", "needs the referenced Task"),
    ("workflow-foreign-namespace.yaml", "the library namespace is a controller setting, not part of the schema"),
    ("workflow-windows-task.yaml", "needs the referenced Task"),
    ("plan-workflow-os-mismatch.yaml", "needs the referenced Workflow"),
    ("plan-missing-workflow.yaml", "needs the referenced Workflow"),
    ("plan-cron-hour-out-of-range.yaml", "field ranges of a cron expression are beyond a CEL rule's cost; the controller reports it too"),
    ("plan-unknown-time-zone.yaml", "the IANA database is not in CEL; the controller reports it too"),
    ("agent-with-namespace.yaml", "the API server drops the namespace of a cluster-scoped object"),
    ("duplicate-object.yaml", "spans two documents; the second is an update to the server"),
];

/// Cases that never reach an API server as an object: kubectl (or any client) fails first.
#[rustfmt::skip]
const NOT_SENT: &[(&str, &str)] = &[
    ("malformed-yaml.yaml", "not YAML"),
    ("api-version-v1.yaml", "no such resource: the client finds no mapping"),
    ("kind-unknown.yaml", "no such resource: the client finds no mapping"),
];

/// Cases the API server refuses naming the field its own way.
#[rustfmt::skip]
const SERVER_NAMES: &[(&str, &str)] = &[
    // A decoding error, before validation: the Go JSON decoder names the Go struct field.
    ("metadata-label-not-string.yaml", "ObjectMeta.labels"),
];

/// Name of the fixture with one character too many, written at run time.
const GENERATED_TOO_LONG: &str = "script-content-too-long.yaml";
/// Name of the fixture within the characters but one byte too many.
const GENERATED_TOO_MANY_BYTES: &str = "script-content-too-many-bytes.yaml";

/// A Bash Script whose content is `echo ` and then `count` times `fill`.
fn long_script(name: &str, fill: char, count: usize) -> String {
    let body: String = std::iter::repeat_n(fill, count).collect();
    let content = format!("echo {body}");
    format!(
        "apiVersion: fleetpatch.io/v1alpha1\nkind: Script\nmetadata:\n  name: {name}\nspec:\n  language: Bash\n  content: \"{content}\"\n"
    )
}

/// Fixtures too large to commit, by file name.
fn generated_fixtures() -> Vec<(&'static str, String)> {
    // "echo " is five bytes; 'é' is two.
    vec![
        (
            GENERATED_TOO_LONG,
            long_script("too-long", 'a', SCRIPT_MAX + 1 - 5),
        ),
        (
            GENERATED_TOO_MANY_BYTES,
            long_script("too-many-bytes", 'é', (SCRIPT_MAX - 5) / 2 + 1),
        ),
    ]
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bad")
}

fn validate(paths: &[&Path]) -> Output {
    Command::new(BIN)
        .arg("validate")
        .arg("-f")
        .args(paths)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"))
}

/// Splits `FILE:DOC Kind/name: field.path: message` after the `FILE:DOC ` prefix into
/// (object, field, message).
fn parse_rest(rest: &str) -> Option<(&str, &str, &str)> {
    let mut parts = rest.splitn(3, ": ");
    Some((parts.next()?, parts.next()?, parts.next()?))
}

/// What is wrong with the output for `case`, or `None` when it is as expected.
fn check_case(case: &Case, path: &Path) -> Option<String> {
    let output = validate(&[path]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut wrong = Vec::new();
    if output.status.code() != Some(1) {
        wrong.push(format!(
            "exit status {:?}, expected 1",
            output.status.code()
        ));
    }
    let prefix = format!("{}:{} ", path.display(), case.doc);
    let on_doc: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .collect();
    if on_doc.is_empty() {
        wrong.push(format!("no line starts with {prefix:?}"));
    } else if !stdout.lines().any(|l| l.contains(case.field)) {
        wrong.push(format!("no line names field {:?}", case.field));
    } else {
        let matching = on_doc.iter().any(|rest| {
            parse_rest(rest).is_some_and(|(_, field, message)| {
                field.contains(case.field) && case.message.is_none_or(|m| message.contains(m))
            })
        });
        if !matching {
            wrong.push(format!(
                "no line of document {} has field {:?}{}",
                case.doc,
                case.field,
                case.message
                    .map(|m| format!(" with message containing {m:?}"))
                    .unwrap_or_default()
            ));
        }
    }
    if wrong.is_empty() {
        return None;
    }
    Some(format!(
        "{} (doc {}, field {:?}): {}\n    stdout: {}\n    stderr: {}",
        case.file,
        case.doc,
        case.field,
        wrong.join("; "),
        indent(&stdout),
        indent(&stderr)
    ))
}

fn indent(text: &str) -> String {
    let text = text.trim_end();
    if text.is_empty() {
        "(empty)".to_string()
    } else {
        text.replace('\n', "\n            ")
    }
}

#[test]
fn every_bad_manifest_is_rejected_with_its_field() {
    let generated = tempfile::tempdir().unwrap();
    let generated_names: Vec<&str> = generated_fixtures()
        .into_iter()
        .map(|(name, content)| {
            std::fs::write(generated.path().join(name), content).unwrap();
            name
        })
        .collect();

    let mut failures = Vec::new();
    for case in CASES {
        let path = if generated_names.contains(&case.file) {
            generated.path().join(case.file)
        } else {
            fixtures_dir().join(case.file)
        };
        if !path.is_file() {
            failures.push(format!("{}: fixture file is missing", case.file));
            continue;
        }
        failures.extend(check_case(case, &path));
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n\n")
    );
}

/// The document `doc` (1-based) of a fixture, as JSON.
fn document(path: &Path, doc: usize) -> serde_json::Value {
    use serde::Deserialize;
    let text = std::fs::read_to_string(path).unwrap();
    let yaml = serde_yaml_ng::Deserializer::from_str(&text)
        .nth(doc - 1)
        .unwrap_or_else(|| panic!("{}: no document {doc}", path.display()));
    serde_yaml_ng::Value::deserialize(yaml)
        .and_then(serde_yaml_ng::from_value)
        .unwrap_or_else(|e| panic!("{}:{doc}: {e}", path.display()))
}

#[test]
fn the_real_api_server_agrees_with_validate_case_by_case() {
    let home = tempfile::tempdir().unwrap();
    let cluster = support::Cluster::shared(home.path());
    if !cluster.is_real() {
        return;
    }
    cluster.install_crds();
    let api = support::raw::RawApi::new(&cluster.kubeconfig);
    let generated = tempfile::tempdir().unwrap();
    for (name, content) in generated_fixtures() {
        std::fs::write(generated.path().join(name), content).unwrap();
    }
    let mut failures = Vec::new();
    for case in CASES {
        if NOT_SENT.iter().any(|(file, _)| *file == case.file) {
            continue;
        }
        let path = match generated.path().join(case.file) {
            path if path.exists() => path,
            _ => fixtures_dir().join(case.file),
        };
        let object = document(&path, case.doc);
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("bad-manifests")
            .to_string();
        cluster.create_namespace(&namespace);
        let answer = api.create(&object, &namespace, true);
        let validate_only = VALIDATE_ONLY.iter().find(|(file, _)| *file == case.file);
        match (validate_only, answer) {
            (Some(_), Ok(_)) => {}
            (Some((_, why)), Err(status)) => failures.push(format!(
                "{}: listed as validate-only ({why}) but the server refused it: {:?}",
                case.file,
                support::raw::describe(&status)
            )),
            (None, Ok(_)) => failures.push(format!(
                "{}: the server accepted it; validate says {} is wrong",
                case.file, case.field
            )),
            (None, Err(status)) => {
                let said = support::raw::describe(&status);
                let field = SERVER_NAMES
                    .iter()
                    .find(|(file, _)| *file == case.file)
                    .map_or(case.field, |(_, field)| field);
                let names_field = status
                    .details
                    .iter()
                    .flat_map(|d| d.causes.iter())
                    .any(|c| c.field.contains(field))
                    || status.message.contains(field);
                if !(400..500).contains(&status.code) || !names_field {
                    failures.push(format!(
                        "{}: the server refused it ({}) without naming {field}: {said:?}",
                        case.file, status.code
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "validate and the API server disagree on {} case(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_fixture_file_has_a_case() {
    let mut orphans = Vec::new();
    for entry in std::fs::read_dir(fixtures_dir()).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if !CASES.iter().any(|case| case.file == name) {
            orphans.push(name);
        }
    }
    orphans.sort();
    assert!(
        orphans.is_empty(),
        "fixtures without a row in CASES: {orphans:?}"
    );
    let listed = VALIDATE_ONLY.iter().chain(NOT_SENT).chain(SERVER_NAMES);
    for (file, _) in listed {
        assert!(
            CASES.iter().any(|case| case.file == *file),
            "{file} is listed but has no case"
        );
    }
    assert!(CASES.len() >= 34, "only {} cases", CASES.len());
}

const VALID_LINUX: &str = r#"apiVersion: fleetpatch.io/v1alpha1
kind: Script
metadata:
  name: check-disk-space
spec:
  language: Bash
  parameters:
  - name: MIN_FREE_MB
    default: "100"
  content: |
    set -eu
    free_mb=$(df -Pm / | awk 'NR == 2 { print $4 }')
    if [ "$free_mb" -lt "$MIN_FREE_MB" ]; then
      echo "only ${free_mb} MiB free"
      exit 1
    fi
---
apiVersion: fleetpatch.io/v1alpha1
kind: Task
metadata:
  name: check-disk-space
spec:
  os: Linux
  type: RunScript
  timeoutMinutes: 5
  runScript:
    scriptRef: {name: check-disk-space}
    parameters:
      MIN_FREE_MB: "500"
---
apiVersion: fleetpatch.io/v1alpha1
kind: Workflow
metadata:
  name: nightly
spec:
  os: Linux
  preTasks:
  - taskRef: {name: check-disk-space}
  postTasks:
  - taskRef: {name: linux-reboot-if-required, namespace: fleetpatch-system}
"#;

/// Runs `validate` on one generated file and asserts it is clean.
fn assert_clean(name: &str, content: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, content).unwrap();
    let output = validate(&[&path]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.code() == Some(0) && stdout.trim().is_empty(),
        "{name}: expected exit 0 and no problems, got {:?}\nstdout: {stdout}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn a_valid_linux_workflow_passes() {
    assert_clean("valid-linux.yaml", VALID_LINUX);
}

#[test]
fn a_script_of_exactly_the_maximum_length_passes() {
    assert_clean(
        "script-max-ascii.yaml",
        &long_script("max-ascii", 'a', SCRIPT_MAX - 5),
    );
}

/// The byte limit counts UTF-8: "echo " and 10,237 times 'é' are 20,479 bytes and pass;
/// one 'é' more is 20,481 bytes and is refused (the generated case above), though both
/// are far within the 20,480 characters.
#[test]
fn a_non_ascii_script_within_the_bytes_passes() {
    assert_clean(
        "script-max-non-ascii.yaml",
        &long_script("max-non-ascii", 'é', (SCRIPT_MAX - 5) / 2),
    );
}

#[test]
fn a_missing_path_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-file.yaml");
    let output = validate(&[&missing]);
    assert_eq!(
        output.status.code(),
        Some(2),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no-such-file.yaml"),
        "stderr does not name the path: {stderr}"
    );
}

/// A plan selecting Bugfix updates passes on its own (which patcher its hosts have is
/// known only on them), and is refused — naming the field — when `validate` is told
/// the hosts patch with apt, which marks no bug fixes; dnf honours it.
#[test]
fn a_classification_the_named_patcher_cannot_install_is_refused() {
    const PLAN: &str = r#"apiVersion: fleetpatch.io/v1alpha1
kind: RemediationPlan
metadata: {name: bugfixes, namespace: team}
spec:
  targets:
  - {name: web, os: Linux, selector: {matchLabels: {fleetpatch.io/group: web}}}
  patches: {classifications: [Bugfix]}
"#;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plan.yaml");
    std::fs::write(&path, PLAN).unwrap();
    let run = |patchers: &[&str]| {
        let mut command = Command::new(BIN);
        command.arg("validate").arg("-f").arg(&path);
        for patcher in patchers {
            command.args(["--patcher", patcher]);
        }
        let output = command.output().unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    };
    assert_eq!(run(&[]), (Some(0), String::new()));
    assert_eq!(run(&["dnf", "zypper"]), (Some(0), String::new()));
    let (code, stdout) = run(&["dnf", "apt"]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains(
            "RemediationPlan/bugfixes: spec.patches.classifications: apt cannot select Bugfix"
        ),
        "{stdout}"
    );
    assert_eq!(
        run(&["windows-update"]),
        (Some(0), String::new()),
        "no Windows target: Windows Update is not asked"
    );
}
