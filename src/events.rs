//! Kubernetes Events off the request path. Anything in the controller process (the
//! gateway writing a job's progress above all) puts Events into a bounded queue without
//! waiting; one task drains it through kube-rs' [`Recorder`], which folds repeats of
//! an Event into a series. Each object gets a token bucket like the kubelet's event
//! spam filter (25 at once, one more every five minutes), so a job that flaps cannot
//! flood the API server; and each namespace may hold only a share of the queue
//! (cluster-scoped objects — Nodes, Agents — count as one more), so one namespace's
//! thousands of objects cannot crowd the others' Events out. What a full queue, a full
//! share or an empty bucket turns away is logged.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, Recorder};
use tokio::sync::mpsc;

/// Events waiting to be recorded, at most.
pub const QUEUE_CAPACITY: usize = 4096;
/// Events one object may have at once (the kubelet's `defaultSpamBurst`).
pub const BURST_PER_OBJECT: u32 = 25;
/// Time for one more Event of an object (the kubelet's `defaultSpamQPS`: 1/300).
pub const REFILL_PER_OBJECT: Duration = Duration::from_secs(300);

/// An Event about `regarding`, waiting to be recorded.
pub struct QueuedEvent {
    pub regarding: ObjectReference,
    pub event: Event,
    /// Its place in its namespace's share, given back when it is recorded or dropped.
    _share: ShareTaken,
}

/// Events queued per namespace ("" for cluster-scoped objects).
type Shares = Arc<parking_lot::Mutex<HashMap<String, usize>>>;

struct ShareTaken {
    shares: Shares,
    namespace: String,
}

impl Drop for ShareTaken {
    fn drop(&mut self) {
        let mut shares = self.shares.lock();
        if let Some(held) = shares.get_mut(&self.namespace) {
            *held -= 1;
            if *held == 0 {
                shares.remove(&self.namespace);
            }
        }
    }
}

/// The sending side: cheap to clone, never waits.
#[derive(Clone)]
pub struct EventQueue {
    sender: mpsc::Sender<QueuedEvent>,
    dropped: Arc<AtomicU64>,
    shares: Shares,
    share: usize,
}

impl EventQueue {
    /// A queue of `capacity` Events, one namespace's objects holding at most an
    /// eighth of it at once.
    pub fn new(capacity: usize) -> (Self, mpsc::Receiver<QueuedEvent>) {
        Self::with_share(capacity, (capacity / 8).max(1))
    }

    /// A queue of `capacity` Events, one namespace's objects holding at most `share`.
    pub fn with_share(capacity: usize, share: usize) -> (Self, mpsc::Receiver<QueuedEvent>) {
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        let queue = Self {
            sender,
            dropped: Arc::default(),
            shares: Arc::default(),
            share: share.max(1),
        };
        (queue, receiver)
    }

    /// Queues an Event; when the queue, or its namespace's share of it, is full it is
    /// dropped (and logged now and then).
    pub fn send(&self, regarding: ObjectReference, event: Event) {
        let namespace = regarding.namespace.clone().unwrap_or_default();
        {
            let mut shares = self.shares.lock();
            let held = shares.entry(namespace.clone()).or_insert(0);
            if *held >= self.share {
                drop(shares);
                self.count_dropped(&event, "its namespace's share of the event queue is full");
                return;
            }
            *held += 1;
        }
        let share = ShareTaken {
            shares: self.shares.clone(),
            namespace,
        };
        match self.sender.try_send(QueuedEvent {
            regarding,
            event,
            _share: share,
        }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(queued)) => {
                self.count_dropped(&queued.event, "the event queue is full");
            }
            // No drain (tests of other parts, or shutting down): nothing to tell.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn count_dropped(&self, event: &Event, why: &str) {
        let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if dropped.is_power_of_two() {
            tracing::warn!(dropped, reason = %event.reason, "{why}; events are dropped");
        }
    }
}

/// One token bucket per object.
pub struct ObjectBuckets(DefaultKeyedRateLimiter<String>);

impl ObjectBuckets {
    pub fn new(burst: u32, refill: Duration) -> Self {
        let burst = std::num::NonZeroU32::new(burst).unwrap_or(std::num::NonZeroU32::MIN);
        let quota = Quota::with_period(refill)
            .unwrap_or_else(|| Quota::per_second(std::num::NonZeroU32::MIN))
            .allow_burst(burst);
        Self(RateLimiter::keyed(quota))
    }

    /// Like the kubelet's.
    pub fn kubelet_like() -> Self {
        Self::new(BURST_PER_OBJECT, REFILL_PER_OBJECT)
    }

