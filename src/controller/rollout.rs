//! Rollout planning as a pure function of (plan, agents, existing jobs of the run):
//! which hosts get a job now, and whether the run has halted. No I/O here; the plan
//! reconciler feeds it from its caches and applies what it decides.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::{Selector, SelectorExt};

use crate::api::OperatingSystem;
use crate::api::patchjob::JobPhase;
use crate::api::plan::{PlanTarget, RunCounts, RunPhase};

/// What the planner needs to know about one Agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetAgent {
    pub name: String,
    pub os: OperatingSystem,
    pub labels: BTreeMap<String, String>,
    pub paused: bool,
    /// Whether the Agent accepts plans from the plan's namespace (`spec.allowedPlans`).
    pub permitted: bool,
}

/// A job of the current run that already exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunJob {
    pub agent: String,
    pub phase: JobPhase,
}

/// A host selected for the run, with the target group that selected it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub agent: String,
    /// Index into the plan's targets.
    pub target: usize,
}

/// What to do now for one run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolloutDecision {
    /// Jobs to create now, highest priority first.
    pub create: Vec<Assignment>,
    pub counts: RunCounts,
    pub phase: RunPhase,
    /// Resolved limits, for status messages.
    pub max_concurrent: i32,
    pub max_failures: i32,
}

/// A count, or a percentage of `total` (rounded up for concurrency, down for failures).
pub fn resolve_limit(limit: &IntOrString, total: i32, round_up: bool) -> i32 {
    match limit {
        IntOrString::Int(n) => *n,
        IntOrString::String(text) => {
            // The CRD allows 0%..100%; anything else is clamped, never overflowed.
            let percent: i64 = text
                .trim_end_matches('%')
                .trim()
                .parse::<i64>()
                .unwrap_or(0)
                .clamp(0, 100);
            let scaled = i64::from(total.max(0)) * percent;
            let value = if round_up {
                (scaled + 99) / 100
            } else {
                scaled / 100
            };
            i32::try_from(value).unwrap_or(i32::MAX)
        }
    }
}

/// The hosts a plan's targets select.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    pub selected: Vec<Assignment>,
    /// Selected but paused: counted, not run.
    pub paused: Vec<String>,
    /// Selected but not accepting plans from the plan's namespace: counted, not run.
    pub not_permitted: Vec<String>,
}

/// Hosts each target selects, each host at most once: targets are taken by descending
/// priority (then in their order in the plan), so a host in two groups belongs to the
/// more important one.
pub fn select_hosts(targets: &[PlanTarget], agents: &[FleetAgent]) -> Selection {
    let mut order: Vec<usize> = (0..targets.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(targets[i].priority), i));
    let mut taken = BTreeSet::new();
    let mut selection = Selection::default();
    for index in order {
        let target = &targets[index];
        // An invalid selector selects nothing rather than everything.
        let Ok(selector) = Selector::try_from(target.selector.clone()) else {
            continue;
        };
        let mut matching: Vec<&FleetAgent> = agents
            .iter()
            .filter(|a| {
                a.os == target.os && selector.matches(&a.labels) && !taken.contains(&a.name)
            })
            .collect();
        matching.sort_by(|a, b| a.name.cmp(&b.name));
        for agent in matching {
            taken.insert(agent.name.clone());
            if !agent.permitted {
                selection.not_permitted.push(agent.name.clone());
            } else if agent.paused {
                selection.paused.push(agent.name.clone());
            } else {
                selection.selected.push(Assignment {
                    agent: agent.name.clone(),
                    target: index,
                });
            }
        }
    }
    selection
}

fn is_failure(phase: JobPhase) -> bool {
    matches!(phase, JobPhase::Failed | JobPhase::Unknown)
}

