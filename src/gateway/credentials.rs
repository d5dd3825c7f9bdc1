//! Agent credentials: bootstrap tokens that external hosts exchange once for a
//! per-agent credential, which the gateway stores only as a SHA-256 hash.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::api::agent::AllowedPlans;

/// Secret type of bootstrap tokens.
pub const BOOTSTRAP_SECRET_TYPE: &str = "fleetpatch.io/bootstrap-token";
/// Secret type of stored agent credentials.
pub const CREDENTIAL_SECRET_TYPE: &str = "fleetpatch.io/agent-credential";
/// Annotation on a single-use bootstrap token once it was used: the agent it admitted.
/// The Secret stays (Helm would otherwise bring a deleted one back on upgrade).
pub const USED_BY_ANNOTATION: &str = "fleetpatch.io/used-by";
/// How many hosts registered with a multi-use bootstrap token (the gateway counts).
pub const REGISTRATIONS_ANNOTATION: &str = "fleetpatch.io/registrations";
/// Hosts a multi-use token registers at most unless its `max-registrations` says.
pub const DEFAULT_MAX_REGISTRATIONS: u64 = 1000;
/// Label on credential Secrets naming their Agent.
pub const AGENT_LABEL: &str = "fleetpatch.io/agent";
/// Key of a credential Secret holding the credential's SHA-256 (hex).
pub const CREDENTIAL_HASH_KEY: &str = "credential-sha256";
/// Most labels a bootstrap token may pin.
const MAX_TOKEN_LABELS: usize = 32;

/// A fresh random secret: 32 bytes, hex.
pub fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Compares in time independent of where the strings differ.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// `Authorization: Bearer <agent>.<secret>` of an external agent.
pub fn parse_agent_bearer(value: &str) -> Option<(&str, &str)> {
    let token = value.strip_prefix("Bearer ")?.trim();
    let (agent, secret) = token.rsplit_once('.')?;
    (!agent.is_empty() && !secret.is_empty()).then_some((agent, secret))
}

/// How a bootstrap token may be used.
#[derive(Clone, Debug, PartialEq)]
pub struct BootstrapToken {
    pub secret_name: String,
    pub token_hash: String,
    pub expires: Option<Timestamp>,
    pub single_use: bool,
    /// A single-use token's agent, once used.
    pub used_by: Option<String>,
    /// Hosts registered with a multi-use token so far, and how many it may register
    /// (`max-registrations`, default [`DEFAULT_MAX_REGISTRATIONS`]): a leaked token
    /// without an expiration is not an open door for ever.
    pub registrations: u64,
    pub max_registrations: u64,
    /// Which plans may target the hosts that register with it (`plan-namespaces`:
    /// empty for the controller's namespace, `*` for all, else namespace names).
    pub allowed_plans: AllowedPlans,
    /// Labels every host registering with it gets, over whatever the host asks for
    /// (`labels`: `key=value,key=value`), so a token can fix a host's group.
    pub labels: BTreeMap<String, String>,
    /// resourceVersion of the Secret read, for marking it used without a race.
    pub resource_version: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BootstrapError {
    #[error("Secret {0} is not a bootstrap token: it needs data.token")]
    Malformed(String),
    #[error("Secret {0}: {1}")]
    Invalid(String, String),
    #[error("bootstrap token {0} expired")]
    Expired(String),
    #[error("bootstrap token {0} was already used")]
    Used(String),
    #[error("bootstrap token {0} has registered its {1} hosts (max-registrations)")]
    Exhausted(String, u64),
    #[error("bootstrap token is not valid")]
    Unknown,
}

fn data(secret: &Secret, key: &str) -> Option<String> {
    let from_data = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|ByteString(bytes)| String::from_utf8_lossy(bytes).into_owned());
    from_data.or_else(|| {
        secret
            .string_data
            .as_ref()
            .and_then(|d| d.get(key))
            .cloned()
    })
}

impl BootstrapToken {
    /// Reads a bootstrap-token Secret: `token`, optional `expiration` (RFC 3339),
    /// `usage` (`single`, the default, or `multi`) and, for `multi`,
    /// `max-registrations`.
    pub fn from_secret(secret: &Secret) -> Result<Self, BootstrapError> {
        let name = secret.metadata.name.clone().unwrap_or_default();
        let token = data(secret, "token")
            .filter(|t| !t.is_empty())
            .ok_or_else(|| BootstrapError::Malformed(name.clone()))?;
        let expires = data(secret, "expiration").and_then(|e| e.trim().parse::<Timestamp>().ok());
        let single_use = data(secret, "usage").is_none_or(|u| u.trim() != "multi");
        let allowed_plans =
            AllowedPlans::parse_names(&data(secret, "plan-namespaces").unwrap_or_default())
                .map_err(|why| {
                    BootstrapError::Invalid(name.clone(), format!("plan-namespaces: {why}"))
                })?;
        let labels = parse_labels(&data(secret, "labels").unwrap_or_default())
            .map_err(|why| BootstrapError::Invalid(name.clone(), format!("labels: {why}")))?;
        let max_registrations = match data(secret, "max-registrations") {
            None => DEFAULT_MAX_REGISTRATIONS,
            Some(text) => text.trim().parse::<u64>().map_err(|_| {
                BootstrapError::Invalid(
                    name.clone(),
                    format!("max-registrations: {text:?} is not a whole number"),
                )
            })?,
        };
        let annotation = |key: &str| {
            secret
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(key))
                .cloned()
        };
        // A count that does not parse (edited by hand) counts as exhausted, not as none.
        let registrations = annotation(REGISTRATIONS_ANNOTATION)
            .map(|count| count.trim().parse::<u64>().unwrap_or(u64::MAX))
            .unwrap_or(0);
        Ok(Self {
            secret_name: name,
            token_hash: hash(&token),
            expires,
            single_use,
            used_by: annotation(USED_BY_ANNOTATION),
            registrations,
            max_registrations,
            allowed_plans,
            labels,
            resource_version: secret.metadata.resource_version.clone(),
        })
    }

    /// Whether `presented` is this token and still valid at `now`.
    pub fn check(&self, presented: &str, now: Timestamp) -> Result<(), BootstrapError> {
        if !constant_time_eq(&hash(presented), &self.token_hash) {
            return Err(BootstrapError::Unknown);
        }
        if self.expires.is_some_and(|expires| now >= expires) {
            return Err(BootstrapError::Expired(self.secret_name.clone()));
        }
        if self.single_use && self.used_by.is_some() {
            return Err(BootstrapError::Used(self.secret_name.clone()));
        }
        if !self.single_use && self.registrations >= self.max_registrations {
            return Err(BootstrapError::Exhausted(
                self.secret_name.clone(),
                self.max_registrations,
            ));
        }
        Ok(())
    }
}

