//! Leader election on a `coordination.k8s.io/v1` Lease: one controller replica works,
//! the others wait. A leader that cannot renew in time stops, so two never act at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};

#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub duration: Duration,
}

/// Whether `lease` lets `identity` take or keep it at `now`.
pub fn can_hold(lease: &LeaseSpec, identity: &str, now: Timestamp) -> bool {
    match (
        &lease.holder_identity,
        &lease.renew_time,
        lease.lease_duration_seconds,
    ) {
        (Some(holder), _, _) if holder == identity => true,
        (None, _, _) => true,
        (Some(_), Some(renewed), Some(seconds)) => {
            now > renewed.0 + SignedDuration::from_secs(i64::from(seconds))
        }
        (Some(_), None, _) => true,
        (Some(_), Some(_), None) => true,
    }
}

/// Tries once to take or renew the lease. `Ok(true)` when we hold it now.
pub async fn try_acquire(client: &Client, settings: &LeaseSettings) -> Result<bool, kube::Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &settings.namespace);
    let now = Timestamp::now();
    let spec = |acquire: Option<MicroTime>, transitions: Option<i32>| LeaseSpec {
        holder_identity: Some(settings.identity.clone()),
        lease_duration_seconds: Some(settings.duration.as_secs() as i32),
        acquire_time: acquire,
        renew_time: Some(MicroTime(now)),
        lease_transitions: transitions,
        ..Default::default()
    };
    match api.get_opt(&settings.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(settings.name.clone()),
                    ..Default::default()
                },
                spec: Some(spec(Some(MicroTime(now)), Some(0))),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(err) => Err(err),
            }
        }
        Some(mut lease) => {
            let current = lease.spec.clone().unwrap_or_default();
            if !can_hold(&current, &settings.identity, now) {
                return Ok(false);
            }
            let ours = current.holder_identity.as_deref() == Some(settings.identity.as_str());
            let acquire = if ours {
                current.acquire_time.clone()
            } else {
                Some(MicroTime(now))
            };
            let transitions = current.lease_transitions.unwrap_or(0) + i32::from(!ours);
            lease.spec = Some(spec(acquire, Some(transitions)));
            // The resourceVersion in `lease` makes this a compare-and-swap.
            match api
                .replace(&settings.name, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(err) => Err(err),
            }
        }
    }
}

/// Waits until this replica leads.
pub async fn acquire(client: &Client, settings: &LeaseSettings) {
    loop {
        match try_acquire(client, settings).await {
            Ok(true) => return,
            Ok(false) => tracing::debug!(lease = %settings.name, "another replica leads; waiting"),
            Err(err) => tracing::warn!(error = %err, "cannot read the leader lease"),
        }
        tokio::time::sleep(settings.duration / 3).await;
    }
}

/// Renews the lease until it cannot; returns when leadership is lost.
pub async fn hold(client: Client, settings: LeaseSettings) {
    let mut last_renewal = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(settings.duration / 3).await;
        match try_acquire(&client, &settings).await {
            Ok(true) => last_renewal = tokio::time::Instant::now(),
            Ok(false) => {
                tracing::error!(lease = %settings.name, "leadership lost to another replica");
                return;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot renew the leader lease");
                if last_renewal.elapsed() >= settings.duration {
                    tracing::error!("leader lease expired while the API was unreachable");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_free_when_unheld_expired_or_ours() {
        let now: Timestamp = "2026-11-22T12:00:00Z".parse().unwrap();
        let held = |holder: &str, renewed: &str| LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(renewed.parse().unwrap())),
            lease_duration_seconds: Some(15),
            ..Default::default()
        };
        assert!(can_hold(&LeaseSpec::default(), "me", now));
        assert!(can_hold(&held("me", "2026-11-22T11:59:59Z"), "me", now));
        assert!(!can_hold(&held("other", "2026-11-22T11:59:59Z"), "me", now));
        assert!(can_hold(&held("other", "2026-11-22T11:59:00Z"), "me", now));
    }
}
