//! The whole loop with real processes: the real control plane (or `fleetpatch dev`),
//! `fleetpatch controller` with the chart's RBAC, and `fleetpatch agent run` processes
//! on this host, driven and inspected with kubectl like a person would.

#![cfg(feature = "full")]

mod support;

use std::process::Command;
use std::time::Duration;

use support::e2e::curl;
use support::fleet::{Fleet, plan, script, workflow};
use support::{Kubectl, eventually};

fn base_manifests() -> String {
    script("hello", "echo \"hello from $FLEETPATCH_JOB\"")
        + &script("check", "echo checked; exit 0")
        + &script("broken", "echo 'disk on fire' >&2; exit 4")
        + &workflow("web-flow", &["hello"], &["check"])
        + &workflow("db-flow", &["check"], &["hello"])
        + &workflow("failing-flow", &["broken"], &["check"])
}

#[test]
fn a_plan_rolls_out_to_two_groups_and_results_flow_back() {
    let fleet = Fleet::start();
    let _controller = fleet.controller();
    let _agents = [
        fleet.agent("web-1", "web"),
        fleet.agent("web-2", "web"),
        fleet.agent("db-1", "db"),
    ];
    fleet.wait_for_agents(3);
    fleet.apply(&base_manifests());
    fleet.apply(&plan(
        "weekly",
        &[("web", "web", "web-flow", 10), ("db", "db", "db-flow", 5)],
        2,
        0,
    ));
    let ready = eventually(Duration::from_secs(30), || {
        fleet.get(&[
            "get",
            "workflow",
            "web-flow",
            "-o",
            "jsonpath={.status.activePlans}",
        ]) == "1"
    });
    assert!(
        ready,
        "the workflow does not count its plan:\n{}",
        fleet.get(&["get", "workflows", "-o", "yaml"])
    );
    fleet.run_plan("weekly");
    assert_eq!(fleet.wait_for_run("weekly", &["Succeeded"]), "Succeeded");

    let jobs = fleet.get(&["get", "patchjobs"]);
    let header = jobs.lines().next().unwrap();
    for column in ["NAME", "PLAN", "AGENT", "PHASE", "ACTIONS", "AGE"] {
        assert!(header.contains(column), "{jobs}");
    }
    assert_eq!(
        jobs.lines()
            .filter(|l| l.contains("Succeeded") && l.contains("2/2"))
            .count(),
        3,
        "{jobs}"
    );
    let wait = fleet.cluster.kubectl(&[
        "wait",
        "--for=condition=Complete",
        "patchjobs",
        "--all",
        "--timeout=30s",
    ]);
    assert!(
        wait.status.success(),
        "{}",
        String::from_utf8_lossy(&wait.stderr)
    );
    let describe = fleet.get(&["describe", "patchjobs", "-l", "fleetpatch.io/agent=web-1"]);
    assert!(
        describe.contains("Exit Code:") && describe.contains("hello from default/weekly-"),
        "{describe}"
    );
    let counts = fleet.get(&["get", "rplan", "weekly", "-o", "jsonpath={.status.currentRun.counts.total} {.status.currentRun.counts.succeeded} {.status.currentRun.counts.failed}"]);
    assert_eq!(counts, "3 3 0");
    let events = fleet.get(&[
        "get",
        "events.events.k8s.io",
        "-o",
        "jsonpath={.items[*].reason}",
    ]);
    assert!(
        events.contains("RunStarted") && events.contains("RunSucceeded"),
        "{events}"
    );
    let metrics = reqwest_get(&format!("{}/metrics", fleet.metrics.lock().unwrap()));
    assert!(
        metrics.contains("fleetpatch_patchjobs_created_total 3"),
        "metrics at {:?}: {metrics}",
        fleet.metrics.lock().unwrap()
    );
}

fn reqwest_get(url: &str) -> String {
    let output = Command::new("curl").args(["-s", url]).output();
    match output {
        Ok(output) => String::from_utf8_lossy(&output.stdout).into_owned(),
        Err(_) => String::new(),
    }
}