/// Decides which jobs to create now. Never lets more than `maxConcurrent` jobs be
/// unfinished at once, and starts nothing once failures exceed `maxFailures` (jobs
/// already running then finish; they are the only overshoot the budget allows).
pub fn plan_rollout(
    targets: &[PlanTarget],
    max_concurrent: &IntOrString,
    max_failures: &IntOrString,
    suspended: bool,
    agents: &[FleetAgent],
    jobs: &[RunJob],
) -> RolloutDecision {
    let Selection {
        selected,
        paused,
        not_permitted,
    } = select_hosts(targets, agents);
    let with_job: BTreeSet<&str> = jobs.iter().map(|j| j.agent.as_str()).collect();
    // Hosts with a job count even if they no longer match (labels changed mid-run).
    let total = (selected
        .iter()
        .filter(|a| !with_job.contains(a.agent.as_str()))
        .count()
        + jobs.len()) as i32;
    let concurrency = resolve_limit(max_concurrent, total, true).max(1);
    let budget = resolve_limit(max_failures, total, false).max(0);

    let mut counts = RunCounts {
        total,
        paused: paused.len() as i32,
        not_permitted: not_permitted.len() as i32,
        ..RunCounts::default()
    };
    for job in jobs {
        match job.phase {
            JobPhase::Pending => counts.pending += 1,
            JobPhase::Running | JobPhase::Rebooting => counts.running += 1,
            JobPhase::Succeeded => counts.succeeded += 1,
            JobPhase::Failed => counts.failed += 1,
            JobPhase::Unknown => counts.unknown += 1,
        }
    }
    let failures = jobs.iter().filter(|j| is_failure(j.phase)).count() as i32;
    let in_flight = jobs.iter().filter(|j| !j.phase.is_finished()).count() as i32;
    let halted = failures > budget;

    let waiting: Vec<Assignment> = selected
        .into_iter()
        .filter(|a| !with_job.contains(a.agent.as_str()))
        .collect();
    let room = if halted || suspended {
        0
    } else {
        (concurrency - in_flight).max(0) as usize
    };
    let create: Vec<Assignment> = waiting.iter().take(room).cloned().collect();
    // Jobs about to be created and hosts still waiting are both pending.
    counts.pending += waiting.len() as i32;

    let unfinished = in_flight > 0 || !create.is_empty();
    let phase = if halted {
        // Halted while jobs finish; Failed once nothing is left, Halted for good when hosts were left out.
        if unfinished || !waiting.is_empty() {
            RunPhase::Halted
        } else {
            RunPhase::Failed
        }
    } else if unfinished || !waiting.is_empty() {
        RunPhase::Running
    } else if failures > 0 {
        RunPhase::Failed
    } else {
        RunPhase::Succeeded
    };
    RolloutDecision {
        create,
        counts,
        phase,
        max_concurrent: concurrency,
        max_failures: budget,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use proptest::prelude::*;

    fn target(name: &str, os: OperatingSystem, group: Option<&str>, priority: i32) -> PlanTarget {
        PlanTarget {
            name: name.into(),
            selector: LabelSelector {
                match_labels: group.map(|g| BTreeMap::from([("group".to_string(), g.to_string())])),
                match_expressions: None,
            },
            os,
            workflow_ref: None,
            priority,
        }
    }

    fn agent(name: &str, os: OperatingSystem, group: &str, paused: bool) -> FleetAgent {
        FleetAgent {
            name: name.into(),
            os,
            labels: BTreeMap::from([("group".to_string(), group.to_string())]),
            paused,
            permitted: true,
        }
    }

    #[test]
    fn hosts_that_do_not_accept_the_plans_namespace_are_counted_not_run() {
        let targets = [target("all", OperatingSystem::Linux, Some("web"), 1)];
        let mut locked = agent("b", OperatingSystem::Linux, "web", false);
        locked.permitted = false;
        let agents = [agent("a", OperatingSystem::Linux, "web", false), locked];
        let decision = plan_rollout(
            &targets,
            &IntOrString::Int(10),
            &IntOrString::Int(0),
            false,
            &agents,
            &[],
        );
        assert_eq!(decision.create.len(), 1);
        assert_eq!(decision.create[0].agent, "a");
        assert_eq!(decision.counts.not_permitted, 1);
        assert_eq!(decision.counts.total, 1, "not part of the run");
    }

    #[test]
    fn percentages_are_clamped_never_overflowed() {
        assert_eq!(
            resolve_limit(
                &IntOrString::String("99999999999999999%".into()),
                i32::MAX,
                true
            ),
            i32::MAX
        );
        assert_eq!(
            resolve_limit(&IntOrString::String("-5%".into()), 10, true),
            0
        );
    }

    #[test]
    fn percentages_round_up_for_concurrency_and_down_for_failures() {
        assert_eq!(
            resolve_limit(&IntOrString::String("25%".into()), 10, true),
            3
        );
        assert_eq!(
            resolve_limit(&IntOrString::String("25%".into()), 10, false),
            2
        );
        assert_eq!(resolve_limit(&IntOrString::Int(4), 10, true), 4);
        assert_eq!(
            resolve_limit(&IntOrString::String("100%".into()), 7, true),
            7
        );
    }

    #[test]
    fn higher_priority_groups_go_first_and_hosts_are_taken_once() {
        let targets = [
            target("low", OperatingSystem::Linux, None, 1),
            target("high", OperatingSystem::Linux, Some("web"), 10),
        ];
        let agents = [
            agent("a", OperatingSystem::Linux, "web", false),
            agent("b", OperatingSystem::Linux, "db", false),
            agent("c", OperatingSystem::Linux, "web", true),
            agent("w", OperatingSystem::Windows, "web", false),
        ];
        let Selection {
            selected, paused, ..
        } = select_hosts(&targets, &agents);
        assert_eq!(
            selected,
            [
                Assignment {
                    agent: "a".into(),
                    target: 1
                },
                Assignment {
                    agent: "b".into(),
                    target: 0
                }
            ]
        );
        assert_eq!(paused, ["c"]);
    }

    #[test]
    fn a_run_halts_when_failures_exceed_the_budget() {
        let targets = [target("all", OperatingSystem::Linux, None, 0)];
        let agents: Vec<FleetAgent> = (0..5)
            .map(|i| agent(&format!("h{i}"), OperatingSystem::Linux, "x", false))
            .collect();
        let jobs = [
            RunJob {
                agent: "h0".into(),
                phase: JobPhase::Failed,
            },
            RunJob {
                agent: "h1".into(),
                phase: JobPhase::Running,
            },
        ];
        let decision = plan_rollout(
            &targets,
            &IntOrString::Int(2),
            &IntOrString::Int(0),
            false,
            &agents,
            &jobs,
        );
        assert!(decision.create.is_empty());
        assert_eq!(decision.phase, RunPhase::Halted);
        let decision = plan_rollout(
            &targets,
            &IntOrString::Int(2),
            &IntOrString::Int(1),
            false,
            &agents,
            &jobs,
        );
        assert_eq!(
            decision.create,
            [Assignment {
                agent: "h2".into(),
                target: 0
            }]
        );
        assert_eq!(decision.phase, RunPhase::Running);
    }

    #[derive(Clone, Debug)]
    struct Fleet {
        agents: Vec<FleetAgent>,
        targets: Vec<PlanTarget>,
        max_concurrent: IntOrString,
        max_failures: IntOrString,
        /// Outcome of each agent's job: true = fails.
        fails: Vec<bool>,
    }

    fn limit(max: i32, allow_zero: bool) -> impl Strategy<Value = IntOrString> {
        let low = if allow_zero { 0 } else { 1 };
        prop_oneof![
            (low..=max).prop_map(IntOrString::Int),
            (low..=100).prop_map(|p| IntOrString::String(format!("{p}%")))
        ]
    }

    fn fleet() -> impl Strategy<Value = Fleet> {
        let os = prop_oneof![Just(OperatingSystem::Linux), Just(OperatingSystem::Windows)];
        let group = prop_oneof![Just("web"), Just("db"), Just("edge")];
        let agents = prop::collection::vec(
            (os.clone(), group.clone(), prop::bool::weighted(0.1)),
            0..60,
        );
        let targets = prop::collection::vec((os, prop::option::of(group), 0..5i32), 1..4);
        (agents, targets, limit(12, false), limit(6, true))
            .prop_flat_map(|(agents, targets, max_concurrent, max_failures)| {
                let count = agents.len();
                (
                    Just((agents, targets, max_concurrent, max_failures)),
                    prop::collection::vec(prop::bool::weighted(0.2), count),
                )
            })
            .prop_map(
                |((agents, targets, max_concurrent, max_failures), fails)| Fleet {
                    agents: agents
                        .into_iter()
                        .enumerate()
                        .map(|(i, (os, group, paused))| {
                            agent(&format!("host-{i:03}"), os, group, paused)
                        })
                        .collect(),
                    targets: targets
                        .into_iter()
                        .enumerate()
                        .map(|(i, (os, group, p))| target(&format!("t{i}"), os, group, p))
                        .collect(),
                    max_concurrent,
                    max_failures,
                    fails,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Simulates whole runs: jobs finish a few at a time in random order.
        #[test]
        fn the_concurrency_cap_and_the_error_budget_always_hold(fleet in fleet(), finish_order in prop::collection::vec(0usize..1000, 200)) {
            let mut jobs: Vec<RunJob> = Vec::new();
            let mut started_after_halt = false;
            let mut step = 0;
            loop {
                let decision = plan_rollout(&fleet.targets, &fleet.max_concurrent, &fleet.max_failures, false, &fleet.agents, &jobs);
                let failures = jobs.iter().filter(|j| is_failure(j.phase)).count() as i32;
                let in_flight = jobs.iter().filter(|j| !j.phase.is_finished()).count() as i32;
                prop_assert!(in_flight + decision.create.len() as i32 <= decision.max_concurrent, "concurrency cap broken");
                if failures > decision.max_failures && !decision.create.is_empty() {
                    started_after_halt = true;
                }
                for assignment in &decision.create {
                    prop_assert!(!jobs.iter().any(|j| j.agent == assignment.agent), "a host got a second job");
                    let agent = fleet.agents.iter().find(|a| a.name == assignment.agent).unwrap();
                    prop_assert!(!agent.paused, "a paused agent got a job");
                    prop_assert_eq!(agent.os, fleet.targets[assignment.target].os);
                    jobs.push(RunJob { agent: assignment.agent.clone(), phase: JobPhase::Running });
                }
                let running: Vec<usize> = jobs.iter().enumerate().filter(|(_, j)| !j.phase.is_finished()).map(|(i, _)| i).collect();
                if running.is_empty() {
                    let Selection { selected, paused, .. } = select_hosts(&fleet.targets, &fleet.agents);
                    let total_failures = jobs.iter().filter(|j| is_failure(j.phase)).count() as i32;
                    if decision.phase == RunPhase::Halted || decision.phase == RunPhase::Failed && total_failures > decision.max_failures {
                        // Halted: the failures that stopped the run are at most the budget plus what was in flight.
                        prop_assert!(total_failures <= decision.max_failures + decision.max_concurrent);
                    } else {
                        prop_assert_eq!(jobs.len(), selected.len(), "every selected host got a job");
                        prop_assert_eq!(decision.counts.paused as usize, paused.len());
                        prop_assert_eq!(decision.counts.succeeded + decision.counts.failed, jobs.len() as i32);
                    }
                    break;
                }
                // Finish one running job, chosen by the random order.
                let pick = running[finish_order[step % finish_order.len()] % running.len()];
                let index = fleet.agents.iter().position(|a| a.name == jobs[pick].agent).unwrap();
                jobs[pick].phase = if fleet.fails[index] { JobPhase::Failed } else { JobPhase::Succeeded };
                step += 1;
            }
            prop_assert!(!started_after_halt, "a job started after failures exceeded maxFailures");
        }
    }
}
