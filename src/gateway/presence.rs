//! Which replica serves which agent, and whether the agent is Ready. Every replica's
//! gateway takes heartbeats and keeps them in memory; it writes an Agent's status only
//! when something a person cares about changes (Ready, version, platform, current job,
//! the replica serving it), and marks Ready=False only for agents it served itself, so
//! an agent that moved to another replica is not flipped back. Each replica renews a
//! Lease of its own; the leader's Agent reconciler uses them to notice agents whose
//! replica is gone and who did not come back elsewhere.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::api::agent::{Agent, AgentStatus};
use crate::api::conditions;
use crate::api_errors;

use super::{Gateway, HeartbeatRecord};
use crate::field_manager;

/// Prefix of the replicas' presence Leases.
pub const PRESENCE_LEASE_PREFIX: &str = "fleetpatch-gateway-";
/// How long a replica's presence Lease lasts without renewal.
pub const PRESENCE_LEASE_SECONDS: i32 = 20;

/// The presence Lease of replica `identity`: a valid object name whatever the identity.
pub fn presence_lease_name(identity: &str) -> String {
    let clean: String = identity
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let clean = clean.trim_matches('-');
    if !clean.is_empty() && PRESENCE_LEASE_PREFIX.len() + clean.len() <= 63 && clean == identity {
        return format!("{PRESENCE_LEASE_PREFIX}{clean}");
    }
    let digest = hex::encode(Sha256::digest(identity.as_bytes()));
    format!("{PRESENCE_LEASE_PREFIX}{}", &digest[..16])
}

/// What replica `replica` should write as `agent`'s status, having heard `heartbeat`
/// (or nothing) from it, or `None` when nothing a person cares about changed or when
/// the agent is another replica's to judge.
pub fn agent_status(
    agent: &Agent,
    heartbeat: Option<&HeartbeatRecord>,
    replica: &str,
    timeout: Duration,
    now: Instant,
    wall: Timestamp,
) -> Option<AgentStatus> {
    let beat = heartbeat?;
    let current = agent.status.clone().unwrap_or_default();
    let age = now.saturating_duration_since(beat.at);
    let fresh = age < timeout;
    let ours = current.gateway.as_deref() == Some(replica);
    // An agent another replica serves and finds Ready stays that replica's: an agent's
    // connections may land on several replicas, and flipping the owner on every
    // heartbeat would be a write each time. The owner lets go (Ready=False) when it
    // stops hearing from the agent, and then the replica that does hear takes over.
    let owned_elsewhere = current.gateway.is_some()
        && !ours
        && conditions::status(&current.conditions, "Ready") == Some(conditions::TRUE);
    let mut next = current.clone();
    next.observed_generation = agent.metadata.generation;
    if fresh && owned_elsewhere {
        return None;
    }
    if fresh {
        conditions::set(
            &mut next.conditions,
            "Ready",
            conditions::TRUE,
            "Heartbeat",
            "",
            agent.metadata.generation,
            wall,
        );
        next.gateway = Some(replica.to_string());
        next.version = Some(beat.heartbeat.version.clone());
        next.platform = beat.heartbeat.platform.clone().or(current.platform.clone());
        next.hostname = beat.heartbeat.hostname.clone().or(current.hostname.clone());
        next.updates = beat.heartbeat.updates.clone().or(current.updates.clone());
        next.current_job = beat.heartbeat.current_job.clone();
    } else if ours {
        conditions::set(
            &mut next.conditions,
            "Ready",
            conditions::FALSE,
            "NoHeartbeat",
            format!("no heartbeat for more than {}s", timeout.as_secs()),
            agent.metadata.generation,
            wall,
        );
    } else {
        return None;
    }
    if next == current {
        return None;
    }
    let age = SignedDuration::try_from(age).unwrap_or(SignedDuration::ZERO);
    next.last_heartbeat_time = Some(Time(wall.checked_sub(age).unwrap_or(wall)));
    Some(next)
}