/// Reasons in the `Events:` table of `kubectl describe`, top to bottom.
fn described_reasons(describe: &str) -> Vec<String> {
    let Some((_, events)) = describe.split_once("\nEvents:") else {
        return Vec::new();
    };
    events
        .lines()
        .skip_while(|line| !line.trim_start().starts_with("----"))
        .skip(1)
        .filter_map(|line| line.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

#[test]
fn kubectl_describe_tells_a_jobs_story_in_order() {
    let fleet = Fleet::start();
    let log = fleet.home.path().join("controller.log");
    let _controller = fleet.controller_logging(&log);
    let reboots = ["--simulate-reboot", "--allow-reboot"];
    let mut agent = fleet.agent_with("story-1", "story", &reboots);
    fleet.wait_for_agents(1);
    fleet.apply(
        &(script("broken", "echo 'disk on fire' >&2; exit 4") + &script("check", "echo ok")),
    );
    fleet.apply("apiVersion: fleetpatch.io/v1alpha1\nkind: Workflow\nmetadata: {name: story-flow}\nspec:\n  os: Linux\n  preTasks: [{taskRef: {name: broken}}]\n  postTasks: [{taskRef: {name: check}}]\n  failurePolicy: {pre: Continue, runPostTasksAfterPatchFailure: true}\n");
    fleet.apply(&support::fleet::plan_with_reboot(
        "story",
        "story",
        "story-flow",
        "Always",
    ));
    fleet.run_plan("story");
    assert_eq!(
        agent.wait_exit(Duration::from_secs(60)),
        Some(3),
        "the host did not (pretend to) reboot"
    );
    let _back = fleet.agent_with("story-1", "story", &reboots);
    fleet.wait_for_run("story", &["Failed"]);
    let expected = [
        "Assigned",
        "Started",
        "ActionFailed",
        "Rebooting",
        "RebootCompleted",
        "Failed",
    ];
    let mut describe = String::new();
    let told = eventually(Duration::from_secs(30), || {
        describe = fleet.get(&["describe", "patchjobs", "-l", "fleetpatch.io/agent=story-1"]);
        described_reasons(&describe).len() >= expected.len()
    });
    assert!(told, "the job's Events did not all arrive:\n{describe}");
    assert_eq!(described_reasons(&describe), expected, "{describe}");
    let events = describe.split_once("\nEvents:").unwrap().1;
    assert!(
        events.contains("assigned to agent story-1")
            && events.contains("pre action broken failed with exit code 4: disk on fire")
            && events.contains("fleetpatch-controller"),
        "{events}"
    );

    // The controller's JSON log: every line about the job names it, its run and agent.
    let job = fleet.get(&["get", "pj", "-o", "jsonpath={.items[0].metadata.name}"]);
    let run = fleet.get(&["get", "pj", "-o", "jsonpath={.items[0].spec.run}"]);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let about_job: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|line| line["name"] == job.as_str())
        .collect();
    for reason in ["Assigned", "ActionFailed"] {
        assert!(
            about_job
                .iter()
                .any(|line| line["message"] == "job event" && line["reason"] == reason),
            "the log line of the job's {reason} Event does not name the job:\n{text}"
        );
    }
    for line in about_job {
        assert_eq!(line["kind"], "PatchJob", "{line}");
        assert_eq!(line["namespace"], "default", "{line}");
        assert_eq!(line["run"], run.as_str(), "{line}");
        assert_eq!(line["agent"], "story-1", "{line}");
    }
}

#[test]
fn a_failing_group_halts_at_max_failures() {
    let fleet = Fleet::start();
    let _controller = fleet.controller();
    let _agents = [
        fleet.agent("f-1", "bad"),
        fleet.agent("f-2", "bad"),
        fleet.agent("f-3", "bad"),
    ];
    fleet.wait_for_agents(3);
    fleet.apply(&base_manifests());
    fleet.apply(&plan("risky", &[("bad", "bad", "failing-flow", 0)], 1, 0));
    fleet.run_plan("risky");
    assert_eq!(fleet.wait_for_run("risky", &["Halted"]), "Halted");
    let jobs = fleet.get(&["get", "pj", "-o", "jsonpath={.items[*].status.phase}"]);
    assert_eq!(jobs, "Failed", "one job failed and no other started");
    let failures = fleet.get(&[
        "get",
        "rplan",
        "risky",
        "-o",
        "jsonpath={.status.currentRun.failures[0].reason}",
    ]);
    assert!(failures.contains("action broken failed"), "{failures}");
    let message = fleet.get(&[
        "get",
        "pj",
        "-o",
        "jsonpath={.items[0].status.preActions[0].message}",
    ]);
    assert_eq!(message, "disk on fire");
}

#[test]
fn an_agent_killed_mid_job_reports_interrupted_after_restart() {
    let fleet = Fleet::start();
    let _controller = fleet.controller();
    let mut agent = fleet.agent("slow-1", "slow");
    fleet.wait_for_agents(1);
    // `pre: Continue` so the job goes on after the interrupted action and can finish.
    fleet.apply(&(script("slow", "sleep 60") + &script("after", "echo after")));
    fleet.apply("apiVersion: fleetpatch.io/v1alpha1\nkind: Workflow\nmetadata: {name: slow-flow}\nspec:\n  os: Linux\n  preTasks: [{taskRef: {name: slow}}, {taskRef: {name: after}}]\n  failurePolicy: {pre: Continue}\n");
    fleet.apply(&plan(
        "slow-plan",
        &[("slow", "slow", "slow-flow", 0)],
        1,
        1,
    ));
    fleet.run_plan("slow-plan");
    let running = eventually(Duration::from_secs(30), || {
        fleet.get(&[
            "get",
            "pj",
            "-o",
            "jsonpath={.items[0].status.preActions[0].phase}",
        ]) == "Running"
    });
    assert!(running, "{}", fleet.get(&["get", "pj", "-o", "yaml"]));
    agent.kill9();
    let _agent = fleet.agent("slow-1", "slow");
    fleet.wait_for_run("slow-plan", &["Failed"]);
    let phases = fleet.get(&[
        "get",
        "pj",
        "-o",
        "jsonpath={.items[0].status.preActions[*].phase}",
    ]);
    assert_eq!(phases, "Interrupted Succeeded");
    let message = fleet.get(&[
        "get",
        "pj",
        "-o",
        "jsonpath={.items[0].status.preActions[0].message}",
    ]);
    assert!(message.contains("it was not run again"), "{message}");
}

#[test]
fn a_restarted_controller_creates_no_duplicate_and_loses_no_result() {
    let fleet = Fleet::start();
    let mut controller = fleet.controller();
    let _agents = [
        fleet.agent("r-1", "r"),
        fleet.agent("r-2", "r"),
        fleet.agent("r-3", "r"),
    ];
    fleet.wait_for_agents(3);
    fleet
        .apply(&(script("pause", "sleep 2; echo done") + &workflow("pause-flow", &["pause"], &[])));
    fleet.apply(&plan("restart", &[("r", "r", "pause-flow", 0)], 1, 0));
    fleet.run_plan("restart");
    let started = eventually(Duration::from_secs(30), || {
        !fleet.get(&["get", "pj", "-o", "name"]).is_empty()
    });
    assert!(started);
    controller.kill9();
    // A new controller takes over once the old lease expires.
    let _controller = fleet.controller();
    fleet.wait_for_run("restart", &["Succeeded"]);
    let names = fleet.get(&["get", "pj", "-o", "jsonpath={.items[*].spec.agent}"]);
    let mut agents: Vec<&str> = names.split_whitespace().collect();
    agents.sort();
    assert_eq!(agents, ["r-1", "r-2", "r-3"], "exactly one job per host");
    let phases = fleet.get(&["get", "pj", "-o", "jsonpath={.items[*].status.phase}"]);
    assert_eq!(phases, "Succeeded Succeeded Succeeded");
}

#[test]
fn an_agent_cannot_read_or_report_another_agents_job() {
    let fleet = Fleet::start();
    let _controller = fleet.controller();
    let _agents = [
        fleet.agent("owner", "own"),
        fleet.agent("intruder", "other"),
    ];
    fleet.wait_for_agents(2);
    fleet.apply(&(script("pause", "sleep 3") + &workflow("pause-flow", &["pause"], &[])));
    fleet.apply(&plan("mine", &[("own", "own", "pause-flow", 0)], 1, 0));
    fleet.run_plan("mine");
    let mut uid = String::new();
    assert!(eventually(Duration::from_secs(30), || {
        uid = fleet.get(&["get", "pj", "-o", "jsonpath={.items[0].metadata.uid}"]);
        !uid.is_empty()
    }));
    let credential: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fleet.state_dir("intruder").join("credential.json")).unwrap(),
    )
    .unwrap();
    let bearer = format!(
        "Bearer intruder.{}",
        credential["credential"].as_str().unwrap()
    );
    let assignments = curl(&[
        "-H",
        &format!("Authorization: {bearer}"),
        &format!("{}/agent/v1/assignments", fleet.gateway),
    ]);
    assert!(
        assignments.ends_with("200") && !assignments.contains(&uid),
        "{assignments}"
    );
    let report = curl(&[
        "-X",
        "POST",
        "-H",
        &format!("Authorization: {bearer}"),
        "-H",
        "Content-Type: application/json",
        "-d",
        "{\"sequence\": 999, \"status\": {\"phase\": \"Succeeded\"}}",
        &format!("{}/agent/v1/jobs/{uid}/progress", fleet.gateway),
    ]);
    assert!(report.ends_with("403"), "{report}");
    let wrong = curl(&[
        "-H",
        "Authorization: Bearer owner.not-the-credential",
        &format!("{}/agent/v1/assignments", fleet.gateway),
    ]);
    assert!(wrong.ends_with("401"), "{wrong}");
    fleet.wait_for_run("mine", &["Succeeded"]);
    let sequence = fleet.get(&[
        "get",
        "pj",
        "-o",
        "jsonpath={.items[0].status.lastSequence}",
    ]);
    assert_ne!(sequence, "999", "the intruder's report changed nothing");
}