/// `key=value,key=value` as labels, each a valid Kubernetes label.
pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not key=value"))?;
        if let Some(why) = label_problem(key, value) {
            return Err(why);
        }
        labels.insert(key.to_string(), value.to_string());
    }
    if labels.len() > MAX_TOKEN_LABELS {
        return Err(format!("at most {MAX_TOKEN_LABELS} labels"));
    }
    Ok(labels)
}

/// What is wrong with a label, if anything: a qualified name as key (optional DNS
/// subdomain prefix, a name part of at most 63 characters) and a value of at most 63.
pub fn label_problem(key: &str, value: &str) -> Option<String> {
    let name_ok = |name: &str| {
        !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if key.len() > 317
        || !name_ok(name)
        || prefix.is_some_and(|p| !crate::manifests::is_dns_subdomain(p))
    {
        return Some(format!(
            "label key {:?} is not a valid label name",
            truncate(key)
        ));
    }
    if !value.is_empty() && !name_ok(value) {
        return Some(format!(
            "label value {:?} of {key} is not valid",
            truncate(value)
        ));
    }
    None
}

fn truncate(text: &str) -> String {
    text.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn secret(entries: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: kube::api::ObjectMeta {
                name: Some("join".into()),
                ..Default::default()
            },
            data: Some(
                entries
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn tokens_check_value_expiry_and_usage() {
        let now: Timestamp = "2026-11-22T12:00:00Z".parse().unwrap();
        let token = BootstrapToken::from_secret(&secret(&[
            ("token", "s3cret"),
            ("expiration", "2026-11-23T00:00:00Z"),
        ]))
        .unwrap();
        assert!(token.single_use);
        assert_eq!(token.check("s3cret", now), Ok(()));
        assert_eq!(token.check("guess", now), Err(BootstrapError::Unknown));
        let later: Timestamp = "2026-11-24T00:00:00Z".parse().unwrap();
        assert_eq!(
            token.check("s3cret", later),
            Err(BootstrapError::Expired("join".into()))
        );
        let multi =
            BootstrapToken::from_secret(&secret(&[("token", "x"), ("usage", "multi")])).unwrap();
        assert!(!multi.single_use);
        assert!(BootstrapToken::from_secret(&secret(&[])).is_err());
    }

    #[test]
    fn a_multi_use_token_registers_at_most_its_max_registrations() {
        let now: Timestamp = "2026-11-22T12:00:00Z".parse().unwrap();
        let mut counted = secret(&[
            ("token", "x"),
            ("usage", "multi"),
            ("max-registrations", "2"),
        ]);
        let annotate = |secret: &mut Secret, count: &str| {
            secret.metadata.annotations =
                Some([(REGISTRATIONS_ANNOTATION.to_string(), count.to_string())].into());
        };
        annotate(&mut counted, "1");
        assert_eq!(
            BootstrapToken::from_secret(&counted)
                .unwrap()
                .check("x", now),
            Ok(())
        );
        annotate(&mut counted, "2");
        assert_eq!(
            BootstrapToken::from_secret(&counted)
                .unwrap()
                .check("x", now),
            Err(BootstrapError::Exhausted("join".into(), 2))
        );
        annotate(&mut counted, "lots");
        assert!(
            BootstrapToken::from_secret(&counted)
                .unwrap()
                .check("x", now)
                .is_err(),
            "a count edited into nonsense is no count at all"
        );
        let unbounded =
            BootstrapToken::from_secret(&secret(&[("token", "x"), ("usage", "multi")])).unwrap();
        assert_eq!(unbounded.max_registrations, DEFAULT_MAX_REGISTRATIONS);
        assert!(
            BootstrapToken::from_secret(&secret(&[
                ("token", "x"),
                ("usage", "multi"),
                ("max-registrations", "-1")
            ]))
            .is_err()
        );
    }

    #[test]
    fn credentials_are_random_and_parsed_from_the_bearer_header() {
        assert_ne!(generate_secret(), generate_secret());
        assert_eq!(generate_secret().len(), 64);
        assert_eq!(
            parse_agent_bearer("Bearer web-1.abc"),
            Some(("web-1", "abc"))
        );
        assert_eq!(
            parse_agent_bearer("Bearer host.example.com.abc"),
            Some(("host.example.com", "abc"))
        );
        assert_eq!(parse_agent_bearer("Basic x"), None);
        assert!(constant_time_eq(&hash("a"), &hash("a")));
        assert!(!constant_time_eq(&hash("a"), &hash("b")));
    }
}
