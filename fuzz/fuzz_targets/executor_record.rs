//! The executor's view of a job as its journal holds it: whatever a damaged or edited
//! journal file says, deciding the next step must not panic, and a step must point at an
//! action the job has.
#![no_main]

use fleetpatch::agent::executor::{Stage, Step, next_step};
use fleetpatch::agent::journal::JobRecord;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(record) = serde_json::from_slice::<JobRecord>(data) else {
        return;
    };
    let _ = record.is_consistent();
    if let Step::Action(stage, index) = next_step(&record) {
        let (results, actions) = match stage {
            Stage::Pre => (record.status.pre_actions.len(), record.spec.pre_actions.len()),
            Stage::Post => (record.status.post_actions.len(), record.spec.post_actions.len()),
        };
        assert!(index < results && index < actions, "{stage:?} {index} of {results}/{actions}");
    }
});
