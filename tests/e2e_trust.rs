//! The trust boundaries, tried as an attacker would over real HTTP against the real
//! controller on the real control plane: a hostile agent (reports, registrations), a
//! hostile plan author (plans and PatchJobs in their own namespace), a hostile network
//! (slow headers, floods of bad credentials), and the controls a person has (revoking
//! a host, deleting a job, pausing an agent, stopping the leader).

#![cfg(feature = "full")]

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::e2e::{curl, free_port};
use support::fleet::{Fleet, plan, script, workflow};
use support::{Kubectl, eventually};

/// `curl` split into (HTTP status, body).
fn call(args: &[&str]) -> (u16, String) {
    let out = curl(args);
    let (body, status) = out.rsplit_once('\n').unwrap_or(("", &out));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

fn post(url: &str, headers: &[&str], body: &str) -> (u16, String) {
    let mut args = vec![
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-d",
        body,
    ];
    for header in headers {
        args.extend(["-H", header]);
    }
    args.push(url);
    call(&args)
}

fn get(url: &str, headers: &[&str]) -> (u16, String) {
    let mut args = Vec::new();
    for header in headers {
        args.extend(["-H", *header]);
    }
    args.push(url);
    call(&args)
}

/// The first PatchJob's uid once its first action runs.
fn running_job(fleet: &Fleet) -> String {
    // Until the plan's job exists the jsonpath has nothing to index: keep asking.
    let running = eventually(Duration::from_secs(60), || {
        let output = fleet.cluster.kubectl(&[
            "get",
            "pj",
            "-o",
            "jsonpath={.items[0].status.preActions[0].phase}",
        ]);
        output.status.success() && output.stdout == b"Running"
    });
    assert!(running, "{}", fleet.get(&["get", "pj", "-o", "yaml"]));
    fleet.get(&["get", "pj", "-o", "jsonpath={.items[0].metadata.uid}"])
}

fn this_year() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y")
        .to_string()
}

#[test]
fn hostile_reports_are_checked_and_a_finished_job_is_final() {
    let fleet = Fleet::start();
    let mut controller = fleet.controller();
    let _agent = fleet.agent("web-1", "web");
    fleet.wait_for_agents(1);
    fleet.apply(&(script("nap", "sleep 60") + &workflow("nap-flow", &["nap"], &[])));
    fleet.apply(&plan("p", &[("web", "web", "nap-flow", 0)], 1, 0));
    fleet.run_plan("p");
    let uid = running_job(&fleet);
    let bearer = fleet.bearer("web-1");
    let url = format!("{}/agent/v1/jobs/{uid}/progress", fleet.gateway);
    let report = |body: &str| post(&url, &[&bearer], body);

    // What only the controller may say, sequences out of range, actions the job lacks.
    for (body, why) in [
        (
            r#"{"sequence": 1000, "status": {"phase": "Unknown"}}"#,
            "phase",
        ),
        (
            r#"{"sequence": 0, "status": {"phase": "Running"}}"#,
            "sequence",
        ),
        (
            r#"{"sequence": 9223372036854775807, "status": {"phase": "Running"}}"#,
            "sequence",
        ),
        (
            r#"{"sequence": 1001, "status": {"phase": "Running", "preActions": [{"name": "evil", "phase": "Succeeded"}]}}"#,
            "actions",
        ),
    ] {
        let (status, answer) = report(body);
        assert_eq!(status, 422, "{why}: {answer}");
    }
    // The report that once crash-looped the controller: times at the end of time.
    let (status, answer) = report(
        r#"{"sequence": 1002, "status": {"phase": "Succeeded", "message": "all good",
            "startTime": "0001-01-01T00:00:00Z", "completionTime": "9999-12-30T00:00:00Z",
            "preActions": [{"name": "nap", "phase": "Succeeded", "startTime": "9999-12-30T00:00:00Z", "finishTime": "9999-12-30T00:00:00Z"}],
            "conditions": [{"type": "Complete", "status": "True", "reason": "Forged", "message": "x", "lastTransitionTime": "9999-12-30T00:00:00Z"}]}}"#,
    );
    assert_eq!(status, 200, "{answer}");
    let done = eventually(Duration::from_secs(30), || {
        fleet.get(&["get", "pj", "-o", "jsonpath={.items[0].status.phase}"]) == "Succeeded"
    });
    assert!(done, "{}", fleet.get(&["get", "pj", "-o", "yaml"]));
    // Every time is the gateway's, or plausible; the conditions are the gateway's.
    let times = fleet.get(&[
        "get",
        "pj",
        "-o",
        "jsonpath={.items[0].status.completionTime} {.items[0].status.startTime} {.items[0].status.preActions[0].startTime} {.items[0].status.conditions[*].lastTransitionTime}",
    ]);
    for time in times.split_whitespace() {
        assert!(time.starts_with(&this_year()), "{time} in {times}");
    }
    let reasons = fleet.get(&[
        "get",
        "pj",
        "-o",
        "jsonpath={.items[0].status.conditions[*].reason}",
    ]);
    assert!(!reasons.contains("Forged"), "{reasons}");

    // Finished is final: a later report, however numbered, changes nothing.
    let (status, answer) =
        report(r#"{"sequence": 1003, "status": {"phase": "Failed", "message": "no, failed"}}"#);
    assert_eq!(status, 409, "{answer}");
    // The controller lived through it all and keeps working: it deletes nothing early,
    // and the run is counted.
    std::thread::sleep(Duration::from_secs(1));
    assert!(controller.running(), "the controller died");
    fleet.wait_for_run("p", &["Succeeded"]);
    assert_eq!(
        fleet.get(&["get", "pj", "-o", "jsonpath={.items[0].status.phase}"]),
        "Succeeded"
    );
}

