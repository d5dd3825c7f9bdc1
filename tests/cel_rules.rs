//! Every CEL rule in the CRDs, each with an object it accepts and one it rejects,
//! evaluated client-side by kube's CEL validation exactly as the CRD declares it, and
//! by the real kube-apiserver (which also compiles every rule against its cost budget
//! when the CRDs are applied): both must agree, field path and message.

#![cfg(feature = "full")]

mod support;

use fleetpatch::api::{Agent, PatchJob, RemediationPlan, Script, Task, Workflow};
use kube::core::cel::ValidationErrors;
use serde_json::{Value, json};

fn script() -> Value {
    json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "Script", "metadata": {"name": "s"},
           "spec": {"language": "PowerShell", "content": "Write-Host 'hi'"}})
}

fn task(spec: Value) -> Value {
    json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "Task", "metadata": {"name": "t"}, "spec": spec})
}

fn run_script_task() -> Value {
    task(json!({"os": "Linux", "type": "RunScript", "runScript": {"scriptRef": {"name": "s"}}}))
}

fn install_task() -> Value {
    task(
        json!({"os": "Windows", "type": "InstallSoftware", "installSoftware": {
        "source": {"protocol": "Https", "url": "https://example.com/app.exe"},
        "sha256": "a".repeat(64), "installScriptRef": {"name": "install"}}}),
    )
}

fn registry_task() -> Value {
    task(
        json!({"os": "Windows", "type": "ChangeRegistryKey", "changeRegistryKey": {
        "keyPath": "HKEY_LOCAL_MACHINE\\SOFTWARE\\Vendor", "valueType": "REG_DWORD", "valueName": "Enabled",
        "valueData": "1"}}),
    )
}

fn uninstall_task() -> Value {
    task(
        json!({"os": "Windows", "type": "UninstallSoftware", "uninstallSoftware": {
        "uninstallKey": "HKEY_LOCAL_MACHINE\\SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\Uninstall\\App",
        "displayName": "App"}}),
    )
}

fn workflow() -> Value {
    json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "Workflow", "metadata": {"name": "w"},
           "spec": {"os": "Linux", "preTasks": [], "postTasks": []}})
}

fn plan() -> Value {
    json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "RemediationPlan", "metadata": {"name": "p"},
           "spec": {"targets": [{"name": "all", "os": "Linux", "priority": 5}],
                    "schedule": {"cron": "0 2 * * 6", "windowMinutes": 60},
                    "rollout": {"maxConcurrent": 10, "maxFailures": "5%"},
                    "reboot": {"policy": "IfRequired", "maxConcurrentNodes": 1},
                    "patches": {"classifications": ["Security"]}}})
}

fn agent() -> Value {
    json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "Agent", "metadata": {"name": "a"},
           "spec": {"mode": "Node", "os": "Linux", "nodeName": "node-1"}})
}

fn patch_job() -> Value {
    json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "PatchJob", "metadata": {"name": "j"},
           "spec": {"agent": "a", "plan": "p", "run": "r1", "os": "Linux"}})
}

/// Validates `object` with the CEL rules of its kind (and `old` for transition rules).
fn cel(object: &Value, old: Option<&Value>) -> Result<(), ValidationErrors> {
    fn typed<K: serde::de::DeserializeOwned>(value: &Value) -> K {
        serde_json::from_value(value.clone())
            .unwrap_or_else(|e| panic!("fixture must deserialize: {e}: {value}"))
    }
    macro_rules! check {
        ($kind:ty) => {{
            let new: $kind = typed(object);
            match old {
                Some(old) => new.validate_cel_update(&typed::<$kind>(old)),
                None => new.validate_cel(),
            }
        }};
    }
    match object["kind"].as_str().unwrap() {
        "Script" => check!(Script),
        "Task" => check!(Task),
        "Workflow" => check!(Workflow),
        "RemediationPlan" => check!(RemediationPlan),
        "PatchJob" => check!(PatchJob),
        "Agent" => check!(Agent),
        other => panic!("unknown kind {other}"),
    }
}