/// Whether a replica's presence Lease has run out at `now`, by `grace` or more.
pub fn replica_gone(lease: Option<&Lease>, now: Timestamp, grace: Duration) -> bool {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return true;
    };
    let (Some(renewed), Some(seconds)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        return true;
    };
    let grace = SignedDuration::try_from(grace).unwrap_or(SignedDuration::MAX);
    let until = renewed
        .0
        .checked_add(SignedDuration::from_secs(i64::from(seconds.max(0))))
        .and_then(|t| t.checked_add(grace))
        .unwrap_or(Timestamp::MAX);
    now >= until
}

impl Gateway {
    /// Renews this replica's presence Lease and writes the Agent statuses its
    /// heartbeats change, until the process ends.
    pub async fn keep_presence(self: Arc<Self>, replica: String, timeout: Duration) {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), &self.config.namespace);
        let lease_name = presence_lease_name(&replica);
        let mut renewed = Instant::now() - Duration::from_secs(3600);
        loop {
            if renewed.elapsed() >= Duration::from_secs(5) {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(lease_name.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(replica.clone()),
                        lease_duration_seconds: Some(PRESENCE_LEASE_SECONDS),
                        renew_time: Some(MicroTime(Timestamp::now())),
                        ..Default::default()
                    }),
                };
                match leases
                    .patch(
                        &lease_name,
                        &PatchParams::apply(field_manager::GATEWAY).force(),
                        &Patch::Apply(&lease),
                    )
                    .await
                {
                    Ok(_) => renewed = Instant::now(),
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot renew this replica's presence lease")
                    }
                }
            }
            self.write_presence(&replica, timeout).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn write_presence(&self, replica: &str, timeout: Duration) {
        let beats: Vec<(String, HeartbeatRecord)> = self
            .heartbeats
            .lock()
            .iter()
            .map(|(agent, beat)| (agent.clone(), beat.clone()))
            .collect();
        let now = Instant::now();
        let wall = Timestamp::now();
        let agents: Api<Agent> = Api::all(self.client.clone());
        for (name, beat) in beats {
            let Some(agent) = self.caches.agents.get(&ObjectRef::new(&name)) else {
                // Deleted: its heartbeats are forgotten.
                self.heartbeats.lock().remove(&name);
                continue;
            };
            let stale = now.saturating_duration_since(beat.at) >= timeout;
            let Some(status) = agent_status(&agent, Some(&beat), replica, timeout, now, wall)
            else {
                if stale {
                    self.heartbeats.lock().remove(&name);
                }
                continue;
            };
            let body = json!({
                "apiVersion": "fleetpatch.io/v1alpha1",
                "kind": "Agent",
                "metadata": {"name": name, "resourceVersion": agent.resource_version()},
                "status": status,
            });
            match agents
                .patch_status(
                    &name,
                    &PatchParams::apply(field_manager::CONTROLLER).force(),
                    &Patch::Apply(&body),
                )
                .await
            {
                Ok(_) => {
                    if stale {
                        self.heartbeats.lock().remove(&name);
                    }
                }
                // Someone else wrote it meanwhile; the next round looks again.
                Err(err) if api_errors::is_conflict(&err) || api_errors::is_not_found(&err) => {}
                Err(err) => {
                    tracing::warn!(agent = %name, error = %err, "cannot write an Agent's status")
                }
            }
        }
    }
}