#[test]
fn registration_never_replaces_an_agent_never_takes_a_node_and_spends_no_token_in_vain() {
    let fleet = Fleet::start();
    fleet.apply(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: once, namespace: fleetpatch-system}\ntype: fleetpatch.io/bootstrap-token\nstringData: {token: only-once}\n",
    );
    let _controller = fleet.controller();
    fleet.wait_for_gateway(&fleet.gateway);
    let register = |name: &str, token: &str| {
        post(
            &format!("{}/agent/v1/register", fleet.gateway),
            &[],
            &format!(r#"{{"name": "{name}", "os": "Linux", "bootstrapToken": "{token}"}}"#),
        )
    };
    let (status, first) = register("web-1", "let-me-in");
    assert_eq!(status, 200, "{first}");
    let credential: serde_json::Value = serde_json::from_str(&first).unwrap();
    let bearer = format!(
        "Authorization: Bearer web-1.{}",
        credential["credential"].as_str().unwrap()
    );
    let hash = || {
        fleet.get(&[
            "-n",
            "fleetpatch-system",
            "get",
            "secret",
            "fleetpatch-agent-web-1",
            "-o",
            "jsonpath={.data.credential-sha256}",
        ])
    };
    let stored = hash();
    // The same name again, with a valid token: refused, and nothing of web-1 changed.
    let (status, answer) = register("web-1", "let-me-in");
    assert_eq!(status, 409, "{answer}");
    assert_eq!(hash(), stored, "the credential was replaced");
    let heartbeat = || {
        post(
            &format!("{}/agent/v1/heartbeat", fleet.gateway),
            &[&bearer],
            r#"{"version": "1"}"#,
        )
    };
    assert_eq!(heartbeat().0, 200, "the real web-1 is locked out");
    // A node's name belongs to the node.
    fleet.apply("apiVersion: v1\nkind: Node\nmetadata: {name: node-x}\n");
    let (status, answer) = register("node-x", "let-me-in");
    assert_eq!(status, 409, "{answer}");
    assert!(
        fleet
            .cluster
            .kubectl(&["get", "agent", "node-x"])
            .status
            .code()
            != Some(0)
    );
    // A name that fits an object but not a label, with a single-use token: refused before
    // the token is looked at, so the token is still good for a valid name.
    let (status, answer) = register(&"a".repeat(64), "only-once");
    assert_eq!(status, 422, "{answer}");
    let used = || {
        fleet.get(&[
            "-n",
            "fleetpatch-system",
            "get",
            "secret",
            "once",
            "-o",
            "jsonpath={.metadata.annotations.fleetpatch\\.io/used-by}",
        ])
    };
    assert_eq!(used(), "");
    let (status, answer) = register("db-1", "only-once");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(used(), "db-1");
}