    /// Whether `regarding` may have one more Event now (takes a token if so).
    pub fn admit(&self, regarding: &ObjectReference) -> bool {
        let key = format!(
            "{}/{}/{}/{}/{}",
            regarding.api_version.as_deref().unwrap_or_default(),
            regarding.kind.as_deref().unwrap_or_default(),
            regarding.namespace.as_deref().unwrap_or_default(),
            regarding.name.as_deref().unwrap_or_default(),
            regarding.uid.as_deref().unwrap_or_default(),
        );
        self.0.check_key(&key).is_ok()
    }

    /// Forgets objects whose buckets are full again.
    pub fn prune(&self) {
        self.0.retain_recent();
    }
}

/// Records queued Events in order, one at a time, until every sender is gone.
pub async fn drain(mut receiver: mpsc::Receiver<QueuedEvent>, recorder: Recorder) {
    let buckets = ObjectBuckets::kubelet_like();
    let mut since_prune = 0u32;
    while let Some(QueuedEvent {
        regarding, event, ..
    }) = receiver.recv().await
    {
        if !buckets.admit(&regarding) {
            tracing::debug!(
                kind = regarding.kind.as_deref().unwrap_or_default(),
                namespace = regarding.namespace.as_deref().unwrap_or_default(),
                name = regarding.name.as_deref().unwrap_or_default(),
                reason = %event.reason,
                "event over the object's rate limit; dropped"
            );
            continue;
        }
        if let Err(err) = recorder.publish(&event, &regarding).await {
            tracing::warn!(
                kind = regarding.kind.as_deref().unwrap_or_default(),
                namespace = regarding.namespace.as_deref().unwrap_or_default(),
                name = regarding.name.as_deref().unwrap_or_default(),
                reason = %event.reason,
                error = %err,
                "cannot record event"
            );
        }
        since_prune += 1;
        if since_prune >= 1000 {
            buckets.prune();
            since_prune = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::events::EventType;

    fn job(name: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some("fleetpatch.io/v1alpha1".into()),
            kind: Some("PatchJob".into()),
            namespace: Some("default".into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            ..Default::default()
        }
    }

    fn event(reason: &str) -> Event {
        Event {
            type_: EventType::Normal,
            reason: reason.into(),
            note: None,
            action: "Test".into(),
            secondary: None,
        }
    }

    #[test]
    fn each_object_has_its_own_bucket() {
        let buckets = ObjectBuckets::new(3, Duration::from_secs(300));
        let admitted = (0..10).filter(|_| buckets.admit(&job("a"))).count();
        assert_eq!(
            admitted, 3,
            "a burst, then nothing until the bucket refills"
        );
        assert!(buckets.admit(&job("b")), "another object is not held back");
    }

    #[tokio::test]
    async fn a_full_queue_drops_instead_of_waiting() {
        let (queue, mut receiver) = EventQueue::with_share(2, 2);
        for reason in ["One", "Two", "Three"] {
            queue.send(job("a"), event(reason));
        }
        assert_eq!(receiver.recv().await.unwrap().event.reason, "One");
        assert_eq!(receiver.recv().await.unwrap().event.reason, "Two");
        assert!(receiver.try_recv().is_err(), "the third was dropped");
        assert_eq!(queue.dropped.load(Ordering::Relaxed), 1);
    }

    /// Attack (a plan author, in their own namespace): the per-object budget is
    /// applied only when the one drain task takes an Event off the queue; the queue
    /// itself (4096) is shared by every object in every namespace, first come first
    /// served. An author who writes a few thousand Scripts that break a rule (each
    /// reconcile queues a `SyntaxError` Warning, and each object has a fresh budget of
    /// 25) fills the queue faster than the drain can publish them, one API request
    /// each — and while it is full, every other Event is dropped: the controller's
    /// `Cordoned`/`DrainTimedOut` on a node, the gateway's `Failed` on another team's
    /// job. The audit trail of a fleet-wide reboot goes missing with no trace but a
    /// log line. One namespace's (or one object's) Events must not take the place of
    /// another's.
    #[tokio::test]
    async fn one_namespace_cannot_crowd_every_other_event_out_of_the_queue() {
        let (queue, mut receiver) = EventQueue::new(QUEUE_CAPACITY);
        for i in 0..QUEUE_CAPACITY {
            let mut script = job(&format!("broken-{i}"));
            script.kind = Some("Script".into());
            script.namespace = Some("team-a".into());
            queue.send(script, event("SyntaxError"));
        }
        let node = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some("node-1".into()),
            uid: Some("uid-node-1".into()),
            ..Default::default()
        };
        queue.send(node, event("Cordoned"));
        let mut reasons = Vec::new();
        while let Ok(queued) = receiver.try_recv() {
            reasons.push(queued.event.reason);
        }
        assert!(
            reasons.iter().any(|reason| reason == "Cordoned"),
            "the node's Cordoned Event was dropped: the queue was full of {} SyntaxError Events of one namespace",
            reasons.len()
        );
    }
}