/// Sets `pointer` (JSON pointer) in a copy of `base` to `value`; `Value::Null` removes it.
fn with(base: &Value, pointer: &str, value: Value) -> Value {
    let mut copy = base.clone();
    let (parent, field) = pointer.rsplit_once('/').unwrap();
    let parent = copy
        .pointer_mut(parent)
        .unwrap_or_else(|| panic!("no {parent}"));
    if value.is_null() {
        parent.as_object_mut().unwrap().remove(field);
    } else {
        parent[field] = value;
    }
    copy
}

struct Case {
    rule: &'static str,
    accepted: Value,
    rejected: Value,
    /// Substring of the rejected object's error: its field path and message.
    expect: &'static str,
}

fn case(rule: &'static str, accepted: Value, rejected: Value, expect: &'static str) -> Case {
    Case {
        rule,
        accepted,
        rejected,
        expect,
    }
}

fn cases() -> Vec<Case> {
    let linux_script = with(&script(), "/spec/language", json!("Bash"));
    let mut six = Vec::new();
    for i in 0..6 {
        six.push(json!({"taskRef": {"name": format!("t{i}")}}));
    }
    let five = Value::Array(six[..5].to_vec());
    let six = Value::Array(six);
    vec![
        // Script
        case(
            "signature only for PowerShell",
            with(&script(), "/spec/signature", json!("# SIG # Begin")),
            with(&linux_script, "/spec/signature", json!("sig")),
            "spec.signature: signature is only supported for PowerShell",
        ),
        case(
            "content not empty",
            script(),
            with(&script(), "/spec/content", json!("  \n")),
            "spec.content: script content must not be empty",
        ),
        // Task: the sub-struct matches the type
        case(
            "runScript iff RunScript",
            run_script_task(),
            with(&run_script_task(), "/spec/type", json!("Reboot")),
            "spec.runScript: runScript must be set when type is RunScript",
        ),
        case(
            "installSoftware iff InstallSoftware",
            install_task(),
            with(&install_task(), "/spec/type", json!("RunScript")),
            "spec.installSoftware: installSoftware must be set when type is InstallSoftware",
        ),
        case(
            "changeRegistryKey iff ChangeRegistryKey",
            registry_task(),
            with(&registry_task(), "/spec/type", json!("UninstallSoftware")),
            "spec.changeRegistryKey: changeRegistryKey must be set when type is ChangeRegistryKey",
        ),
        case(
            "uninstallSoftware iff UninstallSoftware",
            uninstall_task(),
            with(&uninstall_task(), "/spec/uninstallSoftware", Value::Null),
            "spec.uninstallSoftware: uninstallSoftware must be set when type is UninstallSoftware",
        ),
        case(
            "reboot only for Reboot",
            task(json!({"os": "Linux", "type": "Reboot", "reboot": {"onlyIfRequired": true}})),
            with(&run_script_task(), "/spec/reboot", json!({})),
            "spec.reboot: reboot may only be set when type is Reboot",
        ),
        case(
            "REG_DWORD data fits in 32 bits",
            with(
                &registry_task(),
                "/spec/changeRegistryKey/valueData",
                json!("0004294967295"),
            ),
            with(
                &registry_task(),
                "/spec/changeRegistryKey/valueData",
                json!("4294967296"),
            ),
            "spec.changeRegistryKey.valueData: valueData does not fit in a REG_DWORD",
        ),
        case(
            "REG_QWORD data fits in 64 bits",
            with(
                &with(
                    &registry_task(),
                    "/spec/changeRegistryKey/valueType",
                    json!("REG_QWORD"),
                ),
                "/spec/changeRegistryKey/valueData",
                json!("18446744073709551615"),
            ),
            with(
                &with(
                    &registry_task(),
                    "/spec/changeRegistryKey/valueType",
                    json!("REG_QWORD"),
                ),
                "/spec/changeRegistryKey/valueData",
                json!("18446744073709551616"),
            ),
            "spec.changeRegistryKey.valueData: valueData does not fit in a REG_QWORD",
        ),
        case(
            "registry and uninstall are Windows-only",
            registry_task(),
            with(&registry_task(), "/spec/os", json!("Linux")),
            "spec.os: ChangeRegistryKey and UninstallSoftware tasks are Windows-only",
        ),
        case(
            "timeout at least 1 minute",
            with(&run_script_task(), "/spec/timeoutMinutes", json!(1)),
            with(&run_script_task(), "/spec/timeoutMinutes", json!(0)),
            "spec.timeoutMinutes: timeoutMinutes must be between 1 and 180",
        ),
        case(
            "timeout at most 180 minutes",
            with(&run_script_task(), "/spec/timeoutMinutes", json!(180)),
            with(&run_script_task(), "/spec/timeoutMinutes", json!(181)),
            "spec.timeoutMinutes: timeoutMinutes must be between 1 and 180",
        ),
        case(
            "runScript parameter names",
            with(
                &run_script_task(),
                "/spec/runScript/parameters",
                json!({"LEVEL_2": "x"}),
            ),
            with(
                &run_script_task(),
                "/spec/runScript/parameters",
                json!({"2LEVEL": "x"}),
            ),
            "spec.runScript.parameters: parameter names must be environment variable names",
        ),
        case(
            "installSoftware parameter names",
            with(
                &install_task(),
                "/spec/installSoftware/parameters",
                json!({"A": "1"}),
            ),
            with(
                &install_task(),
                "/spec/installSoftware/parameters",
                json!({"a-b": "1"}),
            ),
            "spec.installSoftware.parameters: parameter names must be environment variable names",
        ),
        case(
            "runScript parameters cannot replace PATH",
            with(
                &run_script_task(),
                "/spec/runScript/parameters",
                json!({"PATHS": "/ /var"}),
            ),
            with(
                &run_script_task(),
                "/spec/runScript/parameters",
                json!({"path": "/tmp"}),
            ),
            "spec.runScript.parameters: parameter names must not be PATH",
        ),
        case(
            "installSoftware parameters cannot replace Windows system variables",
            with(
                &install_task(),
                "/spec/installSoftware/parameters",
                json!({"PROGRAM_FILES": "x"}),
            ),
            with(
                &install_task(),
                "/spec/installSoftware/parameters",
                json!({"ProgramFiles": "x"}),
            ),
            "spec.installSoftware.parameters: parameter names must not be PATH",
        ),
        // InstallSoftware download source
        case(
            "Https needs url",
            install_task(),
            with(
                &install_task(),
                "/spec/installSoftware/source/url",
                Value::Null,
            ),
            "spec.installSoftware.source: Https and Http sources need url; NetworkShare sources need unc",
        ),
        case(
            "NetworkShare needs unc",
            with(
                &install_task(),
                "/spec/installSoftware/source",
                json!({"protocol": "NetworkShare", "unc": "\\\\files\\share\\app.exe"}),
            ),
            with(
                &install_task(),
                "/spec/installSoftware/source",
                json!({"protocol": "NetworkShare", "url": "https://x/app.exe"}),
            ),
            "spec.installSoftware.source: Https and Http sources need url; NetworkShare sources need unc",
        ),
        case(
            "url or unc, not both",
            install_task(),
            with(
                &install_task(),
                "/spec/installSoftware/source/unc",
                json!("\\\\files\\share\\app.exe"),
            ),
            "spec.installSoftware.source: set url for Https/Http sources or unc for NetworkShare sources, not both",
        ),
        case(
            "Https url scheme",
            install_task(),
            with(
                &install_task(),
                "/spec/installSoftware/source/url",
                json!("http://example.com/app.exe"),
            ),
            "spec.installSoftware.source.url: url must start with https:// when protocol is Https",
        ),
        case(
            "Http url scheme",
            with(
                &install_task(),
                "/spec/installSoftware/source",
                json!({"protocol": "Http", "url": "http://example.com/a.exe"}),
            ),
            with(
                &install_task(),
                "/spec/installSoftware/source",
                json!({"protocol": "Http", "url": "https://example.com/a.exe"}),
            ),
            "spec.installSoftware.source.url: url must start with http:// when protocol is Http",
        ),
        case(
            "unc is a share path",
            with(
                &install_task(),
                "/spec/installSoftware/source",
                json!({"protocol": "NetworkShare", "unc": "/mnt/share/app.deb"}),
            ),
            with(
                &install_task(),
                "/spec/installSoftware/source",
                json!({"protocol": "NetworkShare", "unc": "files/share/app.exe"}),
            ),
            "spec.installSoftware.source.unc: must be a UNC path",
        ),
        case(
            "sha256 is 64 hex digits",
            with(
                &install_task(),
                "/spec/installSoftware/sha256",
                json!("0123456789abcdefABCDEF".repeat(3)[..64].to_string()),
            ),
            with(
                &install_task(),
                "/spec/installSoftware/sha256",
                json!("z".repeat(64)),
            ),
            "spec.installSoftware.sha256: sha256 must be exactly 64 hexadecimal digits",
        ),
        case(
            "fileName is a plain name",
            with(
                &install_task(),
                "/spec/installSoftware/fileName",
                json!("setup.exe"),
            ),
            with(
                &install_task(),
                "/spec/installSoftware/fileName",
                json!("..\\setup.exe"),
            ),
            "spec.installSoftware.fileName: fileName must be a plain file name",
        ),
        // Registry key path (ChangeRegistryKey.keyPath and UninstallSoftware.uninstallKey share the rules)
        case(
            "registry root",
            registry_task(),
            with(
                &registry_task(),
                "/spec/changeRegistryKey/keyPath",
                json!("HKLM\\SOFTWARE\\Vendor"),
            ),
            "spec.changeRegistryKey.keyPath: must start with HKEY_CURRENT_USER",
        ),
        case(
            "every registry root is accepted",
            with(
                &registry_task(),
                "/spec/changeRegistryKey/keyPath",
                json!("HKEY_CURRENT_CONFIG\\Software"),
            ),
            with(
                &registry_task(),
                "/spec/changeRegistryKey/keyPath",
                json!("HKEY_PERFORMANCE_DATA\\Software"),
            ),
            "spec.changeRegistryKey.keyPath: must start with HKEY_CURRENT_USER",
        ),
        case(
            "registry path without /",
            registry_task(),
            with(
                &registry_task(),
                "/spec/changeRegistryKey/keyPath",
                json!("HKEY_LOCAL_MACHINE\\SOFTWARE/Vendor"),
            ),
            "spec.changeRegistryKey.keyPath: must not contain a forward slash",
        ),
        case(
            "registry path without trailing backslash",
            registry_task(),
            with(
                &registry_task(),
                "/spec/changeRegistryKey/keyPath",
                json!("HKEY_LOCAL_MACHINE\\SOFTWARE\\"),
            ),
            "spec.changeRegistryKey.keyPath: must not end with a backslash",
        ),
        case(
            "registry path has a subkey",
            registry_task(),
            with(
                &registry_task(),
                "/spec/changeRegistryKey/keyPath",
                json!("HKEY_LOCAL_MACHINE"),
            ),
            "spec.changeRegistryKey.keyPath: must name at least one subkey",
        ),
        case(
            "uninstall key follows the registry rules",
            uninstall_task(),
            with(
                &uninstall_task(),
                "/spec/uninstallSoftware/uninstallKey",
                json!("HKEY_USERS/x"),
            ),
            "spec.uninstallSoftware.uninstallKey: must not contain a forward slash",
        ),
        case(
            "REG_DWORD data numeric",
            registry_task(),
            with(
                &registry_task(),
                "/spec/changeRegistryKey/valueData",
                json!("0x1"),
            ),
            "spec.changeRegistryKey.valueData: valueData must be a non-negative decimal number",
        ),
        case(
            "REG_QWORD data numeric",
            with(
                &registry_task(),
                "/spec/changeRegistryKey/valueType",
                json!("REG_QWORD"),
            ),
            with(
                &with(
                    &registry_task(),
                    "/spec/changeRegistryKey/valueType",
                    json!("REG_QWORD"),
                ),
                "/spec/changeRegistryKey/valueData",
                json!("lots"),
            ),
            "spec.changeRegistryKey.valueData: valueData must be a non-negative decimal number",
        ),
        case(
            "REG_BINARY data is hexadecimal byte pairs",
            with(
                &with(
                    &registry_task(),
                    "/spec/changeRegistryKey/valueType",
                    json!("REG_BINARY"),
                ),
                "/spec/changeRegistryKey/valueData",
                json!("0100fF"),
            ),
            with(
                &with(
                    &registry_task(),
                    "/spec/changeRegistryKey/valueType",
                    json!("REG_BINARY"),
                ),
                "/spec/changeRegistryKey/valueData",
                json!("100"),
            ),
            "spec.changeRegistryKey.valueData: valueData must be hexadecimal byte pairs for REG_BINARY",
        ),
        case(
            "REG_SZ data free-form",
            with(
                &with(
                    &registry_task(),
                    "/spec/changeRegistryKey/valueType",
                    json!("REG_SZ"),
                ),
                "/spec/changeRegistryKey/valueData",
                json!("any text"),
            ),
            with(
                &registry_task(),
                "/spec/changeRegistryKey/valueData",
                json!("any text"),
            ),
            "spec.changeRegistryKey.valueData",
        ),
        // Workflow
        case(
            "at most 5 pre tasks",
            with(&workflow(), "/spec/preTasks", five.clone()),
            with(&workflow(), "/spec/preTasks", six.clone()),
            "spec.preTasks: a workflow may have at most 5 pre-patching tasks",
        ),
        case(
            "at most 5 post tasks",
            with(&workflow(), "/spec/postTasks", five),
            with(&workflow(), "/spec/postTasks", six),
            "spec.postTasks: a workflow may have at most 5 post-patching tasks",
        ),
        // RemediationPlan
        case(
            "priority range",
            plan(),
            with(&plan(), "/spec/targets/0/priority", json!(1001)),
            "spec.targets[0].priority: priority must be between 0 and 1000",
        ),
        case(
            "All stands alone",
            with(&plan(), "/spec/patches/classifications", json!(["All"])),
            with(
                &plan(),
                "/spec/patches/classifications",
                json!(["All", "Security"]),
            ),
            "spec.patches.classifications: All cannot be combined",
        ),
        case(
            "cron has five fields",
            plan(),
            with(&plan(), "/spec/schedule/cron", json!("0 2 * *")),
            "spec.schedule.cron: cron must have five fields",
        ),
        case(
            "window length",
            plan(),
            with(&plan(), "/spec/schedule/windowMinutes", json!(0)),
            "spec.schedule.windowMinutes: windowMinutes must be between 1 and 10080",
        ),
        case(
            "maxConcurrent count or percentage",
            with(&plan(), "/spec/rollout/maxConcurrent", json!("100%")),
            with(&plan(), "/spec/rollout/maxConcurrent", json!("150%")),
            "spec.rollout.maxConcurrent: maxConcurrent must be a positive count",
        ),
        case(
            "maxConcurrent positive",
            with(&plan(), "/spec/rollout/maxConcurrent", json!(1)),
            with(&plan(), "/spec/rollout/maxConcurrent", json!(0)),
            "spec.rollout.maxConcurrent: maxConcurrent must be a positive count",
        ),
        case(
            "maxFailures count or percentage",
            with(&plan(), "/spec/rollout/maxFailures", json!(0)),
            with(&plan(), "/spec/rollout/maxFailures", json!("half")),
            "spec.rollout.maxFailures: maxFailures must be a count",
        ),
        case(
            "maxConcurrentNodes at least 1",
            plan(),
            with(&plan(), "/spec/reboot/maxConcurrentNodes", json!(0)),
            "spec.reboot.maxConcurrentNodes: maxConcurrentNodes must be at least 1",
        ),
        case(
            "job deadline range",
            with(&plan(), "/spec/jobDeadlineMinutes", json!(120)),
            with(&plan(), "/spec/jobDeadlineMinutes", json!(0)),
            "spec.jobDeadlineMinutes: jobDeadlineMinutes must be between 1 and 10080",
        ),
        // Agent
        case(
            "Node agents name their node",
            with(&agent(), "/spec/mode", json!("External")),
            with(&agent(), "/spec/nodeName", Value::Null),
            "spec.nodeName: nodeName is required when mode is Node",
        ),
    ]
    .into_iter()
    .chain(registry_root_cases())
    .collect()
}