/// A socket from `source` that sends a request line and half its headers, never the rest.
fn slow_socket(gateway: SocketAddr, source: &str) -> Option<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    socket
        .bind(&SocketAddr::new(source.parse().unwrap(), 0).into())
        .ok()?;
    socket.connect(&gateway.into()).ok()?;
    let mut stream: TcpStream = socket.into();
    stream
        .write_all(b"GET /agent/v1/assignments HTTP/1.1\r\nHost: gateway\r\nX-Slow: ")
        .ok()?;
    Some(stream)
}

/// Whether the server closed `stream` (reads return end of file, or an error).
fn closed(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut buffer = [0u8; 256];
    !matches!(stream.read(&mut buffer), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut)
}

#[test]
fn slow_headers_and_many_sockets_cannot_hold_the_gateway() {
    let fleet = Fleet::start();
    let _controller = fleet.controller_with(
        "e2e-controller",
        &[
            "--gateway-header-timeout-seconds",
            "2",
            "--gateway-max-connections-per-source",
            "100",
        ],
    );
    fleet.wait_for_gateway(&fleet.gateway);
    let address: SocketAddr = format!("127.0.0.1:{}", fleet.gateway_port).parse().unwrap();
    // 300 sockets from one source: the first 100 are held, every one beyond is closed at once.
    let mut sockets: Vec<TcpStream> = (0..300)
        .filter_map(|_| slow_socket(address, "127.0.0.1"))
        .collect();
    assert_eq!(sockets.len(), 300);
    let beyond = sockets[150..]
        .iter_mut()
        .map(|s| closed(s, Duration::from_millis(500)))
        .filter(|closed| *closed)
        .count();
    assert_eq!(
        beyond, 150,
        "connections beyond the per-source cap must be closed at once"
    );
    // Another source is not starved meanwhile.
    let other = curl(&[
        "--interface",
        "127.0.0.2",
        &format!("{}/healthz", fleet.gateway),
    ]);
    assert!(other.ends_with("\n200"), "{other}");
    // The held ones are closed once their headers are overdue.
    let started = Instant::now();
    let held = sockets[..100]
        .iter_mut()
        .map(|s| closed(s, Duration::from_secs(5)))
        .filter(|closed| *closed)
        .count();
    assert_eq!(
        held, 100,
        "a socket that never finishes its headers must be closed"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // And the gateway serves normally afterwards.
    assert!(curl(&[&format!("{}/healthz", fleet.gateway)]).ends_with("\n200"));
}

#[test]
fn plans_reach_only_hosts_that_accept_their_namespace_and_forged_jobs_are_never_served() {
    let fleet = Fleet::start();
    fleet.apply(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: team-a, namespace: fleetpatch-system}\ntype: fleetpatch.io/bootstrap-token\nstringData: {token: team-a-hosts, usage: multi, plan-namespaces: team-a}\n",
    );
    for namespace in ["team-a", "team-b"] {
        fleet.cluster.create_namespace(namespace);
    }
    std::fs::write(fleet.home.path().join("token"), "team-a-hosts\n").unwrap();
    let _controller = fleet.controller();
    let _agent = fleet.agent("web-1", "web");
    fleet.wait_for_agents(1);
    let marker = fleet.home.path().join("forged-ran");
    let in_namespace = |namespace: &str, manifest: String| {
        let output = fleet
            .cluster
            .kubectl_stdin(&["apply", "-n", namespace, "-f", "-"], &manifest);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let manifests = script("hello", "echo hello") + &workflow("flow", &["hello"], &[]);
    in_namespace("team-a", manifests.clone());
    in_namespace("team-b", manifests);

    // team-b's plan selects web-1, which does not accept it: counted, not run.
    in_namespace("team-b", plan("grab", &[("web", "web", "flow", 0)], 5, 0));
    support::e2e::run_plan_in(&fleet.cluster.kubeconfig, "team-b", "grab");
    let skipped = eventually(Duration::from_secs(30), || {
        fleet.get(&[
            "-n",
            "team-b",
            "get",
            "rplan",
            "grab",
            "-o",
            "jsonpath={.status.currentRun.counts.notPermitted}",
        ]) == "1"
    });
    assert!(
        skipped,
        "{}",
        fleet.get(&["-n", "team-b", "get", "rplan", "grab", "-o", "yaml"])
    );
    assert_eq!(fleet.get(&["-n", "team-b", "get", "pj", "-o", "name"]), "");

    // Someone who may write PatchJobs in team-a writes one by hand for web-1.
    let forged = format!(
        "apiVersion: fleetpatch.io/v1alpha1\nkind: PatchJob\nmetadata: {{name: forged, namespace: team-a}}\nspec:\n  agent: web-1\n  plan: none\n  run: r1\n  os: Linux\n  patches: {{skip: true}}\n  reboot: Never\n  preActions:\n  - name: evil\n    task: {{name: evil}}\n    type: RunScript\n    timeoutMinutes: 1\n    successExitCodes: [0]\n    script:\n      source: {{name: evil}}\n      language: Bash\n      content: touch {}\n      sha256: {}\n",
        marker.display(),
        sha256(&format!("touch {}", marker.display()))
    );
    fleet.apply(&forged);
    let forged_uid = fleet.get(&[
        "-n",
        "team-a",
        "get",
        "pj",
        "forged",
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    // The agent asks for its jobs: the forged one is not among them.
    let (status, assignments) = get(
        &format!("{}/agent/v1/assignments", fleet.gateway),
        &[&fleet.bearer("web-1")],
    );
    assert_eq!(status, 200);
    assert!(!assignments.contains(&forged_uid), "{assignments}");
    let (status, answer) = post(
        &format!("{}/agent/v1/jobs/{forged_uid}/progress", fleet.gateway),
        &[&fleet.bearer("web-1")],
        r#"{"sequence": 1, "status": {"phase": "Running"}}"#,
    );
    // Unsigned, it is nobody's job: not even indexed, so it is not found.
    assert_eq!(status, 404, "{answer}");
    // A real job of team-a after it runs and finishes; by then the forged one would have
    // run too, had it been served.
    in_namespace("team-a", plan("legit", &[("web", "web", "flow", 0)], 5, 0));
    support::e2e::run_plan_in(&fleet.cluster.kubeconfig, "team-a", "legit");
    let finished = eventually(Duration::from_secs(60), || {
        fleet.get(&[
            "-n",
            "team-a",
            "get",
            "rplan",
            "legit",
            "-o",
            "jsonpath={.status.currentRun.phase}",
        ]) == "Succeeded"
    });
    assert!(
        finished,
        "{}",
        fleet.get(&["-n", "team-a", "get", "pj", "-o", "yaml"])
    );
    assert!(!marker.exists(), "the forged job ran");
    assert_eq!(
        fleet.get(&[
            "-n",
            "team-a",
            "get",
            "pj",
            "forged",
            "-o",
            "jsonpath={.status.phase}"
        ]),
        ""
    );
}

fn sha256(text: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(text.as_bytes()))
}

#[test]
fn a_revoked_credential_or_a_deleted_agent_shuts_the_host_out_within_seconds() {
    let fleet = Fleet::start();
    let _controller = fleet.controller();
    let _first = fleet.agent("web-1", "web");
    let _second = fleet.agent("web-2", "web");
    fleet.wait_for_agents(2);
    let heartbeat = |name: &str| {
        post(
            &format!("{}/agent/v1/heartbeat", fleet.gateway),
            &[&fleet.bearer(name)],
            r#"{"version": "1"}"#,
        )
        .0
    };
    assert_eq!(heartbeat("web-1"), 200);
    assert_eq!(heartbeat("web-2"), 200);
    fleet.get(&[
        "-n",
        "fleetpatch-system",
        "delete",
        "secret",
        "fleetpatch-agent-web-1",
    ]);
    assert!(
        eventually(Duration::from_secs(5), || heartbeat("web-1") == 401),
        "a deleted credential still works"
    );
    fleet.get(&["delete", "agent", "web-2"]);
    assert!(
        eventually(Duration::from_secs(5), || heartbeat("web-2") == 401),
        "a deleted Agent's credential still works"
    );
}

/// What the controller's ServiceAccount asked the API server, from the audit log: the
/// (verb, resource) of every request after `since` lines.
fn controller_requests(fleet: &Fleet, since: usize) -> Vec<(String, String)> {
    let log = fleet.cluster.audit_log().unwrap_or_default();
    log.lines()
        .skip(since)
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| {
            event["user"]["username"]
                == "system:serviceaccount:fleetpatch-system:fleetpatch-controller"
        })
        .map(|event| {
            (
                event["verb"].as_str().unwrap_or_default().to_string(),
                event["objectRef"]["resource"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

#[test]
fn requests_without_credentials_cost_no_api_calls_and_all_look_alike() {
    let fleet = Fleet::start();
    if !fleet.cluster.is_real() {
        return;
    }
    let _controller = fleet.controller_with(
        "e2e-controller",
        &[
            "--gateway-unauthenticated-rate",
            "1",
            "--gateway-unauthenticated-burst",
            "5",
        ],
    );
    fleet.wait_for_gateway(&fleet.gateway);
    std::thread::sleep(Duration::from_secs(2));
    let before = fleet
        .cluster
        .audit_log()
        .unwrap_or_default()
        .lines()
        .count();
    let mut answers = std::collections::BTreeMap::<u16, std::collections::BTreeSet<String>>::new();
    let heartbeat = format!("{}/agent/v1/heartbeat", fleet.gateway);
    for i in 0..40 {
        // Unknown agents, wrong credentials, node tokens nobody issued, bad bootstrap tokens.
        let (status, body) = post(
            &heartbeat,
            &[&format!("Authorization: Bearer ghost-{i}.secret")],
            "{}",
        );
        answers.entry(status).or_default().insert(body);
        let (status, body) = post(
            &heartbeat,
            &[
                "Authorization: Bearer forged-token",
                "x-fleetpatch-node: node-a",
            ],
            "{}",
        );
        answers.entry(status).or_default().insert(body);
        let (status, body) = post(
            &format!("{}/agent/v1/register", fleet.gateway),
            &[],
            &format!(r#"{{"name": "h-{i}", "os": "Linux", "bootstrapToken": "guess-{i}"}}"#),
        );
        answers.entry(status).or_default().insert(body);
    }
    let codes: Vec<u16> = answers.keys().copied().collect();
    assert!(codes.iter().all(|c| [401, 429].contains(c)), "{answers:?}");
    assert_eq!(answers[&401].len(), 1, "401s differ: {answers:?}");
    assert!(
        answers.contains_key(&429),
        "the flood was not throttled: {answers:?}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let made = controller_requests(&fleet, before);
    let reviews = made.iter().filter(|(_, r)| r == "tokenreviews").count();
    let secrets = made
        .iter()
        .filter(|(v, r)| r == "secrets" && v != "watch")
        .count();
    assert!(
        reviews <= 1,
        "one forged node token cost {reviews} TokenReviews: {made:?}"
    );
    assert_eq!(
        secrets, 0,
        "unknown bearers and bad bootstrap tokens were looked up: {made:?}"
    );
}

#[test]
fn a_deleted_job_is_stopped_on_its_host_and_never_made_again_in_its_run() {
    let fleet = Fleet::start();
    let _controller = fleet.controller();
    let _agent = fleet.agent("web-1", "web");
    fleet.wait_for_agents(1);
    let pid_file = fleet.home.path().join("nap.pid");
    let late = fleet.home.path().join("woke-up");
    fleet.apply(
        &(script(
            "nap",
            &format!(
                "echo $$ > {}; sleep 120; touch {}",
                pid_file.display(),
                late.display()
            ),
        ) + &workflow("nap-flow", &["nap"], &[])),
    );
    fleet.apply(&plan("p", &[("web", "web", "nap-flow", 0)], 1, 0));
    fleet.run_plan("p");
    running_job(&fleet);
    let name = fleet.get(&["get", "pj", "-o", "jsonpath={.items[0].metadata.name}"]);
    fleet.get(&["delete", "pj", &name, "--wait=false"]);
    // The host is told within a heartbeat or two: the action is killed, the job fails.
    let stopped = eventually(Duration::from_secs(20), || {
        fleet.get(&["get", "pj", &name, "-o", "jsonpath={.status.phase}"]) == "Failed"
    });
    assert!(stopped, "{}", fleet.get(&["get", "pj", "-o", "yaml"]));
    assert_eq!(
        fleet.get(&[
            "get",
            "pj",
            &name,
            "-o",
            "jsonpath={.status.preActions[0].phase}"
        ]),
        "Interrupted"
    );
    let message = fleet.get(&["get", "pj", &name, "-o", "jsonpath={.status.message}"]);
    assert!(message.starts_with("cancelled:"), "{message}");
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || !std::path::Path::new(&format!(
            "/proc/{}",
            pid.trim()
        ))
        .exists()),
        "the action's process still runs"
    );
    // The run ends without a second job for the host, and then the job goes.
    fleet.wait_for_run("p", &["Failed"]);
    assert!(
        eventually(Duration::from_secs(20), || fleet
            .get(&["get", "pj", "-o", "name"])
            .is_empty()),
        "{}",
        fleet.get(&["get", "pj", "-o", "yaml"])
    );
    assert_eq!(
        fleet.get(&[
            "get",
            "rplan",
            "p",
            "-o",
            "jsonpath={.status.currentRun.counts.total}"
        ]),
        "1"
    );
    assert!(!late.exists());
    // Its journal entry is gone from the host too (it is remembered as retired).
    let journal = fleet.state_dir("web-1").join("jobs");
    assert!(
        eventually(Duration::from_secs(10), || journal_entries(&journal) == 0),
        "the journal keeps the deleted job"
    );
}

/// Jobs in an agent's journal (not counting what it keeps of retired ones).
fn journal_entries(journal: &std::path::Path) -> usize {
    std::fs::read_dir(journal)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .count()
        })
        .unwrap_or(0)
}

/// Whoever may write PatchJobs in a namespace can copy a finished job — name, spec and
/// the controller's signature — delete it and create the copy. The gateway serves it
/// (it is signed and within its deadline), but the host that ran it recognises the
/// job and reports the copy failed instead of running its scripts again.
#[test]
fn a_signed_copy_of_a_finished_job_never_runs_again() {
    let fleet = Fleet::start();
    let _controller = fleet.controller();
    let _agent = fleet.agent("web-1", "web");
    fleet.wait_for_agents(1);
    let marks = fleet.home.path().join("ran");
    fleet.apply(
        &(script("mark", &format!("echo ran >> {}", marks.display()))
            + &workflow("mark-flow", &["mark"], &[])),
    );
    fleet.apply(&plan("p", &[("web", "web", "mark-flow", 0)], 1, 0));
    fleet.run_plan("p");
    fleet.wait_for_run("p", &["Succeeded"]);
    let job: serde_json::Value =
        serde_json::from_str(&fleet.get(&["get", "pj", "-o", "json"])).unwrap();
    let job = &job["items"][0];
    let name = job["metadata"]["name"].as_str().unwrap().to_string();
    let copy = serde_json::json!({
        "apiVersion": "fleetpatch.io/v1alpha1",
        "kind": "PatchJob",
        "metadata": {"name": name, "labels": job["metadata"]["labels"],
                     "annotations": {"fleetpatch.io/signature": job["metadata"]["annotations"]["fleetpatch.io/signature"]}},
        "spec": job["spec"],
    });
    fleet.get(&["delete", "pj", &name, "--wait=true", "--timeout=30s"]);
    fleet.apply(&copy.to_string());
    let refused = eventually(Duration::from_secs(30), || {
        fleet.get(&["get", "pj", &name, "-o", "jsonpath={.status.phase}"]) == "Failed"
    });
    let shown = fleet.get(&["get", "pj", &name, "-o", "yaml"]);
    assert!(refused, "{shown}");
    assert!(shown.contains("a copy is not run again"), "{shown}");
    assert_ne!(
        fleet.get(&["get", "pj", &name, "-o", "jsonpath={.metadata.uid}"]),
        job["metadata"]["uid"].as_str().unwrap(),
        "it is a new object"
    );
    assert_eq!(
        std::fs::read_to_string(&marks).unwrap(),
        "ran\n",
        "the script ran once"
    );
}

#[test]
fn pausing_an_agent_stops_its_running_job_and_no_reboot_follows() {
    let fleet = Fleet::start();
    let _controller = fleet.controller();
    let mut agent = fleet.agent_with("web-1", "web", &["--simulate-reboot", "--allow-reboot"]);
    fleet.wait_for_agents(1);
    fleet.apply(&(script("nap", "sleep 120") + &workflow("nap-flow", &["nap"], &[])));
    fleet.apply(&support::fleet::plan_with_reboot(
        "p", "web", "nap-flow", "Always",
    ));
    fleet.run_plan("p");
    running_job(&fleet);
    fleet.get(&[
        "patch",
        "agent",
        "web-1",
        "--type=merge",
        "-p",
        r#"{"spec":{"paused":true}}"#,
    ]);
    let stopped = eventually(Duration::from_secs(20), || {
        fleet.get(&["get", "pj", "-o", "jsonpath={.items[0].status.phase}"]) == "Failed"
    });
    assert!(stopped, "{}", fleet.get(&["get", "pj", "-o", "yaml"]));
    assert!(
        agent.running(),
        "the host rebooted after its job was cancelled"
    );
    assert_ne!(
        fleet.get(&[
            "get",
            "pj",
            "-o",
            "jsonpath={.items[0].status.reboot.state}"
        ]),
        "InProgress"
    );
}

#[test]
fn an_external_host_asks_before_it_reboots_and_reboots_when_approved() {
    let fleet = Fleet::start();
    let _controller = fleet.controller();
    let mut agent = fleet.agent_with("web-1", "web", &["--simulate-reboot", "--allow-reboot"]);
    fleet.wait_for_agents(1);
    fleet.apply(&(script("hello", "echo hi") + &workflow("flow", &["hello"], &[])));
    fleet.apply(&support::fleet::plan_with_reboot(
        "p", "web", "flow", "Always",
    ));
    fleet.run_plan("p");
    assert_eq!(
        agent.wait_exit(Duration::from_secs(60)),
        Some(3),
        "the host did not reboot"
    );
    let _back = fleet.agent_with("web-1", "web", &["--simulate-reboot", "--allow-reboot"]);
    fleet.wait_for_run("p", &["Succeeded"]);
    assert_eq!(
        fleet.get(&[
            "get",
            "pj",
            "-o",
            "jsonpath={.items[0].status.reboot.state}"
        ]),
        "Completed"
    );
}

#[test]
fn an_external_host_started_without_allow_reboot_reports_the_reboot_not_performed() {
    let fleet = Fleet::start();
    let _controller = fleet.controller();
    // Simulated so that a broken rule shows as a boot counter, not as a reboot.
    let mut agent = fleet.agent_with("web-1", "web", &["--simulate-reboot"]);
    fleet.wait_for_agents(1);
    fleet.apply(&(script("hello", "echo hi") + &workflow("flow", &["hello"], &[])));
    fleet.apply(&support::fleet::plan_with_reboot(
        "p", "web", "flow", "Always",
    ));
    fleet.run_plan("p");
    fleet.wait_for_run("p", &["Succeeded"]);
    assert_eq!(
        fleet.get(&[
            "get",
            "pj",
            "-o",
            "jsonpath={.items[0].status.reboot.state}"
        ]),
        "RequiredNotPerformed"
    );
    let message = fleet.get(&["get", "pj", "-o", "jsonpath={.items[0].status.message}"]);
    assert!(
        message.contains("a reboot is required but was not performed")
            && message.contains("--allow-reboot"),
        "the job says how to allow the reboot: {message}"
    );
    let mut describe = String::new();
    let told = eventually(Duration::from_secs(20), || {
        describe = fleet.get(&["describe", "pj"]);
        describe.contains("RebootNotPerformed")
    });
    assert!(
        told && describe.contains("but was not performed: this agent reboots its host only when started with --allow-reboot"),
        "kubectl describe tells why the host was not rebooted:\n{describe}"
    );
    assert!(agent.running(), "the agent stopped as if the host rebooted");
    assert!(
        !fleet.state_dir("web-1").join("simulated-boot-id").exists(),
        "the host rebooted (in simulation) without --allow-reboot"
    );
}

#[test]
fn a_stopped_leader_hands_over_in_seconds_and_every_replica_serves_agents() {
    let fleet = Fleet::start();
    let mut leader = fleet.controller_with("replica-a", &[]);
    let lease_holder = || {
        let output = fleet.cluster.kubectl(&[
            "-n",
            "fleetpatch-system",
            "get",
            "lease",
            "fleetpatch-controller",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ]);
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    assert!(eventually(Duration::from_secs(30), || lease_holder() == "replica-a"));
    // A standby with a gateway of its own, serving an agent of its own.
    let standby_port = free_port();
    let standby_gateway = format!("http://127.0.0.1:{standby_port}");
    let _standby = fleet.controller_with(
        "replica-b",
        &["--gateway-listen", &format!("127.0.0.1:{standby_port}")],
    );
    fleet.wait_for_gateway(&standby_gateway);
    let _on_standby = fleet.agent_at("db-1", "db", &standby_gateway);
    let _on_leader = fleet.agent("web-1", "web");
    fleet.wait_for_agents(2);
    assert_eq!(
        fleet.get(&["get", "agent", "db-1", "-o", "jsonpath={.status.gateway}"]),
        "replica-b"
    );
    // SIGTERM, as Kubernetes stops a pod: the leader gives the Lease up on its way out.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(leader.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let stopped = Instant::now();
    assert!(
        leader.wait_exit(Duration::from_secs(10)).is_some(),
        "the leader did not stop"
    );
    assert!(
        eventually(Duration::from_secs(8), || lease_holder() == "replica-b"),
        "the standby did not take over: holder {:?}",
        lease_holder()
    );
    let handover = stopped.elapsed();
    eprintln!("leader handover after SIGTERM: {handover:?}");
    assert!(handover < Duration::from_secs(8), "{handover:?}");
    // The new leader reconciles: a plan over the agent on its own gateway runs.
    fleet.apply(&(script("hello", "echo hi") + &workflow("flow", &["hello"], &[])));
    fleet.apply(&plan("after", &[("db", "db", "flow", 0)], 1, 0));
    fleet.run_plan("after");
    fleet.wait_for_run("after", &["Succeeded"]);
}
