//! Who is calling. External agents present `Bearer <agent>.<credential>`, checked
//! against watched caches of the credential Secrets and the Agents, so deleting either
//! shuts the host out within seconds and an unknown bearer costs no API call. Node
//! agents present their ServiceAccount token and name their node; the token is checked
//! by a TokenReview behind the [`TokenReviewer`] seam, whose answer is judged by the pure
//! [`check_node_review`] and cached briefly. Every failure looks the same to the caller
//! (one 401, no detail); the reason is logged.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use crate::api::agent::{Agent, AgentMode, agent_name_problem};

use super::Refusal;
use super::credentials;
use super::limits::SourceLimiter;

pub use super::protocol::NODE_HEADER;
/// TokenReview extra key carrying the node a pod-bound token belongs to.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// Longest bearer value looked at; anything longer is refused unread.
const MAX_BEARER: usize = 16 * 1024;

/// The name of an external agent's credential Secret.
pub fn credential_secret_name(agent: &str) -> String {
    format!("fleetpatch-agent-{agent}")
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub agent: String,
    /// The node of a node agent.
    pub node: Option<String>,
}

/// Asks the API server about a token (a TokenReview); a seam so the checks on the
/// answer are pure and tested without a server.
pub trait TokenReviewer: Send + Sync {
    fn review<'a>(
        &'a self,
        token: &'a str,
        audience: &'a str,
    ) -> BoxFuture<'a, Result<TokenReviewStatus, kube::Error>>;
}

/// TokenReviews against the cluster's API server.
pub struct ApiTokenReviewer(pub kube::Client);

impl TokenReviewer for ApiTokenReviewer {
    fn review<'a>(
        &'a self,
        token: &'a str,
        audience: &'a str,
    ) -> BoxFuture<'a, Result<TokenReviewStatus, kube::Error>> {
        Box::pin(async move {
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.to_string()),
                    audiences: Some(vec![audience.to_string()]),
                },
                ..Default::default()
            };
            let reviews: Api<TokenReview> = Api::all(self.0.clone());
            let reviewed = reviews.create(&PostParams::default(), &review).await?;
            Ok(reviewed.status.unwrap_or_default())
        })
    }
}

/// Why a node agent's token was not accepted (for the log; callers see only 401).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeDenied {
    #[error("the token is not authenticated: {0}")]
    NotAuthenticated(String),
    #[error("the token is not for audience {0}")]
    Audience(String),
    #[error("{0} is not the node agent's ServiceAccount")]
    NotNodeAgent(String),
    #[error("the token is not bound to a node")]
    NoNode,
    #[error("the token names more than one node")]
    SeveralNodes,
    #[error("the token is bound to node {0}, not the one claimed")]
    OtherNode(String),
}