/// Each of the five registry roots is accepted, in both fields that name a key, and its
/// abbreviation (as `reg.exe` and PowerShell drives spell it) is not.
fn registry_root_cases() -> Vec<Case> {
    const ROOTS: [(&str, &str, &str); 5] = [
        (
            "HKEY_LOCAL_MACHINE",
            "HKLM",
            "registry root HKEY_LOCAL_MACHINE",
        ),
        (
            "HKEY_CURRENT_USER",
            "HKCU",
            "registry root HKEY_CURRENT_USER",
        ),
        ("HKEY_USERS", "HKU", "registry root HKEY_USERS"),
        (
            "HKEY_CLASSES_ROOT",
            "HKCR",
            "registry root HKEY_CLASSES_ROOT",
        ),
        (
            "HKEY_CURRENT_CONFIG",
            "HKCC",
            "registry root HKEY_CURRENT_CONFIG",
        ),
    ];
    let mut cases = Vec::new();
    for (root, short, rule) in ROOTS {
        cases.push(case(
            rule,
            with(
                &registry_task(),
                "/spec/changeRegistryKey/keyPath",
                json!(format!("{root}\\Software\\Vendor")),
            ),
            with(
                &registry_task(),
                "/spec/changeRegistryKey/keyPath",
                json!(format!("{short}\\Software\\Vendor")),
            ),
            "spec.changeRegistryKey.keyPath: must start with HKEY_CURRENT_USER",
        ));
        cases.push(case(
            rule,
            with(
                &uninstall_task(),
                "/spec/uninstallSoftware/uninstallKey",
                json!(format!("{root}\\Software\\App")),
            ),
            with(
                &uninstall_task(),
                "/spec/uninstallSoftware/uninstallKey",
                json!(format!("{short}\\Software\\App")),
            ),
            "spec.uninstallSoftware.uninstallKey: must start with HKEY_CURRENT_USER",
        ));
    }
    cases
}

