//! Bearer tokens the dev server issues and accepts: one admin token written into the
//! kubeconfig, and ServiceAccount tokens (`serviceaccounts/NAME/token`). A token is
//! `fpdev.<claims>.<HMAC-SHA256 of the claims>`, signed with a key kept in the data
//! directory (so tokens survive a restart) or made fresh per run. TokenReview checks
//! exactly these tokens.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const PREFIX: &str = "fpdev";

/// The audience of tokens requested without one, and the one a TokenReview without
/// audiences checks for: what a real API server defaults both to (its service-account
/// issuer, here the usual in-cluster one).
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// Who a token stands for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// TokenReview's `user.extra`: for a token bound to a Pod, the pod's and its node's
    /// name and uid, as a real API server adds them (`authentication.kubernetes.io/...`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub extra: std::collections::BTreeMap<String, Vec<String>>,
    /// Unix seconds; absent = never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    /// The token's id, which TokenReview reports as `user.extra`'s credential id.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub jti: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read or write the signing key {path}: {source}")]
    Key {
        path: String,
        source: std::io::Error,
    },
}

/// Makes a secret file readable by its owner only.
pub fn owner_only(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

pub struct Auth {
    key: Vec<u8>,
}

impl Auth {
    /// Loads the signing key from `data_dir`, creating it there if missing; without a
    /// data directory the key lives only as long as the process.
    pub fn open(data_dir: Option<&Path>) -> Result<Self, AuthError> {
        let fresh = || {
            let mut key = Vec::with_capacity(32);
            key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
            key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
            key
        };
        let Some(dir) = data_dir else {
            return Ok(Self { key: fresh() });
        };
        let path = dir.join("signing.key");
        let err = |source| AuthError::Key {
            path: path.display().to_string(),
            source,
        };
        let key = match std::fs::read(&path) {
            Ok(key) if key.len() >= 32 => key,
            _ => {
                let key = fresh();
                std::fs::create_dir_all(dir).map_err(err)?;
                std::fs::write(&path, &key).map_err(err)?;
                owner_only(&path).map_err(err)?;
                key
            }
        };
        Ok(Self { key })
    }

    pub fn issue(&self, claims: &Claims) -> String {
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(body.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{PREFIX}.{body}.{signature}")
    }

    /// The claims of a token this server issued and that has not expired.
    pub fn verify(&self, token: &str) -> Option<Claims> {
        let mut parts = token.split('.');
        let (prefix, body, signature) = (parts.next()?, parts.next()?, parts.next()?);
        if prefix != PREFIX || parts.next().is_some() {
            return None;
        }
        let mut mac = HmacSha256::new_from_slice(&self.key).ok()?;
        mac.update(body.as_bytes());
        mac.verify_slice(&URL_SAFE_NO_PAD.decode(signature).ok()?)
            .ok()?;
        let claims: Claims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).ok()?).ok()?;
        if let Some(exp) = claims.exp
            && exp < chrono::Utc::now().timestamp()
        {
            return None;
        }
        Some(claims)
    }

    /// The token of the kubeconfig's user: stable for a given signing key.
    pub fn admin_token(&self) -> String {
        self.issue(&Claims {
            username: "fleetpatch-dev-admin".into(),
            uid: "fleetpatch-dev-admin".into(),
            groups: vec!["system:masters".into(), "system:authenticated".into()],
            audiences: Vec::new(),
            extra: Default::default(),
            exp: None,
            jti: String::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_verify_and_forgeries_do_not() {
        let auth = Auth::open(None).unwrap();
        let token = auth.admin_token();
        assert_eq!(
            auth.verify(&token).unwrap().username,
            "fleetpatch-dev-admin"
        );
        let other = Auth::open(None).unwrap();
        assert!(other.verify(&token).is_none());
        assert!(auth.verify("fpdev.abc.def").is_none());
        let expired = auth.issue(&Claims {
            username: "u".into(),
            uid: "u".into(),
            groups: vec![],
            audiences: vec![],
            extra: Default::default(),
            exp: Some(1),
            jti: String::new(),
        });
        assert!(auth.verify(&expired).is_none());
    }

    #[test]
    fn the_key_survives_in_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let token = Auth::open(Some(dir.path())).unwrap().admin_token();
        assert!(
            Auth::open(Some(dir.path()))
                .unwrap()
                .verify(&token)
                .is_some()
        );
    }
}