/// What a node agent's TokenReview must say: authenticated, for our audience (the
/// server says which audiences it checked), the node agent's ServiceAccount, and bound
/// to exactly the claimed node.
pub fn check_node_review(
    status: &TokenReviewStatus,
    claimed_node: &str,
    audience: &str,
    node_agent_username: &str,
) -> Result<(), NodeDenied> {
    if status.authenticated != Some(true) {
        return Err(NodeDenied::NotAuthenticated(
            status.error.clone().unwrap_or_default(),
        ));
    }
    if !status
        .audiences
        .as_ref()
        .is_some_and(|audiences| audiences.iter().any(|a| a == audience))
    {
        return Err(NodeDenied::Audience(audience.into()));
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.unwrap_or_default();
    if username != node_agent_username {
        return Err(NodeDenied::NotNodeAgent(username));
    }
    let nodes = user
        .extra
        .as_ref()
        .and_then(|extra| extra.get(NODE_NAME_EXTRA))
        .cloned()
        .unwrap_or_default();
    match nodes.as_slice() {
        [] => Err(NodeDenied::NoNode),
        [node] if node == claimed_node => Ok(()),
        [node] => Err(NodeDenied::OtherNode(node.clone())),
        _ => Err(NodeDenied::SeveralNodes),
    }
}

/// Recent TokenReview verdicts, so an agent's every request does not cost a review and
/// a flood of one bad token costs one. Keyed by a hash of token and node.
struct ReviewCache {
    verdicts: HashMap<[u8; 32], (Result<(), NodeDenied>, Instant)>,
    capacity: usize,
}

/// How long a verdict is reused: long enough to spare the API, short enough that a
/// deleted pod's token stops working soon.
const ACCEPTED_FOR: Duration = Duration::from_secs(60);
const REFUSED_FOR: Duration = Duration::from_secs(10);
/// How long past its time an accepted verdict still serves while no review can be made
/// (the budget all sources share is spent): strangers' made-up tokens must not lock a
/// node agent out, and a deleted pod's token stops working within this much more.
const ACCEPTED_WHILE_BUSY: Duration = Duration::from_secs(300);

impl ReviewCache {
    fn key(token: &str, node: &str) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(token.as_bytes());
        hasher.update([0]);
        hasher.update(node.as_bytes());
        hasher.finalize().into()
    }

    /// Whether an accepted verdict for `key` expired at most [`ACCEPTED_WHILE_BUSY`] ago.
    fn recently_accepted(&self, key: &[u8; 32], now: Instant) -> bool {
        self.verdicts
            .get(key)
            .is_some_and(|(verdict, until)| verdict.is_ok() && now < *until + ACCEPTED_WHILE_BUSY)
    }

    fn get(&self, key: &[u8; 32], now: Instant) -> Option<Result<(), NodeDenied>> {
        self.verdicts
            .get(key)
            .filter(|(_, until)| now < *until)
            .map(|(verdict, _)| verdict.clone())
    }

    /// Keeps a verdict. When full, expired verdicts go first, then refusals: strangers'
    /// made-up tokens never push out a node agent's accepted review (a refusal finding
    /// the table full of accepted ones is simply not kept).
    fn put(&mut self, key: [u8; 32], verdict: Result<(), NodeDenied>, now: Instant) {
        if self.verdicts.len() >= self.capacity {
            self.verdicts.retain(|_, (kept, until)| {
                now < *until || (kept.is_ok() && now < *until + ACCEPTED_WHILE_BUSY)
            });
        }
        if self.verdicts.len() >= self.capacity {
            self.verdicts.retain(|_, (kept, _)| kept.is_ok());
        }
        if self.verdicts.len() >= self.capacity {
            if verdict.is_err() {
                return;
            }
            // Full of accepted reviews (more node agents than the table holds): start
            // over rather than grow; the cost is a few repeated reviews.
            self.verdicts.clear();
        }
        let ttl = if verdict.is_ok() {
            ACCEPTED_FOR
        } else {
            REFUSED_FOR
        };
        self.verdicts.insert(key, (verdict, now + ttl));
    }
}

/// Why a node token was not accepted.
enum NodeCheck {
    /// The review said no (or said so recently).
    Denied(String),
    /// No review could be made now (the budgets are spent, or the API failed): the
    /// token may be fine; the caller retries.
    Busy,
}

/// What the authenticator checks node agents against.
#[derive(Clone, Debug)]
pub struct NodePolicy {
    /// Audience of node agents' tokens.
    pub audience: String,
    /// `system:serviceaccount:NAMESPACE:NAME` of the node agent DaemonSet.
    pub username: String,
}

pub struct Authenticator {
    namespace: String,
    credentials: Store<Secret>,
    agents: Store<Agent>,
    reviewer: Box<dyn TokenReviewer>,
    reviews: Mutex<ReviewCache>,
    policy: NodePolicy,
}

/// Whether the caller must already have an Agent (everything but registration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Register,
    Serve,
}

impl Authenticator {
    pub fn new(
        namespace: String,
        credentials: Store<Secret>,
        agents: Store<Agent>,
        reviewer: Box<dyn TokenReviewer>,
        policy: NodePolicy,
    ) -> Self {
        Self {
            namespace,
            credentials,
            agents,
            reviewer,
            reviews: Mutex::new(ReviewCache {
                verdicts: HashMap::new(),
                capacity: 65_536,
            }),
            policy,
        }
    }

