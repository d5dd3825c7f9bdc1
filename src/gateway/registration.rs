//! Registration. An external host trades a bootstrap token for an Agent and its own
//! credential: everything it sends is checked against every limit before a token is
//! looked at, an existing Agent is never replaced (409), and a single-use token is
//! spent only once the Agent and the credential exist — if spending it loses a race,
//! both are removed again. A node agent, already authenticated by its ServiceAccount
//! token, announces itself; a node's name belongs to the node, so an external Agent
//! squatting on it is removed.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Node, Secret};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::reflector::ObjectRef;
use serde_json::json;

use crate::api::agent::{Agent, AgentMode, AgentSpec, AllowedPlans, agent_name_problem};
use crate::api_errors;

use super::auth::{Identity, credential_secret_name};
use super::credentials::{
    self, AGENT_LABEL, BootstrapError, BootstrapToken, CREDENTIAL_HASH_KEY, CREDENTIAL_SECRET_TYPE,
    REGISTRATIONS_ANNOTATION, USED_BY_ANNOTATION,
};
use super::protocol::{RegisterRequest, RegisterResponse};
use super::{Gateway, Refusal};
use crate::field_manager;

/// Longest bootstrap token looked at.
const MAX_TOKEN: usize = 4096;
/// Most labels a host may ask for.
const MAX_LABELS: usize = 32;
/// How long a registration waits for this replica's caches to show what it wrote.
const SETTLE_BOUND: std::time::Duration = std::time::Duration::from_secs(5);
/// Tries at counting a registration against a multi-use token while others race it.
const COUNT_ATTEMPTS: usize = 8;
/// Label prefixes Kubernetes reserves (the gateway sets `kubernetes.io/os` itself).
const RESERVED_PREFIXES: [&str; 2] = ["kubernetes.io/", "k8s.io/"];

/// What is wrong with a registration before any token is looked at: the name, the
/// labels and the platform, against every limit the objects made from them have.
pub fn registration_problem(request: &RegisterRequest) -> Option<String> {
    if let Some(why) = agent_name_problem(&request.name) {
        return Some(why);
    }
    if request.labels.len() > MAX_LABELS {
        return Some(format!("at most {MAX_LABELS} labels"));
    }
    for (key, value) in &request.labels {
        if let Some(why) = credentials::label_problem(key, value) {
            return Some(why);
        }
        if RESERVED_PREFIXES
            .iter()
            .any(|prefix| key.starts_with(prefix) || key.contains(&format!(".{prefix}")))
        {
            return Some(format!("label {key} is reserved"));
        }
    }
    if let Some(platform) = &request.platform
        && let Some(why) = super::protocol::platform_problem(platform)
    {
        return Some(why);
    }
    None
}

/// Whether `secret` is `agent`'s credential: of the credential type, labelled for it.
fn is_credential_of(secret: &Secret, agent: &str) -> bool {
    secret.type_.as_deref() == Some(CREDENTIAL_SECRET_TYPE)
        && secret
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(AGENT_LABEL))
            .is_some_and(|labelled| labelled == agent)
}

impl Gateway {
    /// An external host's registration: a bootstrap token for an Agent and a credential.
    pub(super) async fn register_external(
        &self,
        request: &RegisterRequest,
        source: std::net::IpAddr,
    ) -> Result<RegisterResponse, Refusal> {
        if let Some(why) = registration_problem(request) {
            return Err(Refusal::Invalid(why));
        }
        // The source was charged before its body was read (see the handler).
        let _slot = self.limiter.registration().ok_or(Refusal::Busy)?;
        let name = request.name.as_str();
        let token = self.bootstrap_token(request.bootstrap_token.as_deref(), source)?;
        if self.caches.agents.get(&ObjectRef::new(name)).is_some() {
            return Err(Refusal::Conflict(format!(
                "agent {name} is already registered; an admin must delete the Agent before a host can register under its name again"
            )));
        }
        if self.is_node(name).await? {
            return Err(Refusal::Conflict(format!(
                "{name} is the name of a cluster node; choose another name"
            )));
        }
        let mut labels = request.labels.clone();
        labels.extend(token.labels.clone());
        self.create_agent(request, labels, token.allowed_plans.clone())
            .await?;
        let credential = credentials::generate_secret();
        if let Err(refusal) = self.store_credential(name, &credential).await {
            self.forget_agent(name).await;
            return Err(refusal);
        }
        let spent = if token.single_use {
            self.spend(&token, name).await
        } else {
            self.count_registration(&token, name).await
        };
        if let Err(refusal) = spent {
            self.forget_agent(name).await;
            return Err(refusal);
        }
        tracing::info!(agent = %name, token = %token.secret_name, %source, "external agent registered");
        self.settle(name, || {
            self.auth.check_credential(name, &credential).is_ok()
        })
        .await;
        Ok(RegisterResponse {
            agent: name.to_string(),
            credential: Some(credential),
        })
    }

