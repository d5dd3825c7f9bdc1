//! The Agent reconciler: Ready from the heartbeats the gateway holds in memory. Status
//! is written when something a person cares about changes (Ready, version, platform,
//! current job), not on every heartbeat.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use crate::api::Agent;
use crate::api::agent::AgentStatus;
use crate::api::conditions;

use super::context::{Context, Error};

pub async fn reconcile_agent(agent: Arc<Agent>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile("Agent");
    let name = agent.name_any();
    let beat = ctx
        .heartbeats
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&name)
        .cloned();
    let status = agent.status.clone().unwrap_or_default();
    let timeout = ctx.settings.heartbeat_timeout;
    let fresh = beat.as_ref().is_some_and(|b| b.at.elapsed() < timeout);
    let mut conditions = status.conditions.clone();
    let now = Timestamp::now();
    let (ready, reason, message) = if fresh {
        (conditions::TRUE, "Heartbeat", String::new())
    } else if beat.is_some() {
        (
            conditions::FALSE,
            "NoHeartbeat",
            format!("no heartbeat for more than {}s", timeout.as_secs()),
        )
    } else {
        (
            conditions::UNKNOWN,
            "NeverSeen",
            "the gateway has not heard from this agent since it started".to_string(),
        )
    };
    let was_ready = conditions::status(&conditions, "Ready") == Some(conditions::TRUE);
    let flipped = conditions::set(
        &mut conditions,
        "Ready",
        ready,
        reason,
        message.clone(),
        agent.metadata.generation,
        now,
    );
    let heartbeat = beat
        .as_ref()
        .map(|b| b.heartbeat.clone())
        .unwrap_or_default();
    let current_job = if fresh {
        heartbeat.current_job.clone()
    } else {
        status.current_job.clone()
    };
    let version = beat
        .as_ref()
        .map(|b| b.heartbeat.version.clone())
        .or(status.version.clone());
    let platform = heartbeat.platform.clone().or(status.platform.clone());
    let changed = flipped
        || version != status.version
        || platform != status.platform
        || current_job != status.current_job
        || status.observed_generation != agent.metadata.generation;
    if changed {
        let last_heartbeat = beat.as_ref().map(|b| {
            let age = k8s_openapi::jiff::SignedDuration::from_secs(b.at.elapsed().as_secs() as i64);
            Time(now - age)
        });
        let status = AgentStatus {
            observed_generation: agent.metadata.generation,
            conditions,
            version,
            platform,
            hostname: heartbeat.hostname.or(status.hostname.clone()),
            updates: heartbeat.updates.or(status.updates.clone()),
            current_job,
            last_heartbeat_time: last_heartbeat.or(status.last_heartbeat_time.clone()),
        };
        ctx.apply_status(
            agent.as_ref(),
            serde_json::to_value(&status).expect("serializes"),
        )
        .await?;
        if was_ready && ready != conditions::TRUE {
            ctx.event(
                agent.as_ref(),
                EventType::Warning,
                reason,
                "Heartbeat",
                message,
            )
            .await;
        }
    }
    // Look again soon while not Ready, so a new agent becomes Ready within seconds.
    Ok(Action::requeue(Duration::from_secs(if fresh {
        10
    } else {
        2
    })))
}
