//! The Agent reconciler (leader only). The gateways of every replica write an Agent's
//! readiness from the heartbeats they take (`gateway::presence`); what is left for the
//! leader is what no gateway can see: an agent never heard from, and an agent whose
//! replica went away without anyone hearing from the agent since. It also tells people
//! when an agent stops being Ready.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;

use crate::api::Agent;
use crate::api::agent::AgentStatus;
use crate::api::conditions;
use crate::gateway::presence::{presence_lease_name, replica_gone};

use super::context::{Context, Error};

/// The status the leader must write for `agent`, if any: Unknown for an agent never
/// heard from, not Ready for one whose gateway replica is gone (its presence Lease ran
/// out by more than `timeout`).
pub fn agent_readiness(
    agent: &Agent,
    replica_lease: Option<&Lease>,
    timeout: Duration,
    now: Timestamp,
) -> Option<AgentStatus> {
    let current = agent.status.clone().unwrap_or_default();
    let mut next = current.clone();
    match (
        conditions::status(&current.conditions, "Ready"),
        &current.gateway,
    ) {
        (None, _) => {
            conditions::set(
                &mut next.conditions,
                "Ready",
                conditions::UNKNOWN,
                "NeverSeen",
                "no gateway has heard from this agent yet",
                agent.metadata.generation,
                now,
            );
        }
        (Some(conditions::TRUE), Some(replica)) if replica_gone(replica_lease, now, timeout) => {
            conditions::set(
                &mut next.conditions,
                "Ready",
                conditions::FALSE,
                "GatewayGone",
                format!(
                    "the controller replica {replica} that served this agent is gone, and the agent has not come back through another"
                ),
                agent.metadata.generation,
                now,
            );
        }
        _ => return None,
    }
    next.observed_generation = agent.metadata.generation;
    (next != current).then_some(next)
}

pub async fn reconcile_agent(agent: Arc<Agent>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile("Agent");
    let status = agent.status.clone().unwrap_or_default();
    let lease = status.gateway.as_deref().and_then(|replica| {
        ctx.caches
            .leases
            .get(&ObjectRef::new(&presence_lease_name(replica)).within(&ctx.settings.namespace))
    });
    let now = Timestamp::now();
    if let Some(next) = agent_readiness(
        &agent,
        lease.as_deref(),
        ctx.settings.heartbeat_timeout,
        now,
    ) {
        ctx.apply_status_over(agent.as_ref(), &next, agent.resource_version())
            .await?;
    }
    if let Some(ready) = status.conditions.iter().find(|c| c.type_ == "Ready")
        && ready.status == conditions::FALSE
        && now.duration_since(ready.last_transition_time.0).as_secs() < 60
    {
        // Once per change: this reconcile runs when the status changes, and the
        // recorder folds repeats into one Event.
        ctx.event(
            agent.as_ref(),
            EventType::Warning,
            &ready.reason,
            "Heartbeat",
            ready.message.clone(),
        );
    }
    // Ready agents are looked at again for a replica that went away.
    Ok(Action::requeue(Duration::from_secs(30)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(ready: Option<&str>, gateway: Option<&str>) -> Agent {
        let mut agent = Agent::external_linux("web-1");
        let mut status = AgentStatus {
            gateway: gateway.map(String::from),
            ..Default::default()
        };
        if let Some(ready) = ready {
            conditions::set(
                &mut status.conditions,
                "Ready",
                ready,
                "Heartbeat",
                "",
                None,
                Timestamp::UNIX_EPOCH,
            );
        }
        agent.status = Some(status);
        agent
    }

    #[test]
    fn the_leader_judges_only_agents_no_gateway_can_judge() {
        let now: Timestamp = "2026-12-01T12:00:00Z".parse().unwrap();
        let timeout = Duration::from_secs(45);
        let lease = crate::gateway::presence::lease_renewed_at;
        let never = agent_readiness(&agent(None, None), None, timeout, now).unwrap();
        assert_eq!(
            conditions::status(&never.conditions, "Ready"),
            Some("Unknown")
        );
        let alive = lease("2026-12-01T11:59:58Z");
        assert_eq!(
            agent_readiness(&agent(Some("True"), Some("a")), Some(&alive), timeout, now),
            None
        );
        let gone = lease("2026-12-01T11:58:00Z");
        let lost =
            agent_readiness(&agent(Some("True"), Some("a")), Some(&gone), timeout, now).unwrap();
        assert_eq!(conditions::status(&lost.conditions, "Ready"), Some("False"));
        assert!(lost.conditions[0].message.contains("replica a"));
        assert!(agent_readiness(&agent(Some("True"), Some("a")), None, timeout, now).is_some());
        // Already not Ready: nothing to write, no write at all.
        assert_eq!(
            agent_readiness(&agent(Some("False"), Some("a")), None, timeout, now),
            None
        );
    }
}
