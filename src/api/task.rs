//! `Task`: one action — run a script, install software, change a registry key,
//! uninstall software, or reboot — with the Scripts it needs.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::common::{OperatingSystem, ScriptRef, registry_key_path_schema};

/// What a Task does. Each type has its own sub-struct in the spec.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TaskType {
    RunScript,
    InstallSoftware,
    ChangeRegistryKey,
    UninstallSoftware,
    Reboot,
}

impl TaskType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RunScript => "RunScript",
            Self::InstallSoftware => "InstallSoftware",
            Self::ChangeRegistryKey => "ChangeRegistryKey",
            Self::UninstallSoftware => "UninstallSoftware",
            Self::Reboot => "Reboot",
        }
    }
}

impl std::fmt::Display for TaskType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parameter names that scripts cannot be given, compared ignoring case (Windows does):
/// the environment variables the agent passes to every child itself. The Task CRD's CEL
/// rule lists the same names, and refuses the `FLEETPATCH_` prefix the agent uses for
/// its own variables too.
pub const RESERVED_PARAMETER_NAMES: &[&str] = &[
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TEMP",
    "TMP",
    "SystemRoot",
    "windir",
    "SystemDrive",
    "ProgramData",
    "ProgramFiles",
    "ProgramW6432",
    "CommonProgramFiles",
    "CommonProgramW6432",
    "ALLUSERSPROFILE",
    "PUBLIC",
    "APPDATA",
    "LOCALAPPDATA",
    "USERPROFILE",
    "USERNAME",
    "USERDOMAIN",
    "COMPUTERNAME",
    "ComSpec",
    "PATHEXT",
    "PSModulePath",
    "OS",
    "NUMBER_OF_PROCESSORS",
    "PROCESSOR_ARCHITECTURE",
    "PROCESSOR_IDENTIFIER",
    "PROCESSOR_LEVEL",
    "PROCESSOR_REVISION",
    "DriverData",
];

fn default_timeout_minutes() -> u32 {
    60
}

fn default_success_exit_codes() -> Vec<i32> {
    vec![0]
}

/// The rule on script parameters' names: each an environment variable name.
fn parameter_names_are_variables() -> kube::core::cel::Rule {
    kube::core::cel::Rule::new("self.all(k, k.matches('^[A-Za-z_][A-Za-z0-9_]*$'))").message(
        "parameter names must be environment variable names: letters, digits and _, not starting with a digit",
    )
}

/// The rule on script parameters' names: none the agent sets for every script.
fn parameter_names_are_not_reserved() -> kube::core::cel::Rule {
    kube::core::cel::Rule::new("self.all(k, !k.matches('^(?i)(PATH|HOME|LANG|LC_ALL|TEMP|TMP|SystemRoot|windir|SystemDrive|ProgramData|ProgramFiles|ProgramW6432|CommonProgramFiles|CommonProgramW6432|ALLUSERSPROFILE|PUBLIC|APPDATA|LOCALAPPDATA|USERPROFILE|USERNAME|USERDOMAIN|COMPUTERNAME|ComSpec|PATHEXT|PSModulePath|OS|NUMBER_OF_PROCESSORS|PROCESSOR_ARCHITECTURE|PROCESSOR_IDENTIFIER|PROCESSOR_LEVEL|PROCESSOR_REVISION|DriverData|FLEETPATCH_.*)$'))")
        .message("parameter names must not be PATH, HOME, LANG, LC_ALL, TEMP, TMP, a Windows system variable (SystemRoot, ProgramFiles, ComSpec, ...; any case) or start with FLEETPATCH_: the agent sets those for every script")
}

/// Runs a Script with parameters.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RunScript {
    pub script_ref: ScriptRef,
    /// Values for the script's parameters, passed as environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    #[x_kube(validation = parameter_names_are_variables(), validation = parameter_names_are_not_reserved())]
    pub parameters: BTreeMap<String, String>,
    /// Run PowerShell with `-ExecutionPolicy Bypass`.
    #[serde(default)]
    pub bypass_execution_policy: bool,
}

/// Where the installer is downloaded from.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DownloadProtocol {
    Https,
    Http,
    NetworkShare,
}