    /// A node agent's announcement, after its token was checked.
    pub(super) async fn register_node(
        &self,
        identity: &Identity,
        request: &RegisterRequest,
    ) -> Result<RegisterResponse, Refusal> {
        let node = identity.node.as_deref().unwrap_or_default();
        let request = RegisterRequest {
            name: node.to_string(),
            ..request.clone()
        };
        if let Some(why) = registration_problem(&request) {
            return Err(Refusal::Invalid(why));
        }
        if let Some(squatter) = self.caches.agents.get(&ObjectRef::new(node))
            && squatter.spec.mode == AgentMode::External
        {
            tracing::warn!(agent = %node, "an external host had registered under this node's name; it is removed");
            self.forget_agent(node).await;
        }
        let agents: Api<Agent> = Api::all(self.client.clone());
        let mut labels = request.labels.clone();
        labels.insert(
            "kubernetes.io/os".into(),
            request.os.as_str().to_ascii_lowercase(),
        );
        let current = self
            .caches
            .agents
            .get(&ObjectRef::new(node))
            .filter(|agent| agent.spec.mode == AgentMode::Node);
        // A node agent announces itself at every start: when its Agent already says
        // all of it, that costs no write.
        if let Some(agent) = &current
            && agent.spec.os == request.os
            && agent.spec.node_name.as_deref() == Some(node)
            && labels
                .iter()
                .all(|(key, value)| agent.labels().get(key) == Some(value))
        {
            return Ok(RegisterResponse {
                agent: node.to_string(),
                credential: None,
            });
        }
        if !self.agent_writes.allow(node) {
            return Err(Refusal::Throttled);
        }
        let spec = AgentSpec {
            mode: AgentMode::Node,
            os: request.os,
            node_name: Some(node.to_string()),
            paused: false,
            // The chart's setting for a new node agent; what an admin has set since
            // stays (applied as it is, so the forced apply changes nothing there).
            allowed_plans: current.as_ref().map_or_else(
                || self.config.node_agent_plans.clone(),
                |agent| agent.spec.allowed_plans.clone(),
            ),
        };
        let mut body = json!({
            "apiVersion": "fleetpatch.io/v1alpha1",
            "kind": "Agent",
            "metadata": {"name": node, "labels": labels},
            "spec": spec,
        });
        // `paused` belongs to people: the gateway does not own it.
        if let Some(spec) = body["spec"].as_object_mut() {
            spec.remove("paused");
        }
        agents
            .patch(
                node,
                &PatchParams::apply(field_manager::GATEWAY).force(),
                &Patch::Apply(&body),
            )
            .await
            .map_err(|err| Refusal::internal("applying a node Agent", err))?;
        self.settle(node, || self.auth.has_agent(node, AgentMode::Node))
            .await;
        Ok(RegisterResponse {
            agent: node.to_string(),
            credential: None,
        })
    }

