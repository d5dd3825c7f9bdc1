//! `Script`: code in PowerShell, Bash or sh that Tasks run on hosts.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::common::parameter_name_schema;

/// Interpreter a Script is written for.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScriptLanguage {
    PowerShell,
    Bash,
    Sh,
}

impl ScriptLanguage {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PowerShell => "PowerShell",
            Self::Bash => "Bash",
            Self::Sh => "Sh",
        }
    }
}

/// `Internal` scripts are helpers for the controller and the built-in library; they
/// cannot be used by Tasks that appear in a Workflow.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum ScriptCategory {
    #[default]
    Standard,
    Internal,
}

/// A parameter the script reads from its environment.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ScriptParameter {
    /// Environment variable name the value is passed in.
    #[schemars(schema_with = "parameter_name_schema")]
    pub name: String,
    /// Value used when the Task gives none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub default: Option<String>,
    /// A Task using this script must give a value (or the parameter must have a default).
    #[serde(default)]
    pub required: bool,
    /// What the parameter means.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
}

fleetpatch_kind! {
    /// Code that Tasks run on hosts.
    #[kube(
        kind = "Script",
        namespaced,
        status = "ScriptStatus",
        shortname = "fpscript",
        doc = "Code in PowerShell, Bash or sh that Tasks run on hosts.",
        printcolumn(name = "Language", type_ = "string", json_path = ".spec.language"),
        printcolumn(name = "Category", type_ = "string", json_path = ".spec.category"),
        printcolumn(
            name = "Ready",
            type_ = "string",
            json_path = ".status.conditions[?(@.type==\"Ready\")].status"
        ),
        printcolumn(
            name = "SHA256",
            type_ = "string",
            json_path = ".status.sha256",
            priority = 1
        ),
        printcolumn(
            name = "Age",
            type_ = "date",
            json_path = ".metadata.creationTimestamp"
        )
    )]
    #[x_kube(
        validation = Rule::new("!has(self.signature) || self.language == 'PowerShell'")
            .message("signature is only supported for PowerShell scripts")
            .field_path(".signature")
    )]
    pub struct ScriptSpec {
        /// Interpreter: PowerShell (Windows), Bash or Sh (Linux).
        pub language: ScriptLanguage,
        /// The script body, at most 20480 characters and 20480 bytes of UTF-8. Longer scripts
        /// are rejected, never truncated.
        // Characters by maxLength (the API server counts code points there); bytes by
        // `size(bytes(self))`, which counts bytes both on the API server and in kube-cel
        // (whose `size()` of a string would count bytes where the server counts characters).
        #[schemars(length(max = 20480))]
        #[x_kube(
            validation = Rule::new("self.trim() != ''").message("script content must not be empty"),
            validation = Rule::new("size(bytes(self)) <= 20480").message("script content must be at most 20480 bytes of UTF-8 (non-ASCII characters take 2 to 4 bytes each)")
        )]
        pub content: String,
        /// Authenticode signature block for PowerShell hosts whose execution policy requires signed scripts.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(length(max = 16384))]
        pub signature: Option<String>,
        /// `Internal` scripts cannot be used in a Workflow.
        #[serde(default)]
        pub category: ScriptCategory,
        /// What the script does, for people browsing the library.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(length(max = 1024))]
        pub description: Option<String>,
        /// Parameters the script reads from environment variables.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        #[schemars(length(max = 32))]
        #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
        pub parameters: Vec<ScriptParameter>,
    }
}

/// Observed state of a Script.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScriptStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Lower-case hex SHA-256 of `spec.content` as UTF-8; agents check it before running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Syntax problems, at most 20.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub diagnostics: Vec<SyntaxDiagnostic>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// A syntax problem found in the script, with its position.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq)]
pub struct SyntaxDiagnostic {
    /// 1-based line.
    pub line: u32,
    /// 1-based column.
    pub column: u32,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::common::SCRIPT_CONTENT_MAX;
    use kube::CustomResourceExt;

    #[test]
    fn the_crd_limits_a_script_by_characters_and_by_bytes_alike() {
        let crd = serde_json::to_value(Script::crd()).unwrap();
        let content = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["content"];
        assert_eq!(content["maxLength"], SCRIPT_CONTENT_MAX);
        let rules: Vec<&str> = content["x-kubernetes-validations"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|rule| rule["rule"].as_str())
            .collect();
        assert!(
            rules.contains(&format!("size(bytes(self)) <= {SCRIPT_CONTENT_MAX}").as_str()),
            "{rules:?}"
        );
    }
}