/// Installer location: a URL for Https/Http, a UNC path (or a mounted path on Linux) for NetworkShare.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.protocol == 'NetworkShare' ? has(self.unc) : has(self.url)")
        .message("Https and Http sources need url; NetworkShare sources need unc"),
    validation = Rule::new("self.protocol == 'NetworkShare' ? !has(self.url) : !has(self.unc)")
        .message("set url for Https/Http sources or unc for NetworkShare sources, not both"),
    validation = Rule::new("self.protocol != 'Https' || !has(self.url) || self.url.startsWith('https://')")
        .message("url must start with https:// when protocol is Https")
        .field_path(".url"),
    validation = Rule::new("self.protocol != 'Http' || !has(self.url) || self.url.startsWith('http://')")
        .message("url must start with http:// when protocol is Http")
        .field_path(".url"),
)]
pub struct DownloadSource {
    pub protocol: DownloadProtocol,
    /// Download URL for Https and Http.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub url: Option<String>,
    /// Network share path: `\\server\share\file` (Windows) or an absolute path where the share is mounted (Linux).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new(r"self.startsWith('\\\\') || self.startsWith('/')")
        .message(r"must be a UNC path like \\server\share\file or an absolute path where the share is mounted"))]
    pub unc: Option<String>,
}

/// Downloads an installer, verifies its SHA-256, optionally asks a detection script
/// whether the install is needed, then runs the install script.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct InstallSoftware {
    pub source: DownloadSource,
    /// SHA-256 of the installer: 64 hex digits. Checked before anything runs.
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-fA-F]{64}$')").message("sha256 must be exactly 64 hexadecimal digits"))]
    pub sha256: String,
    /// Name to store the download under; defaults to the last segment of the URL or path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new(r"!self.contains('/') && !self.contains('\\') && self != '.' && self != '..'")
        .message("fileName must be a plain file name without / or \\"))]
    pub file_name: Option<String>,
    /// Script run first: exit 0 means install, any other exit code means not needed (the action is Skipped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detection_script_ref: Option<ScriptRef>,
    /// Script that performs the installation; `FLEETPATCH_DOWNLOAD_PATH` holds the installer's path.
    pub install_script_ref: ScriptRef,
    /// Run PowerShell with `-ExecutionPolicy Bypass`.
    #[serde(default)]
    pub bypass_execution_policy: bool,
    /// Values for the scripts' parameters, passed as environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    #[x_kube(validation = parameter_names_are_variables(), validation = parameter_names_are_not_reserved())]
    pub parameters: BTreeMap<String, String>,
}

/// Windows registry value kinds.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum RegistryValueType {
    REG_BINARY,
    REG_DWORD,
    REG_EXPAND_SZ,
    REG_MULTI_SZ,
    REG_QWORD,
    REG_SZ,
}

impl RegistryValueType {
    /// Types whose data must be digits: decimal for REG_DWORD and REG_QWORD, hexadecimal
    /// byte pairs for REG_BINARY.
    pub fn is_numeric(self) -> bool {
        matches!(self, Self::REG_BINARY | Self::REG_DWORD | Self::REG_QWORD)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::REG_BINARY => "REG_BINARY",
            Self::REG_DWORD => "REG_DWORD",
            Self::REG_EXPAND_SZ => "REG_EXPAND_SZ",
            Self::REG_MULTI_SZ => "REG_MULTI_SZ",
            Self::REG_QWORD => "REG_QWORD",
            Self::REG_SZ => "REG_SZ",
        }
    }
}

/// Sets one registry value (Windows only).
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!(self.valueType in ['REG_DWORD', 'REG_QWORD']) || self.valueData.matches('^[0-9]+$')")
        .message("valueData must be a non-negative decimal number for REG_DWORD and REG_QWORD")
        .field_path(".valueData"),
    // Bytes, not a number: a number loses leading zero bytes and says nothing of the length.
    validation = Rule::new("self.valueType != 'REG_BINARY' || self.valueData.matches('^([0-9a-fA-F]{2})*$')")
        .message("valueData must be hexadecimal byte pairs for REG_BINARY, like 0100ff for the bytes 0x01 0x00 0xff")
        .field_path(".valueData"),
    // The ranges, compared as digit strings without leading zeros (CEL has no
    // arbitrary-precision numbers): equal lengths compare like the numbers.
    validation = Rule::new("self.valueType != 'REG_DWORD' || !self.valueData.matches('^[0-9]+$') || size(self.valueData.find('[1-9][0-9]*$')) < 10 || (size(self.valueData.find('[1-9][0-9]*$')) == 10 && self.valueData.find('[1-9][0-9]*$') <= '4294967295')")
        .message("valueData does not fit in a REG_DWORD (at most 4294967295)")
        .field_path(".valueData"),
    validation = Rule::new("self.valueType != 'REG_QWORD' || !self.valueData.matches('^[0-9]+$') || size(self.valueData.find('[1-9][0-9]*$')) < 20 || (size(self.valueData.find('[1-9][0-9]*$')) == 20 && self.valueData.find('[1-9][0-9]*$') <= '18446744073709551615')")
        .message("valueData does not fit in a REG_QWORD (at most 18446744073709551615)")
        .field_path(".valueData"),
)]
pub struct ChangeRegistryKey {
    /// Full key path including the key name, e.g. `HKEY_LOCAL_MACHINE\SOFTWARE\Vendor\App`.
    #[schemars(schema_with = "registry_key_path_schema")]
    pub key_path: String,
    pub value_type: RegistryValueType,
    /// Value name; empty means the key's default value (`(default)` to the registry
    /// provider). Under HKEY_CURRENT_USER the agent, running as SYSTEM, changes SYSTEM's own
    /// hive (HKEY_USERS\S-1-5-18), not a signed-in user's: use HKEY_USERS\<SID> for those.
    #[serde(default)]
    #[schemars(length(max = 16383))]
    pub value_name: String,
    /// Value data. Decimal for REG_DWORD and REG_QWORD; hexadecimal byte pairs for
    /// REG_BINARY (`0100ff` is the three bytes 0x01 0x00 0xff); lines separated by `\n`
    /// for REG_MULTI_SZ.
    #[schemars(length(max = 16384))]
    pub value_data: String,
    /// Create the key when it does not exist; when false a missing key leaves the host unchanged.
    #[serde(default)]
    pub create_if_missing: bool,
}