    /// The cached bootstrap token the host presented, if it is valid now. Every reason
    /// for refusing is logged and looks the same to the caller.
    fn bootstrap_token(
        &self,
        presented: Option<&str>,
        source: std::net::IpAddr,
    ) -> Result<BootstrapToken, Refusal> {
        let refuse = |why: &str| {
            tracing::info!(%source, reason = why, "registration refused");
            Refusal::Unauthorized
        };
        let presented = presented
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN)
            .ok_or_else(|| refuse("no usable bootstrap token"))?;
        let now = k8s_openapi::jiff::Timestamp::now();
        for secret in self.caches.tokens.state() {
            let token = match BootstrapToken::from_secret(&secret) {
                Ok(token) => token,
                Err(err) => {
                    tracing::debug!(error = %err, "skipping a bootstrap-token Secret");
                    continue;
                }
            };
            match token.check(presented, now) {
                Ok(()) => return Ok(token),
                Err(BootstrapError::Unknown) => {}
                Err(err) => return Err(refuse(&err.to_string())),
            }
        }
        Err(refuse("no bootstrap token matches"))
    }

    /// Waits, bounded, until this replica's caches hold what a registration wrote —
    /// until `accepted` (the check the host's next request meets) holds — so that
    /// request is not refused for a watch that has not caught up. Past the bound the
    /// answer goes out anyway: the objects exist, and an agent refused once retries.
    async fn settle(&self, agent: &str, accepted: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + SETTLE_BOUND;
        while !accepted() {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(%agent, "the gateway's caches did not show a registration within {SETTLE_BOUND:?}; answering anyway");
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    async fn is_node(&self, name: &str) -> Result<bool, Refusal> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let found = nodes
            .list_metadata(&ListParams::default().fields(&format!("metadata.name={name}")))
            .await
            .map_err(|err| Refusal::internal("looking up nodes", err))?;
        Ok(!found.items.is_empty())
    }

    async fn create_agent(
        &self,
        request: &RegisterRequest,
        mut labels: BTreeMap<String, String>,
        allowed_plans: AllowedPlans,
    ) -> Result<(), Refusal> {
        labels.insert(
            "kubernetes.io/os".into(),
            request.os.as_str().to_ascii_lowercase(),
        );
        let agent = Agent {
            metadata: ObjectMeta {
                name: Some(request.name.clone()),
                labels: Some(labels),
                ..Default::default()
            },
            spec: AgentSpec {
                mode: AgentMode::External,
                os: request.os,
                node_name: None,
                paused: false,
                allowed_plans,
            },
            status: None,
        };
        let agents: Api<Agent> = Api::all(self.client.clone());
        let params = PostParams {
            field_manager: Some(field_manager::GATEWAY.into()),
            ..Default::default()
        };
        match agents.create(&params, &agent).await {
            Ok(_) => Ok(()),
            Err(err) if api_errors::is_conflict(&err) => Err(Refusal::Conflict(format!(
                "agent {} is already registered",
                request.name
            ))),
            Err(err) => Err(Refusal::internal("creating an Agent", err)),
        }
    }

    async fn store_credential(&self, agent: &str, credential: &str) -> Result<(), Refusal> {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(credential_secret_name(agent)),
                labels: Some(BTreeMap::from([(
                    AGENT_LABEL.to_string(),
                    agent.to_string(),
                )])),
                ..Default::default()
            },
            type_: Some(CREDENTIAL_SECRET_TYPE.into()),
            data: Some(BTreeMap::from([(
                CREDENTIAL_HASH_KEY.to_string(),
                ByteString(credentials::hash(credential).into_bytes()),
            )])),
            ..Default::default()
        };
        // Whatever an earlier, failed registration of this (now free) name left is
        // overwritten: the Agent just created makes the name ours.
        self.secrets()
            .patch(
                &credential_secret_name(agent),
                &PatchParams::apply(field_manager::GATEWAY).force(),
                &Patch::Apply(&secret),
            )
            .await
            .map(|_| ())
            .map_err(|err| match api_errors::status_code(&err) {
                // A Secret of another type holds the name (a release named
                // `fleetpatch-agent` has `fleetpatch-agent-gateway-tls`, say): its type
                // cannot change, and it is not ours to replace.
                Some(422) => Refusal::Conflict(format!(
                    "{agent} cannot be registered: Secret {} is not an agent credential; choose another name",
                    credential_secret_name(agent)
                )),
                _ => Refusal::internal("storing a credential", err),
            })
    }

    /// Marks a single-use token used by `agent`, if nobody else did since it was read.
    async fn spend(&self, token: &BootstrapToken, agent: &str) -> Result<(), Refusal> {
        let patch = json!({"metadata": {
            "resourceVersion": token.resource_version,
            "annotations": {USED_BY_ANNOTATION: agent},
        }});
        match self
            .secrets()
            .patch(
                &token.secret_name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(err) if api_errors::is_conflict(&err) || api_errors::is_not_found(&err) => {
                tracing::info!(token = %token.secret_name, %agent, "a single-use bootstrap token was used by another host first");
                Err(Refusal::Unauthorized)
            }
            Err(err) => Err(Refusal::internal("marking a bootstrap token used", err)),
        }
    }

    /// Counts a registration against a multi-use token, over the version read (read
    /// again when another registration counted first), refused once the token has
    /// registered its `max-registrations` hosts.
    async fn count_registration(&self, token: &BootstrapToken, agent: &str) -> Result<(), Refusal> {
        let mut token = token.clone();
        for _ in 0..COUNT_ATTEMPTS {
            if token.registrations >= token.max_registrations {
                tracing::warn!(token = %token.secret_name, max = token.max_registrations, %agent, "a bootstrap token has registered all the hosts it may");
                return Err(Refusal::Unauthorized);
            }
            let patch = json!({"metadata": {
                "resourceVersion": token.resource_version,
                "annotations": {REGISTRATIONS_ANNOTATION: (token.registrations + 1).to_string()},
            }});
            let counted = self
                .secrets()
                .patch(
                    &token.secret_name,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await;
            match counted {
                Ok(_) => return Ok(()),
                Err(err) if api_errors::is_conflict(&err) => {
                    let fresh = self
                        .secrets()
                        .get_opt(&token.secret_name)
                        .await
                        .map_err(|err| Refusal::internal("reading a bootstrap token", err))?
                        .ok_or(Refusal::Unauthorized)?;
                    token = BootstrapToken::from_secret(&fresh).map_err(|err| {
                        tracing::info!(error = %err, "a bootstrap token changed under a registration");
                        Refusal::Unauthorized
                    })?;
                }
                Err(err) if api_errors::is_not_found(&err) => return Err(Refusal::Unauthorized),
                Err(err) => {
                    return Err(Refusal::internal(
                        "counting a bootstrap token's registration",
                        err,
                    ));
                }
            }
        }
        // Registrations with this token keep racing: the host retries later.
        Err(Refusal::Busy)
    }

    /// Removes an Agent and its credential (a registration undone, or a squatter). The
    /// credential Secret is deleted only if it is one (its type and agent label), and
    /// only the very object read: a Secret of the same name that is not a credential
    /// is never ours to delete.
    async fn forget_agent(&self, agent: &str) {
        let agents: Api<Agent> = Api::all(self.client.clone());
        let name = credential_secret_name(agent);
        let secret = async {
            let Some(secret) = self.secrets().get_opt(&name).await? else {
                return Ok(());
            };
            if !is_credential_of(&secret, agent) {
                tracing::warn!(%agent, secret = %name, "not removing a Secret that is not this agent's credential");
                return Ok(());
            }
            let params = DeleteParams {
                preconditions: Some(kube::api::Preconditions {
                    uid: secret.metadata.uid.clone(),
                    resource_version: None,
                }),
                ..DeleteParams::background()
            };
            self.secrets().delete(&name, &params).await.map(|_| ())
        };
        for result in [
            agents
                .delete(agent, &DeleteParams::background())
                .await
                .map(|_| ()),
            secret.await,
        ] {
            match result {
                Ok(()) | Err(kube::Error::Api(_)) => {}
                Err(err) => {
                    tracing::warn!(%agent, error = %err, "cannot remove an Agent or its credential")
                }
            }
        }
    }

    pub(super) fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::OperatingSystem;

    fn request(name: &str) -> RegisterRequest {
        RegisterRequest {
            name: name.into(),
            os: OperatingSystem::Linux,
            bootstrap_token: Some("t".into()),
            labels: BTreeMap::from([("fleetpatch.example/group".to_string(), "web".to_string())]),
            platform: None,
        }
    }

    #[test]
    fn registrations_are_checked_against_every_limit_first() {
        assert_eq!(registration_problem(&request("web-1")), None);
        assert_eq!(registration_problem(&request(&"a".repeat(63))), None);
        // Fits an object name (253), not a label value (63).
        assert!(
            registration_problem(&request(&"a".repeat(64)))
                .unwrap()
                .contains("at most 63")
        );
        assert!(registration_problem(&request("Web_1")).is_some());
        assert!(registration_problem(&request("")).is_some());
        let mut group = request("web-1");
        group
            .labels
            .insert("fleetpatch.io/group".into(), "db".into());
        assert_eq!(
            registration_problem(&group),
            None,
            "the documented way to group hosts"
        );
        let mut role = request("web-1");
        role.labels
            .insert("node-role.kubernetes.io/control-plane".into(), "".into());
        assert!(registration_problem(&role).unwrap().contains("reserved"));
        let mut os = request("web-1");
        os.labels
            .insert("kubernetes.io/os".into(), "windows".into());
        assert!(registration_problem(&os).unwrap().contains("reserved"));
        let mut bad_value = request("web-1");
        bad_value.labels.insert("group".into(), "not ok!".into());
        assert!(registration_problem(&bad_value).is_some());
        let mut many = request("web-1");
        for i in 0..40 {
            many.labels.insert(format!("k{i}"), "v".into());
        }
        assert!(registration_problem(&many).unwrap().contains("at most 32"));
    }
}
