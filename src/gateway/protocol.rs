//! The agent protocol, versioned under `/agent/v1`: what agents send and receive.
//! Scripts travel base64-encoded next to their SHA-256; the agent decodes them and
//! checks the hash before anything runs.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use crate::api::OperatingSystem;
use crate::api::agent::{Platform, UpdateInventory};
use crate::api::patchjob::{PatchJobSpec, PatchJobStatus, ResolvedScript};
use crate::api::resolve::content_sha256;

/// Path prefix of every agent endpoint.
pub const PREFIX: &str = "/agent/v1";

/// `POST /agent/v1/register`: an external host exchanges a bootstrap token for its own
/// credential; a node agent (authenticated by its ServiceAccount token) just announces itself.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RegisterRequest {
    /// Agent name wanted; becomes the Agent resource's name.
    pub name: String,
    pub os: OperatingSystem,
    /// Bootstrap token (external hosts only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_token: Option<String>,
    /// Labels for the Agent resource, used by plan selectors.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RegisterResponse {
    pub agent: String,
    /// Per-agent credential for external hosts, shown once; the gateway keeps only its hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// `POST /agent/v1/heartbeat`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updates: Option<UpdateInventory>,
    /// uid of the job the agent is running, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_job: Option<String>,
}

/// One job handed to an agent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// The frozen spec with every script body base64-encoded.
    pub spec: PatchJobSpec,
    /// Highest progress sequence the gateway has applied (0 for a new job).
    pub acknowledged_sequence: i64,
}

/// `GET /agent/v1/assignments?waitSeconds=N`: the agent's unfinished jobs.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Assignments {
    pub jobs: Vec<Assignment>,
}

/// `POST /agent/v1/jobs/{uid}/progress`: the job's whole status at one sequence number.
/// Reports are idempotent: one at or below the acknowledged sequence changes nothing.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProgressReport {
    pub sequence: i64,
    pub status: PatchJobStatus,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProgressAck {
    pub acknowledged_sequence: i64,
}

/// `GET /agent/v1/jobs/{uid}/reboot`: may a node agent reboot its node now?
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum RebootVerdict {
    /// Not yet: the node is being cordoned and drained, or other nodes of the plan reboot.
    Waiting,
    /// The node is drained; reboot.
    Approved,
    /// Do not reboot (the drain timed out, the job ended); the message says why.
    Denied,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RebootDecision {
    pub verdict: RebootVerdict,
    #[serde(default)]
    pub message: String,
}

/// Error body of every non-2xx answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
}

fn scripts_mut(spec: &mut PatchJobSpec) -> impl Iterator<Item = &mut ResolvedScript> {
    spec.pre_actions
        .iter_mut()
        .chain(spec.post_actions.iter_mut())
        .flat_map(|action| {
            action
                .script
                .iter_mut()
                .chain(action.detection_script.iter_mut())
        })
}

/// The spec as it travels: script bodies base64-encoded.
pub fn encode_spec(spec: &PatchJobSpec) -> PatchJobSpec {
    let mut wire = spec.clone();
    for script in scripts_mut(&mut wire) {
        script.content = STANDARD.encode(script.content.as_bytes());
    }
    wire
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("script {0} is not valid base64")]
    Base64(String),
    #[error("script {0} is not UTF-8")]
    Utf8(String),
    #[error("script {source_name} does not match its SHA-256 (expected {expected}, got {actual})")]
    Hash {
        source_name: String,
        expected: String,
        actual: String,
    },
}

/// The spec as received: script bodies decoded and checked against their SHA-256.
pub fn decode_spec(wire: &PatchJobSpec) -> Result<PatchJobSpec, DecodeError> {
    let mut spec = wire.clone();
    for script in scripts_mut(&mut spec) {
        let name = script.source.to_string();
        let bytes = STANDARD
            .decode(script.content.as_bytes())
            .map_err(|_| DecodeError::Base64(name.clone()))?;
        let content = String::from_utf8(bytes).map_err(|_| DecodeError::Utf8(name.clone()))?;
        let actual = content_sha256(&content);
        if !actual.eq_ignore_ascii_case(&script.sha256) {
            return Err(DecodeError::Hash {
                source_name: name,
                expected: script.sha256.clone(),
                actual,
            });
        }
        script.content = content;
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::library::Library;
    use crate::api::plan::{PatchSelection, RebootPolicy};
    use crate::api::resolve::{JobTarget, resolve_named};
    use crate::api::rules::{Catalog, DEFAULT_LIBRARY_NAMESPACE};

    fn spec() -> PatchJobSpec {
        let mut catalog = Catalog::new(DEFAULT_LIBRARY_NAMESPACE);
        Library::load(DEFAULT_LIBRARY_NAMESPACE).add_to(&mut catalog);
        let target = JobTarget {
            agent: "a".into(),
            plan: "p".into(),
            run: "r".into(),
            patches: PatchSelection::default(),
            reboot: RebootPolicy::IfRequired,
        };
        resolve_named(&catalog, "x", "linux-default", target).unwrap()
    }

    #[test]
    fn scripts_round_trip_base64_and_are_hash_checked() {
        let original = spec();
        let wire = encode_spec(&original);
        let script = wire.post_actions[0].script.as_ref().unwrap();
        assert!(!script.content.contains('\n'), "travels as base64");
        assert_eq!(decode_spec(&wire).unwrap(), original);

        let mut tampered = wire.clone();
        let evil = STANDARD.encode("reboot -f");
        tampered.post_actions[0].script.as_mut().unwrap().content = evil;
        assert!(matches!(
            decode_spec(&tampered),
            Err(DecodeError::Hash { .. })
        ));
    }
}