/// How DisplayVersion is compared.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum VersionMatch {
    #[default]
    Equals,
}

/// Uninstalls an msiexec-installed product found under an Uninstall registry key (Windows only).
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UninstallSoftware {
    /// Uninstall key of the product, e.g. `HKEY_LOCAL_MACHINE\SOFTWARE\Microsoft\Windows\CurrentVersion\Uninstall\{GUID}`.
    #[schemars(schema_with = "registry_key_path_schema")]
    pub uninstall_key: String,
    /// Exact DisplayName value under the key.
    #[schemars(length(min = 1, max = 1024))]
    pub display_name: String,
    /// Version to match exactly, against the value named `Version` under the uninstall
    /// key (as Qualys compares it; a Windows Installer DWORD reads as
    /// `major.minor.build`), or `DisplayVersion` when there is no `Version`. Without it
    /// any installed version is removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub display_version: Option<String>,
    #[serde(default)]
    pub version_match: VersionMatch,
}

/// Reboots the host. Must be the last task of its workflow; the job's one reboot
/// happens there, after patching.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Reboot {
    /// Reboot only when a previous step reported that one is required.
    #[serde(default)]
    pub only_if_required: bool,
}

fleetpatch_kind! {
    /// One pre- or post-patching action.
    #[kube(
        kind = "Task",
        namespaced,
        status = "TaskStatus",
        shortname = "fptask",
        doc = "One pre- or post-patching action and the Scripts it needs.",
        printcolumn(name = "OS", type_ = "string", json_path = ".spec.os"),
        printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
        printcolumn(
            name = "Timeout",
            type_ = "integer",
            json_path = ".spec.timeoutMinutes",
            description = "minutes"
        ),
        printcolumn(
            name = "Ready",
            type_ = "string",
            json_path = ".status.conditions[?(@.type==\"Ready\")].status"
        ),
        printcolumn(
            name = "Age",
            type_ = "date",
            json_path = ".metadata.creationTimestamp"
        )
    )]
    #[x_kube(
        validation = Rule::new("has(self.runScript) == (self.type == 'RunScript')")
            .message("runScript must be set when type is RunScript, and only then").field_path(".runScript"),
        validation = Rule::new("has(self.installSoftware) == (self.type == 'InstallSoftware')")
            .message("installSoftware must be set when type is InstallSoftware, and only then").field_path(".installSoftware"),
        validation = Rule::new("has(self.changeRegistryKey) == (self.type == 'ChangeRegistryKey')")
            .message("changeRegistryKey must be set when type is ChangeRegistryKey, and only then").field_path(".changeRegistryKey"),
        validation = Rule::new("has(self.uninstallSoftware) == (self.type == 'UninstallSoftware')")
            .message("uninstallSoftware must be set when type is UninstallSoftware, and only then").field_path(".uninstallSoftware"),
        validation = Rule::new("!has(self.reboot) || self.type == 'Reboot'")
            .message("reboot may only be set when type is Reboot").field_path(".reboot"),
        validation = Rule::new("self.os == 'Windows' || !(self.type in ['ChangeRegistryKey', 'UninstallSoftware'])")
            .message("ChangeRegistryKey and UninstallSoftware tasks are Windows-only").field_path(".os"),
    )]
    pub struct TaskSpec {
        pub os: OperatingSystem,
        #[serde(rename = "type")]
        pub task_type: TaskType,
        /// What the task is for.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(length(max = 1024))]
        pub description: Option<String>,
        /// Minutes the action may run (1–180); then it is killed and the next action runs.
        #[serde(default = "default_timeout_minutes")]
        #[x_kube(validation = Rule::new("self >= 1 && self <= 180").message("timeoutMinutes must be between 1 and 180"))]
        pub timeout_minutes: u32,
        /// Exit codes that count as success, besides 10 (success, reboot needed).
        #[serde(default = "default_success_exit_codes")]
        #[schemars(length(min = 1, max = 32))]
        #[x_kube(merge_strategy = ListMerge::Set)]
        pub success_exit_codes: Vec<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub run_script: Option<RunScript>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub install_software: Option<InstallSoftware>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub uninstall_software: Option<UninstallSoftware>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub change_registry_key: Option<ChangeRegistryKey>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub reboot: Option<Reboot>,
        /// Resources the action and everything it starts may use together.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub limits: Option<ActionLimits>,
    }
}