    /// Authenticates a request from its headers. `limiter` is charged for every
    /// failure and for every TokenReview the caches cannot spare.
    pub async fn authenticate(
        &self,
        headers: &axum::http::HeaderMap,
        source: IpAddr,
        purpose: Purpose,
        limiter: &SourceLimiter,
    ) -> Result<Identity, Refusal> {
        // Logged only while the source is within its rate: a flood of bad credentials
        // costs one bucket check each, not a log line each.
        let refused = |why: &dyn std::fmt::Display| {
            if limiter.allow(source) {
                tracing::info!(%source, reason = %why, "authentication failed");
                Refusal::Unauthorized
            } else {
                Refusal::Throttled
            }
        };
        let Some(authorization) = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() <= MAX_BEARER)
        else {
            return Err(refused(&"no usable Authorization header"));
        };
        match headers.get(NODE_HEADER) {
            Some(node) => {
                let node = node
                    .to_str()
                    .ok()
                    .filter(|n| agent_name_problem(n).is_none())
                    .ok_or_else(|| refused(&"the node header is not a node name"))?;
                let token = authorization
                    .strip_prefix("Bearer ")
                    .ok_or_else(|| refused(&"not a bearer token"))?;
                // Serving needs the node's Agent: checked first, so tokens claiming made-up
                // nodes cost no TokenReview.
                if purpose == Purpose::Serve && !self.has_agent(node, AgentMode::Node) {
                    return Err(refused(&format!(
                        "node {node} has no Agent; it must register"
                    )));
                }
                self.check_node(token.trim(), node, source, limiter)
                    .await
                    .map_err(|refusal| match refusal {
                        NodeCheck::Denied(why) => refused(&why),
                        // Not the token's fault: try again shortly.
                        NodeCheck::Busy => Refusal::Throttled,
                    })?;
                Ok(Identity {
                    agent: node.to_string(),
                    node: Some(node.to_string()),
                })
            }
            None => {
                let (agent, secret) = credentials::parse_agent_bearer(authorization)
                    .filter(|(agent, _)| agent_name_problem(agent).is_none())
                    .ok_or_else(|| refused(&"malformed credential"))?;
                self.check_credential(agent, secret)
                    .map_err(|why| refused(&why))?;
                Ok(Identity {
                    agent: agent.to_string(),
                    node: None,
                })
            }
        }
    }

    pub(super) fn has_agent(&self, name: &str, mode: AgentMode) -> bool {
        self.agents.get(&ObjectRef::new(name)).is_some_and(|agent| {
            agent.spec.mode == mode && agent.metadata.deletion_timestamp.is_none()
        })
    }

    /// An external agent's credential, against the cached hash and a live Agent.
    pub(super) fn check_credential(&self, agent: &str, secret: &str) -> Result<(), String> {
        let stored = self
            .credentials
            .get(&ObjectRef::new(&credential_secret_name(agent)).within(&self.namespace))
            .ok_or_else(|| format!("agent {agent} has no credential"))?;
        let hash = stored
            .data
            .as_ref()
            .and_then(|d| d.get(credentials::CREDENTIAL_HASH_KEY))
            .map(|ByteString(b)| String::from_utf8_lossy(b).into_owned())
            .ok_or_else(|| format!("the credential of agent {agent} holds no hash"))?;
        if !credentials::constant_time_eq(&credentials::hash(secret), &hash) {
            return Err(format!("wrong credential for agent {agent}"));
        }
        if !self.has_agent(agent, AgentMode::External) {
            return Err(format!("agent {agent} no longer exists"));
        }
        Ok(())
    }

    async fn check_node(
        &self,
        token: &str,
        node: &str,
        source: IpAddr,
        limiter: &SourceLimiter,
    ) -> Result<(), NodeCheck> {
        let key = ReviewCache::key(token, node);
        if let Some(verdict) = self.reviews.lock().get(&key, Instant::now()) {
            return verdict.map_err(|why| NodeCheck::Denied(why.to_string()));
        }
        // A review is an API call: charged to the source, and to the budget all
        // sources share, before it is made.
        if !limiter.allow(source) || !limiter.allow_review() {
            // No review now: a token this node's agent used a moment ago still serves.
            if self.reviews.lock().recently_accepted(&key, Instant::now()) {
                return Ok(());
            }
            return Err(NodeCheck::Busy);
        }
        let status = self
            .reviewer
            .review(token, &self.policy.audience)
            .await
            .map_err(|err| {
                tracing::warn!(error = %err, "TokenReview failed");
                NodeCheck::Busy
            })?;
        let verdict =
            check_node_review(&status, node, &self.policy.audience, &self.policy.username);
        self.reviews
            .lock()
            .put(key, verdict.clone(), Instant::now());
        verdict.map_err(|why| NodeCheck::Denied(why.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;
    use std::collections::BTreeMap;

    const AGENT: &str = "system:serviceaccount:fleetpatch-system:fleetpatch-node-agent";

    fn review(audiences: &[&str], user: &str, nodes: &[&str]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(user.into()),
                extra: Some(BTreeMap::from([(
                    NODE_NAME_EXTRA.to_string(),
                    nodes.iter().map(|n| n.to_string()).collect(),
                )])),
                ..Default::default()
            }),
            error: None,
        }
    }

    #[test]
    fn a_node_review_is_accepted_only_when_every_check_holds() {
        let check = |status: &TokenReviewStatus| check_node_review(status, "node-a", "gw", AGENT);
        assert_eq!(check(&review(&["gw"], AGENT, &["node-a"])), Ok(()));
        assert_eq!(
            check(&TokenReviewStatus {
                authenticated: Some(false),
                error: Some("expired".into()),
                ..Default::default()
            }),
            Err(NodeDenied::NotAuthenticated("expired".into()))
        );
        // A server that authenticated the token for other audiences only.
        assert_eq!(
            check(&review(
                &["https://kubernetes.default.svc"],
                AGENT,
                &["node-a"]
            )),
            Err(NodeDenied::Audience("gw".into()))
        );
        assert_eq!(
            check(&TokenReviewStatus {
                audiences: None,
                ..review(&[], AGENT, &["node-a"])
            }),
            Err(NodeDenied::Audience("gw".into()))
        );
        assert_eq!(
            check(&review(
                &["gw"],
                "system:serviceaccount:x:intruder",
                &["node-a"]
            )),
            Err(NodeDenied::NotNodeAgent(
                "system:serviceaccount:x:intruder".into()
            ))
        );
        assert_eq!(check(&review(&["gw"], AGENT, &[])), Err(NodeDenied::NoNode));
        assert_eq!(
            check(&review(&["gw"], AGENT, &["node-b"])),
            Err(NodeDenied::OtherNode("node-b".into()))
        );
        assert_eq!(
            check(&review(&["gw"], AGENT, &["node-a", "node-b"])),
            Err(NodeDenied::SeveralNodes),
            "the first of several nodes is not taken"
        );
    }

    #[test]
    fn review_verdicts_expire_and_the_cache_stays_bounded() {
        let mut cache = ReviewCache {
            verdicts: HashMap::new(),
            capacity: 4,
        };
        let now = Instant::now();
        let key = ReviewCache::key("t", "n");
        cache.put(key, Ok(()), now);
        assert_eq!(cache.get(&key, now), Some(Ok(())));
        assert_eq!(cache.get(&key, now + ACCEPTED_FOR), None, "expired");
        let bad = ReviewCache::key("t", "other");
        cache.put(bad, Err(NodeDenied::NoNode), now);
        assert_eq!(
            cache.get(&bad, now + REFUSED_FOR),
            None,
            "refusals expire sooner"
        );
        for i in 0..100 {
            cache.put(ReviewCache::key(&i.to_string(), "n"), Ok(()), now);
            assert!(cache.verdicts.len() <= 4);
        }
        assert_ne!(ReviewCache::key("ab", "c"), ReviewCache::key("a", "bc"));
    }
}