/// A replica's presence Lease of 20 seconds, last renewed at `renewed`, for tests.
#[cfg(test)]
pub(crate) fn lease_renewed_at(renewed: &str) -> Lease {
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    Lease {
        metadata: Default::default(),
        spec: Some(LeaseSpec {
            renew_time: Some(MicroTime(renewed.parse().unwrap())),
            lease_duration_seconds: Some(20),
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::protocol::Heartbeat;

    fn agent(status: Option<AgentStatus>) -> Agent {
        let mut agent = Agent::external_linux("web-1");
        agent.status = status;
        agent
    }

    fn beat(at: Instant, job: Option<&str>) -> HeartbeatRecord {
        HeartbeatRecord {
            at,
            heartbeat: Heartbeat {
                version: "1.0".into(),
                current_job: job.map(String::from),
                ..Default::default()
            },
        }
    }

    #[test]
    fn a_replica_writes_only_what_changed_and_judges_only_its_own_agents() {
        let now = Instant::now();
        let wall = Timestamp::now();
        let timeout = Duration::from_secs(45);
        let status = |agent: &Agent, beat: &HeartbeatRecord, replica: &str| {
            agent_status(agent, Some(beat), replica, timeout, now, wall)
        };
        let fresh = beat(now, None);
        let first = status(&agent(None), &fresh, "a").expect("a new agent becomes Ready");
        assert_eq!(conditions::status(&first.conditions, "Ready"), Some("True"));
        assert_eq!(first.gateway.as_deref(), Some("a"));
        assert_eq!(
            status(&agent(Some(first.clone())), &fresh, "a"),
            None,
            "nothing changed"
        );
        // A job starts: the current job changes, so it is written.
        let busy = status(&agent(Some(first.clone())), &beat(now, Some("team/j")), "a").unwrap();
        assert_eq!(busy.current_job.as_deref(), Some("team/j"));
        // Silent for longer than the timeout: replica a, which served it, says so...
        let silent = beat(now - timeout - Duration::from_secs(1), None);
        let down = status(&agent(Some(first.clone())), &silent, "a").unwrap();
        assert_eq!(conditions::status(&down.conditions, "Ready"), Some("False"));
        // ...but replica b, whose old heartbeat is stale, leaves an agent that moved to a alone.
        assert_eq!(status(&agent(Some(first.clone())), &silent, "b"), None);
        // While a finds it Ready, b hearing from it too changes nothing...
        assert_eq!(status(&agent(Some(first.clone())), &fresh, "b"), None);
        // ...once a let go, b takes it over.
        let moved = status(&agent(Some(down)), &fresh, "b").unwrap();
        assert_eq!(moved.gateway.as_deref(), Some("b"));
        assert_eq!(conditions::status(&moved.conditions, "Ready"), Some("True"));
        assert_eq!(
            agent_status(&agent(None), None, "a", timeout, now, wall),
            None
        );
    }

    #[test]
    fn a_replica_is_gone_once_its_lease_ran_out_by_the_grace() {
        let now: Timestamp = "2026-12-01T12:00:00Z".parse().unwrap();
        let lease = crate::gateway::presence::lease_renewed_at;
        let grace = Duration::from_secs(45);
        assert!(replica_gone(None, now, grace));
        assert!(!replica_gone(
            Some(&lease("2026-12-01T11:59:50Z")),
            now,
            grace
        ));
        assert!(
            !replica_gone(Some(&lease("2026-12-01T11:59:00Z")), now, grace),
            "within the grace"
        );
        assert!(replica_gone(
            Some(&lease("2026-12-01T11:58:00Z")),
            now,
            grace
        ));
        // A renewal time at the end of time does not overflow.
        assert!(!replica_gone(
            Some(&lease("9999-12-30T00:00:00Z")),
            now,
            grace
        ));
    }

    #[test]
    fn presence_lease_names_are_valid_for_any_identity() {
        assert_eq!(
            presence_lease_name("fleetpatch-controller-7d9f-abcde"),
            "fleetpatch-gateway-fleetpatch-controller-7d9f-abcde"
        );
        for identity in ["Host_Name", &"x".repeat(100), "", "a/b"] {
            let name = presence_lease_name(identity);
            assert!(
                name.len() <= 63 && crate::manifests::is_dns_label(&name),
                "{name}"
            );
        }
    }
}