/// Resources an action may use, enforced through the action's own cgroup where the
/// agent runs in a delegated one (see the README's executor section for elsewhere).
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ActionLimits {
    /// Memory for the action and everything it starts, in Ki, Mi or Gi (at least 16Mi,
    /// at most 1024Gi): `512Mi`. Past it the kernel kills the action, which fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self.matches('^[1-9][0-9]*(Ki|Mi|Gi)$')").message("maxMemory must be a whole number of Ki, Mi or Gi, like 512Mi"))]
    pub max_memory: Option<String>,
    /// CPU share against the host's other work, 1–10000; 100 is every process's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 10000").message("cpuWeight must be between 1 and 10000"))]
    pub cpu_weight: Option<u32>,
}

/// Smallest and largest `maxMemory`.
pub const MIN_ACTION_MEMORY: u64 = 16 << 20;
pub const MAX_ACTION_MEMORY: u64 = 1024 << 30;

/// Bytes of a `maxMemory` quantity, within [`MIN_ACTION_MEMORY`]..=[`MAX_ACTION_MEMORY`].
pub fn parse_max_memory(quantity: &str) -> Result<u64, String> {
    let (digits, unit) = quantity.split_at(quantity.len().saturating_sub(2));
    let shift = match unit {
        "Ki" => 10,
        "Mi" => 20,
        "Gi" => 30,
        _ => {
            return Err(format!(
                "{quantity:?} is not a whole number of Ki, Mi or Gi"
            ));
        }
    };
    let bytes = digits
        .parse::<u64>()
        .ok()
        .filter(|_| !digits.starts_with(['+', '-', '0']))
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{quantity:?} is not a whole number of Ki, Mi or Gi"))?;
    if !(MIN_ACTION_MEMORY..=MAX_ACTION_MEMORY).contains(&bytes) {
        return Err(format!("{quantity} is outside 16Mi..1024Gi"));
    }
    Ok(bytes)
}

impl TaskSpec {
    /// Every Script this task points at, in the order they run.
    pub fn script_refs(&self) -> Vec<&ScriptRef> {
        let mut refs = Vec::new();
        if let Some(run) = &self.run_script {
            refs.push(&run.script_ref);
        }
        if let Some(install) = &self.install_software {
            refs.extend(install.detection_script_ref.as_ref());
            refs.push(&install.install_script_ref);
        }
        refs
    }
}

/// Observed state of a Task.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TaskStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_limits_are_whole_binary_quantities_in_range() {
        assert_eq!(parse_max_memory("16Mi"), Ok(16 << 20));
        assert_eq!(parse_max_memory("512Mi"), Ok(512 << 20));
        assert_eq!(parse_max_memory("1024Gi"), Ok(1024 << 30));
        assert_eq!(parse_max_memory("65536Ki"), Ok(64 << 20));
        for bad in [
            "",
            "Mi",
            "512",
            "512M",
            "0512Mi",
            "-1Mi",
            "+1Mi",
            "1.5Gi",
            "99999999999999999999Gi",
        ] {
            assert!(
                parse_max_memory(bad).unwrap_err().contains("whole number"),
                "{bad}"
            );
        }
        assert!(parse_max_memory("15Mi").unwrap_err().contains("outside"));
        assert!(parse_max_memory("1025Gi").unwrap_err().contains("outside"));
    }
}