#[test]
fn a_single_use_bootstrap_token_admits_one_host_and_stays_marked() {
    let fleet = Fleet::start();
    fleet.apply(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: once, namespace: fleetpatch-system}\ntype: fleetpatch.io/bootstrap-token\nstringData: {token: only-once}\n",
    );
    let _controller = fleet.controller();
    let register = |name: &str| {
        curl(&[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            &format!("{{\"name\":\"{name}\",\"os\":\"Linux\",\"bootstrapToken\":\"only-once\"}}"),
            &format!("{}/agent/v1/register", fleet.gateway),
        ])
    };
    // The gateway listens once the controller leads and has filled its caches.
    let mut first = String::new();
    eventually(Duration::from_secs(30), || {
        first = register("first-host");
        !first.ends_with("000")
    });
    assert!(first.ends_with("200"), "{first}");
    let second = register("second-host");
    assert!(second.ends_with("401"), "{second}");
    // The same answer as for any bad token: nothing to learn about which tokens exist.
    assert!(second.contains("{\"error\":\"unauthorized\"}"), "{second}");
    let unknown = curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-d",
        "{\"name\":\"third-host\",\"os\":\"Linux\",\"bootstrapToken\":\"never-issued\"}",
        &format!("{}/agent/v1/register", fleet.gateway),
    ]);
    assert_eq!(unknown, second, "a used and an unknown token look the same");
    // The Secret stays, marked, so re-applying it from Git does not make it valid again.
    assert_eq!(
        fleet.get(&[
            "-n",
            "fleetpatch-system",
            "get",
            "secret",
            "once",
            "-o",
            "jsonpath={.metadata.annotations.fleetpatch\\.io/used-by}",
        ]),
        "first-host"
    );
    fleet.get(&["get", "agent", "first-host"]);
    assert!(
        fleet
            .cluster
            .kubectl_err(&["get", "agent", "second-host"])
            .contains("NotFound")
    );
}

