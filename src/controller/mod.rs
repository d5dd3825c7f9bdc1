//! The controller: one reconciler per kind, with the decisions they make (rollout
//! planning, schedules, job names) as pure functions.

pub mod rollout;
