//! Leader election on a `coordination.k8s.io/v1` Lease, with client-go's margins: the
//! lease lasts 15 s, the leader must renew it within 10 s (the renew deadline) or it
//! stops leading — 5 s before a standby could take it — and every attempt, renewals
//! included, is bounded by a timeout, so a hung API request cannot keep a leader that
//! no longer holds its lease. A leader that shuts down releases the lease, so a standby
//! takes over in about the retry period, not the lease's 15 s.

use std::time::Duration;

use crate::api_errors;
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
    /// How long a lease holds without renewal.
    pub duration: Duration,
    /// How long the leader keeps leading without a successful renewal; shorter than
    /// `duration`, so it stops before anyone else may take over.
    pub renew_deadline: Duration,
    /// Time between attempts.
    pub retry_period: Duration,
}

impl LeaseSettings {
    /// client-go's defaults: 15 s, 10 s, 2 s.
    pub fn new(name: &str, namespace: &str, identity: &str) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
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
        (Some(holder), _, _) if holder.is_empty() => true,
        (Some(_), Some(renewed), Some(seconds)) => renewed
            .0
            .checked_add(SignedDuration::from_secs(i64::from(seconds)))
            .is_ok_and(|until| now > until),
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
                Err(err) if api_errors::is_conflict(&err) => Ok(false),
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
                Err(err) if api_errors::is_conflict(&err) => Ok(false),
                Err(err) => Err(err),
            }
        }
    }
}

/// One attempt, bounded by `limit`: a request that hangs counts as a failure.
async fn attempt(
    client: &Client,
    settings: &LeaseSettings,
    limit: Duration,
) -> Result<bool, String> {
    match tokio::time::timeout(limit, try_acquire(client, settings)).await {
        Ok(Ok(held)) => Ok(held),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err(format!("no answer within {}s", limit.as_secs())),
    }
}

/// Waits until this replica leads.
pub async fn acquire(client: &Client, settings: &LeaseSettings) {
    loop {
        match attempt(client, settings, settings.renew_deadline).await {
            Ok(true) => return,
            Ok(false) => tracing::debug!(lease = %settings.name, "another replica leads; waiting"),
            Err(err) => tracing::warn!(error = %err, "cannot read the leader lease"),
        }
        tokio::time::sleep(settings.retry_period).await;
    }
}

/// Renews the lease every retry period; returns once it has not been renewed for the
/// renew deadline (or another replica holds it), which is before it can expire.
pub async fn hold(client: Client, settings: LeaseSettings) {
    let mut last_renewal = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(settings.retry_period).await;
        let left = settings
            .renew_deadline
            .saturating_sub(last_renewal.elapsed());
        if left.is_zero() {
            tracing::error!(lease = %settings.name, "the lease was not renewed within the renew deadline; stepping down");
            return;
        }
        match attempt(&client, &settings, left).await {
            Ok(true) => last_renewal = tokio::time::Instant::now(),
            Ok(false) => {
                tracing::error!(lease = %settings.name, "leadership lost to another replica");
                return;
            }
            Err(err) => tracing::warn!(error = %err, "cannot renew the leader lease"),
        }
    }
}

/// Gives the lease up, if this replica holds it, so a standby takes over at once.
pub async fn release(client: &Client, settings: &LeaseSettings) {
    let api: Api<Lease> = Api::namespaced(client.clone(), &settings.namespace);
    let released = async {
        let Some(mut lease) = api.get_opt(&settings.name).await? else {
            return Ok::<bool, kube::Error>(false);
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(settings.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        api.replace(&settings.name, &PostParams::default(), &lease)
            .await?;
        Ok(true)
    };
    match tokio::time::timeout(settings.renew_deadline, released).await {
        Ok(Ok(true)) => tracing::info!(lease = %settings.name, "leadership released"),
        Ok(Ok(false)) => {}
        Ok(Err(err)) => tracing::warn!(error = %err, "cannot release the leader lease"),
        Err(_) => tracing::warn!("releasing the leader lease took too long"),
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
        assert!(
            can_hold(&held("", "2026-11-22T11:59:59Z"), "me", now),
            "released"
        );
        // A renewal time at the end of time neither overflows nor frees the lease.
        assert!(!can_hold(&held("other", "9999-12-30T00:00:00Z"), "me", now));
    }

    #[test]
    fn the_leader_stops_before_its_lease_can_be_taken() {
        let settings = LeaseSettings::new("l", "ns", "me");
        assert!(settings.renew_deadline + settings.retry_period < settings.duration);
    }
}