/// `fleetpatch duplicate` against the cluster, as a user runs it.
fn duplicate(fleet: &Fleet, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fleetpatch"))
        .arg("duplicate")
        .args(args)
        .env("KUBECONFIG", &fleet.cluster.kubeconfig)
        .output()
        .unwrap()
}

/// The built-in library cannot be edited in place: a team duplicates a built-in
/// workflow into its namespace, first as manifests for its GitOps repository (which
/// `validate` accepts as they are), then into the cluster. The copy owns its tasks and
/// scripts, is no default, and a second copy under the same names creates nothing.
#[test]
fn a_built_in_workflow_is_duplicated_into_a_team_namespace() {
    let fleet = Fleet::start();
    let _controller = fleet.controller();
    let installed = eventually(Duration::from_secs(60), || {
        !fleet
            .get(&[
                "get",
                "workflow",
                "linux-default",
                "-n",
                "fleetpatch-system",
                "-o",
                "name",
                "--ignore-not-found",
            ])
            .is_empty()
    });
    assert!(installed, "the controller installs the built-in library");
    let args = [
        "workflow",
        "linux-default",
        "my-linux",
        "-n",
        "default",
        "--from-namespace",
        "fleetpatch-system",
        "--deep",
    ];
    let printed = duplicate(&fleet, &[&args[..], &["-o", "yaml"]].concat());
    assert!(
        printed.status.success(),
        "{}",
        String::from_utf8_lossy(&printed.stderr)
    );
    let manifests = fleet.home.path().join("my-linux.yaml");
    std::fs::write(&manifests, &printed.stdout).unwrap();
    let validated = Command::new(env!("CARGO_BIN_EXE_fleetpatch"))
        .args(["validate", "--library-namespace", "fleetpatch-system", "-f"])
        .arg(&manifests)
        .output()
        .unwrap();
    assert!(
        validated.status.success(),
        "{}{}",
        String::from_utf8_lossy(&validated.stdout),
        String::from_utf8_lossy(&printed.stdout)
    );
    assert!(
        fleet
            .get(&["get", "workflow", "-n", "default", "-o", "name"])
            .is_empty(),
        "-o yaml creates nothing"
    );

    let created = duplicate(&fleet, &args);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let said = String::from_utf8_lossy(&created.stdout);
    assert!(said.contains("Workflow default/my-linux created"), "{said}");
    assert_eq!(
        fleet.get(&[
            "get",
            "workflow",
            "my-linux",
            "-n",
            "default",
            "-o",
            "jsonpath={.spec.default}"
        ]),
        "false"
    );
    let tasks = fleet.get(&[
        "get",
        "workflow",
        "my-linux",
        "-n",
        "default",
        "-o",
        "jsonpath={.spec.postTasks[*].taskRef.name}",
    ]);
    assert!(!tasks.is_empty());
    for task in tasks.split(' ') {
        assert!(task.starts_with("my-linux-"), "{tasks}");
        assert_eq!(
            fleet
                .get(&["get", "task", task, "-n", "default", "-o", "name"])
                .trim(),
            format!("task.fleetpatch.io/{task}")
        );
    }
    assert!(
        fleet
            .get(&[
                "get",
                "script",
                "-n",
                "default",
                "-l",
                "fleetpatch.io/builtin",
                "-o",
                "name"
            ])
            .is_empty(),
        "copies are not built-in"
    );
    let again = duplicate(&fleet, &args);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("nothing was created") && stderr.contains("already exist"),
        "{stderr}"
    );
}