#[cfg(test)]
mod review_cache_eviction {
    use super::*;

    /// Strangers naming a real node with made-up tokens can spend the TokenReview
    /// budget all sources share; a node agent whose accepted verdict just expired is
    /// then served on that verdict (for a while) rather than locked out.
    #[tokio::test]
    async fn a_spent_budget_does_not_lock_out_a_token_accepted_a_moment_ago() {
        let (credentials, _) = kube::runtime::reflector::store::<Secret>();
        let (agents, mut writer) = kube::runtime::reflector::store::<Agent>();
        let mut agent: Agent = serde_json::from_value(serde_json::json!({
            "apiVersion": "fleetpatch.io/v1alpha1", "kind": "Agent",
            "metadata": {"name": "node-a", "uid": "u"},
            "spec": {"mode": "Node", "os": "Linux", "nodeName": "node-a"}}))
        .unwrap();
        agent.metadata.resource_version = Some("1".into());
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(agent));
        struct Never;
        impl TokenReviewer for Never {
            fn review<'a>(
                &'a self,
                _token: &'a str,
                _audience: &'a str,
            ) -> futures::future::BoxFuture<'a, Result<TokenReviewStatus, kube::Error>>
            {
                panic!("no review may be made: the budget is spent")
            }
        }
        let auth = Authenticator::new(
            "fleetpatch-system".into(),
            credentials,
            agents,
            Box::new(Never),
            NodePolicy {
                audience: "gw".into(),
                username: "agent".into(),
            },
        );
        // node-a's token was accepted 70 s ago: its verdict ran out 10 s ago.
        let key = ReviewCache::key("node-token", "node-a");
        auth.reviews
            .lock()
            .put(key, Ok(()), Instant::now() - Duration::from_secs(70));
        let limiter = SourceLimiter::new(&super::super::limits::UnauthenticatedLimits::default());
        while limiter.allow_review() {}
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(
            axum::http::header::AUTHORIZATION,
            "Bearer node-token".parse().unwrap(),
        );
        headers.insert(NODE_HEADER, "node-a".parse().unwrap());
        let source: IpAddr = "10.0.0.7".parse().unwrap();
        let served = auth
            .authenticate(&headers, source, Purpose::Serve, &limiter)
            .await;
        assert!(served.is_ok(), "{:?}", served.err());
        // A token never accepted still waits for the budget: 429, not 401.
        headers.insert(
            axum::http::header::AUTHORIZATION,
            "Bearer made-up".parse().unwrap(),
        );
        let refused = auth
            .authenticate(&headers, source, Purpose::Serve, &limiter)
            .await;
        assert!(
            matches!(refused, Err(Refusal::Throttled)),
            "{:?}",
            refused.err()
        );
    }

    /// Attack (the network): refused node-token reviews are cached too, in the same
    /// table as the node agents' accepted ones, and a full table is simply cleared.
    /// Strangers sending made-up node tokens from enough sources (each refusal stays
    /// 10 s; 65 536 of them is 330 IPv4 sources or a few /64s' worth of buckets) empty it
    /// over and over, and every node agent then pays a TokenReview on its next request,
    /// again and again. Refusals must never push out an accepted verdict.
    #[test]
    fn refused_reviews_do_not_evict_the_node_agents_accepted_ones() {
        let mut cache = ReviewCache {
            verdicts: HashMap::new(),
            capacity: 64,
        };
        let now = Instant::now();
        let node = ReviewCache::key("node-a's token", "node-a");
        cache.put(node, Ok(()), now);
        for i in 0..64 {
            cache.put(
                ReviewCache::key(&format!("made-up-{i}"), "node-a"),
                Err(NodeDenied::NotAuthenticated(String::new())),
                now,
            );
        }
        assert_eq!(
            cache.get(&node, now),
            Some(Ok(())),
            "64 refusals from strangers pushed node-a's accepted review out of the cache"
        );
    }
}