#[test]
fn every_rule_accepts_its_good_object_and_rejects_its_bad_one() {
    let mut failures = Vec::new();
    for Case {
        rule,
        accepted,
        rejected,
        expect,
    } in cases()
    {
        if let Err(errors) = cel(&accepted, None) {
            failures.push(format!(
                "{rule}: the accepted object was rejected: {errors:?}"
            ));
        }
        match cel(&rejected, None) {
            Ok(()) => failures.push(format!("{rule}: the rejected object was accepted")),
            Err(errors) => {
                let shown: Vec<String> = errors
                    .iter()
                    .map(|e| format!("{}: {}", e.field_path, e.message))
                    .collect();
                if !shown.iter().any(|line| line.contains(expect)) {
                    failures.push(format!("{rule}: expected {expect:?}, got {shown:?}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} rule(s) misbehaved:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The CEL rule and the list the agent checks (`RESERVED_PARAMETER_NAMES`) agree, in
/// any case, and the agent's own `FLEETPATCH_` prefix is refused too.
#[test]
fn every_reserved_parameter_name_is_refused() {
    let refused = |name: &str| {
        let task = with(
            &run_script_task(),
            "/spec/runScript/parameters",
            json!({name: "x"}),
        );
        cel(&task, None).is_err_and(|errors| {
            errors
                .iter()
                .any(|e| e.message.starts_with("parameter names must not be PATH"))
        })
    };
    for name in fleetpatch::api::task::RESERVED_PARAMETER_NAMES {
        for spelling in [name.to_string(), name.to_lowercase(), name.to_uppercase()] {
            assert!(refused(&spelling), "{spelling} is accepted");
        }
    }
    for name in ["FLEETPATCH_JOB", "fleetpatch_download_path"] {
        assert!(refused(name), "{name} is accepted");
    }
    for name in ["PATHS", "MY_PATH", "HOMEPAGE", "OSVERSION", "TEMPLATE"] {
        assert!(!refused(name), "{name} is refused");
    }
}

#[test]
fn patch_job_spec_is_immutable() {
    let old = patch_job();
    assert!(
        cel(&old, Some(&old)).is_ok(),
        "an unchanged spec is accepted"
    );
    let status_only = with(&old, "/status", json!({"phase": "Running"}));
    assert!(
        cel(&status_only, Some(&old)).is_ok(),
        "status changes are accepted"
    );
    let changed = with(&old, "/spec/agent", json!("other-host"));
    let errors = cel(&changed, Some(&old)).expect_err("a changed spec is rejected");
    assert!(
        errors
            .iter()
            .any(|e| e.field_path == "spec" && e.message.contains("PatchJob spec is immutable")),
        "{errors:?}"
    );
}

#[test]
fn agent_mode_is_immutable() {
    let old = agent();
    assert!(cel(&with(&old, "/spec/paused", json!(true)), Some(&old)).is_ok());
    let changed = with(
        &with(&old, "/spec/mode", json!("External")),
        "/spec/nodeName",
        Value::Null,
    );
    let errors = cel(&changed, Some(&old)).expect_err("changing mode is rejected");
    assert!(
        errors
            .iter()
            .any(|e| e.field_path == "spec.mode" && e.message == "mode is immutable"),
        "{errors:?}"
    );
}

/// Whether the server's refusal names `expect` (`field: message`): a cause on that field
/// whose message contains the message.
fn server_says(status: &kube::core::Status, expect: &str) -> bool {
    let mut causes = status.details.iter().flat_map(|d| d.causes.iter());
    match expect.split_once(": ") {
        Some((field, message)) => causes.any(|c| c.field == field && c.message.contains(message)),
        // A case that names only the field.
        None => causes.any(|c| c.field == expect),
    }
}

#[test]
fn the_real_api_server_agrees_with_every_rule() {
    let home = tempfile::tempdir().unwrap();
    let cluster = support::Cluster::shared(home.path());
    if !cluster.is_real() {
        return;
    }
    cluster.install_crds();
    let namespace = "cel-rules";
    cluster.create_namespace(namespace);
    let api = support::raw::RawApi::new(&cluster.kubeconfig);
    let mut failures = Vec::new();
    for Case {
        rule,
        accepted,
        rejected,
        expect,
    } in cases()
    {
        if let Err(status) = api.create(&accepted, namespace, true) {
            failures.push(format!(
                "{rule}: the server refused the accepted object: {:?}",
                support::raw::describe(&status)
            ));
        }
        match api.create(&rejected, namespace, true) {
            Ok(_) => failures.push(format!("{rule}: the server accepted the rejected object")),
            Err(status) if status.code == 422 && server_says(&status, expect) => {}
            Err(status) => failures.push(format!(
                "{rule}: expected 422 with {expect:?}, the server said {} {:?}",
                status.code,
                support::raw::describe(&status)
            )),
        }
    }
    // Transition rules, on stored objects.
    for (old, new, expect) in [
        (
            patch_job(),
            with(&patch_job(), "/spec/agent", json!("other-host")),
            "spec: PatchJob spec is immutable",
        ),
        (
            with(&agent(), "/metadata/name", json!("cel-rules-agent")),
            with(
                &with(
                    &with(&agent(), "/metadata/name", json!("cel-rules-agent")),
                    "/spec/mode",
                    json!("External"),
                ),
                "/spec/nodeName",
                Value::Null,
            ),
            "spec.mode: mode is immutable",
        ),
    ] {
        let stored = api.create(&old, namespace, false).unwrap();
        let mut changed = new.clone();
        changed["metadata"]["resourceVersion"] = stored["metadata"]["resourceVersion"].clone();
        match api.replace(&changed, namespace) {
            Ok(_) => failures.push(format!("{expect}: the server accepted the change")),
            Err(status) if status.code == 422 && server_says(&status, expect) => {}
            Err(status) => failures.push(format!(
                "{expect}: the server said {} {:?}",
                status.code,
                support::raw::describe(&status)
            )),
        }
        let path = format!(
            "{}/{}",
            support::raw::collection(&old, namespace),
            old["metadata"]["name"].as_str().unwrap()
        );
        api.send("DELETE", &path, None).unwrap();
    }
    assert!(
        failures.is_empty(),
        "the real API server disagrees on {} rule(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