/// A plan target without a workflowRef gets the default workflow for its hosts' OS: its
/// own namespace's when there is one, else the built-in library's.
#[test]
fn a_target_without_a_workflow_gets_its_namespace_default_else_the_library_default() {
    let fleet = Fleet::start();
    let _controller = fleet.controller();
    // The library's default ends with a reboot-if-required task: simulated here.
    let _agent = fleet.agent_with("web-1", "web", &["--simulate-reboot"]);
    fleet.wait_for_agents(1);
    fleet.get(&[
        "patch",
        "agent",
        "web-1",
        "--type=merge",
        "-p",
        r#"{"spec":{"allowedPlans":{"namespaces":{"from":"All","selector":null}}}}"#,
    ]);
    fleet.get(&["create", "namespace", "team-b"]);
    fleet.apply(
        &(script("mark", "echo marked")
            + "apiVersion: fleetpatch.io/v1alpha1\nkind: Workflow\nmetadata: {name: team-default}\nspec:\n  os: Linux\n  default: true\n  preTasks: [{taskRef: {name: mark}}]\n"),
    );
    let untargeted = |namespace: &str| {
        format!(
            "apiVersion: fleetpatch.io/v1alpha1\nkind: RemediationPlan\nmetadata: {{name: p, namespace: {namespace}}}\nspec:\n  targets:\n  - {{name: web, os: Linux, selector: {{matchLabels: {{fleetpatch.io/group: web}}}}}}\n  patches: {{skip: true}}\n  rollout: {{maxConcurrent: 1, maxFailures: 0}}\n  reboot: {{policy: Never}}\n"
        )
    };
    for namespace in ["default", "team-b"] {
        fleet.apply(&untargeted(namespace));
        support::e2e::run_plan_in(&fleet.cluster.kubeconfig, namespace, "p");
        let finished = eventually(Duration::from_secs(90), || {
            let phase = fleet.get(&[
                "get",
                "rplan",
                "p",
                "-n",
                namespace,
                "-o",
                "jsonpath={.status.currentRun.phase}",
            ]);
            let done = fleet.get(&[
                "get",
                "rplan",
                "p",
                "-n",
                namespace,
                "-o",
                "jsonpath={.status.currentRun.completionTime}",
            ]);
            phase == "Succeeded" && !done.is_empty()
        });
        assert!(
            finished,
            "{}",
            fleet.get(&["get", "pj", "-n", namespace, "-o", "yaml"])
        );
    }
    let workflow_of = |namespace: &str| {
        fleet.get(&[
            "get",
            "pj",
            "-n",
            namespace,
            "-o",
            "jsonpath={.items[0].spec.workflow.namespace}/{.items[0].spec.workflow.name}",
        ])
    };
    assert_eq!(workflow_of("default"), "default/team-default");
    assert_eq!(workflow_of("team-b"), "fleetpatch-system/linux-default");
    assert_eq!(
        fleet.get(&[
            "get",
            "pj",
            "-n",
            "default",
            "-o",
            "jsonpath={.items[0].status.preActions[0].name}"
        ]),
        "mark"
    );
}
