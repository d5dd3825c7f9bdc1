//! Everything the gateway decodes from the network, as an agent or a stranger sends it:
//! registration requests, heartbeats and progress reports against a real job. None of it
//! may panic, and an accepted report must satisfy the gateway's rules.
#![no_main]

use std::sync::OnceLock;

use fleetpatch::api::library::Library;
use fleetpatch::api::patchjob::{JobPhase, PatchJobSpec};
use fleetpatch::api::resolve::{JobTarget, resolve_named};
use fleetpatch::api::rules::{Catalog, DEFAULT_LIBRARY_NAMESPACE};
use fleetpatch::gateway::protocol::{
    self, Heartbeat, MAX_MESSAGE, ProgressReport, RegisterRequest, accept_heartbeat, accept_report,
};
use fleetpatch::gateway::registration::registration_problem;
use k8s_openapi::jiff::Timestamp;
use libfuzzer_sys::fuzz_target;

/// A job with pre and post actions, from the built-in library.
fn spec() -> &'static PatchJobSpec {
    static SPEC: OnceLock<PatchJobSpec> = OnceLock::new();
    SPEC.get_or_init(|| {
        let mut catalog = Catalog::new(DEFAULT_LIBRARY_NAMESPACE);
        Library::load(DEFAULT_LIBRARY_NAMESPACE).add_to(&mut catalog);
        let target = JobTarget {
            agent: "a".into(),
            plan: "p".into(),
            run: "r".into(),
            patches: Default::default(),
            reboot: Default::default(),
        };
        resolve_named(&catalog, "x", "linux-default", target).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let now: Timestamp = "2026-12-01T12:00:00Z".parse().unwrap();
    if let Ok(request) = serde_json::from_slice::<RegisterRequest>(data) {
        let _ = registration_problem(&request);
    }
    if let Ok(beat) = serde_json::from_slice::<Heartbeat>(data) {
        let beat = accept_heartbeat(beat, &["team/job".to_string()]);
        assert!(beat.version.len() <= 64);
    }
    if let Ok(report) = serde_json::from_slice::<ProgressReport>(data) {
        let sequence = report.sequence;
        let created = Some("2026-12-01T11:00:00Z".parse().unwrap());
        if let Ok(status) = accept_report(spec(), None, created, report, now) {
            assert!((1..=protocol::MAX_SEQUENCE).contains(&sequence));
            assert_ne!(status.phase, JobPhase::Unknown);
            assert!(status.pre_actions.len() <= spec().pre_actions.len());
            assert!(status.post_actions.len() <= spec().post_actions.len());
            assert!(status.message.len() <= MAX_MESSAGE);
            // Every time is plausible: nothing after now plus the skew, nothing absurdly early.
            let latest = now.saturating_add(k8s_openapi::jiff::SignedDuration::from_mins(5)).unwrap();
            for action in status.pre_actions.iter().chain(&status.post_actions) {
                for time in [&action.start_time, &action.finish_time].into_iter().flatten() {
                    assert!(time.0 <= latest && time.0.as_second() > 0);
                }
            }
            assert_eq!(status.completion_time.is_some(), status.phase.is_finished());
        }
    }
});
