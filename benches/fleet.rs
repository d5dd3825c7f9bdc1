//! Fleet simulator: `fleetpatch dev` and `fleetpatch controller` as real processes, and
//! N in-process agents speaking the real gateway protocol (register with a bootstrap
//! token, heartbeat, long-poll, report progress). One plan, trivial actions, all hosts
//! allowed at once. Prints the time from run start to all jobs complete, API writes per
//! job (counted by the dev server), controller RSS and CPU.
//!
//! `cargo bench --bench fleet` (1,000 agents) or `cargo bench --bench fleet -- 1000 10000`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fleetpatch::api::OperatingSystem;
use fleetpatch::api::patchjob::{JobPhase, PatchJobStatus};
use fleetpatch::gateway::protocol::{
    Assignments, JobName, ProgressAck, ProgressReport, RegisterRequest, RegisterResponse,
};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn binary() -> PathBuf {
    let release = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/fleetpatch");
    assert!(
        release.exists(),
        "build the release binary first: cargo build --release"
    );
    release
}

/// Starts a process and returns it with the first stdout line that starts with `prefix`.
fn start(command: &mut Command, prefix: &str) -> (Killed, String) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let prefix = prefix.to_string();
    let line = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the process prints its address");
        if line.starts_with(&prefix) {
            break line;
        }
    };
    (Killed(child), line.rsplit(' ').next().unwrap().to_string())
}

fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn proc_field(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = fields.get(11).and_then(|t| t.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|t| t.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

fn writes(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("fleetpatch_devserver_writes_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

async fn simulate(agents: usize) {
    let home = tempfile::tempdir().unwrap();
    let kubeconfig = home.path().join("kubeconfig");
    let (_dev, api) = start(
        Command::new(binary())
            .args(["dev", "--listen", "127.0.0.1:0", "--kubeconfig"])
            .arg(&kubeconfig)
            .env("RUST_LOG", "error"),
        "fleetpatch dev: listening on",
    );
    let crds = format!("{}/crds", env!("CARGO_MANIFEST_DIR"));
    kubectl(&kubeconfig, &["apply", "-f", &crds], None);
    kubectl(
        &kubeconfig,
        &["create", "namespace", "fleetpatch-system"],
        None,
    );
    kubectl(
        &kubeconfig,
        &["apply", "-f", "-"],
        Some(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: join, namespace: fleetpatch-system}\ntype: fleetpatch.io/bootstrap-token\nstringData: {token: sim, usage: multi}\n---\n\
             apiVersion: fleetpatch.io/v1alpha1\nkind: Script\nmetadata: {name: noop}\nspec: {language: Sh, content: 'true'}\n---\n\
             apiVersion: fleetpatch.io/v1alpha1\nkind: Task\nmetadata: {name: noop}\nspec: {os: Linux, type: RunScript, runScript: {scriptRef: {name: noop}}}\n---\n\
             apiVersion: fleetpatch.io/v1alpha1\nkind: Workflow\nmetadata: {name: noop}\nspec: {os: Linux, preTasks: [{taskRef: {name: noop}}]}\n---\n\
             apiVersion: fleetpatch.io/v1alpha1\nkind: RemediationPlan\nmetadata: {name: fleet}\nspec:\n  targets: [{name: all, os: Linux, selector: {matchLabels: {sim: 'yes'}}, workflowRef: {name: noop}}]\n  patches: {skip: true}\n  rollout: {maxConcurrent: 100%}\n",
        ),
    );
    let (controller, gateway) = start(
        Command::new(binary())
            .args([
                "controller",
                "--namespace",
                "fleetpatch-system",
                "--gateway-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "error"),
        "fleetpatch controller: gateway listening on",
    );
    let controller_pid = controller.0.id();
    fleetpatch::tls::install_crypto_provider();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(agents + 16)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();

    // Register every agent.
    let started = Instant::now();
    let mut credentials = Vec::new();
    let mut registrations = tokio::task::JoinSet::new();
    // Hosts join over time in a real fleet; 256 registrations in flight at once.
    let joining = Arc::new(tokio::sync::Semaphore::new(256));
    for i in 0..agents {
        let http = http.clone();
        let gateway = gateway.clone();
        let joining = joining.clone();
        registrations.spawn(async move {
            let _permit = joining.acquire_owned().await.unwrap();
            let request = RegisterRequest {
                name: format!("sim-{i:05}"),
                os: OperatingSystem::Linux,
                bootstrap_token: Some("sim".into()),
                labels: [("sim".to_string(), "yes".to_string())].into(),
                platform: None,
            };
            loop {
                match http
                    .post(format!("{gateway}/agent/v1/register"))
                    .json(&request)
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => {
                        let body: RegisterResponse = r.json().await.unwrap();
                        return format!("Bearer {}.{}", body.agent, body.credential.unwrap());
                    }
                    _ => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
    }
    while let Some(bearer) = registrations.join_next().await {
        credentials.push(bearer.unwrap());
    }
    println!(
        "  registered {agents} agents in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let writes_before = writes(
        &reqwest::get(format!("{api}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    let cpu_before = cpu_seconds(controller_pid);

    let done = Arc::new(AtomicUsize::new(0));
    let mut fleet = tokio::task::JoinSet::new();
    for bearer in credentials {
        let http = http.clone();
        let gateway = gateway.clone();
        let done = done.clone();
        fleet.spawn(async move {
            // One connection per agent: a heartbeat, then a long-poll of 15 s, like the
            // real agent's heartbeat period (the real agent keeps two connections).
            let heartbeat = || {
                http.post(format!("{gateway}/agent/v1/heartbeat"))
                    .header("Authorization", &bearer)
                    .json(&serde_json::json!({"version": "sim"}))
                    .send()
            };
            loop {
                let _ = heartbeat().await;
                let Ok(response) = http
                    .get(format!("{gateway}/agent/v1/assignments?waitSeconds=15"))
                    .header("Authorization", &bearer)
                    .send()
                    .await
                else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let Ok(assignments) = response.json::<Assignments>().await else {
                    continue;
                };
                let Some(job) = assignments.jobs.into_iter().next() else {
                    continue;
                };
                for (sequence, phase) in [(1, JobPhase::Running), (2, JobPhase::Succeeded)] {
                    let status = PatchJobStatus {
                        phase,
                        progress: Some(if sequence == 2 { "1/1" } else { "0/1" }.into()),
                        ..Default::default()
                    };
                    loop {
                        let report = ProgressReport {
                            sequence,
                            status: status.clone(),
                            job: Some(JobName {
                                namespace: job.namespace.clone(),
                                name: job.name.clone(),
                            }),
                        };
                        let sent = http
                            .post(format!("{gateway}/agent/v1/jobs/{}/progress", job.uid))
                            .header("Authorization", &bearer)
                            .json(&report)
                            .send()
                            .await;
                        if let Ok(response) = sent
                            && let Ok(ack) = response.json::<ProgressAck>().await
                            && (ack.acknowledged_sequence >= sequence || sequence == 1)
                        {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
                // Stay alive (heartbeats) until the whole run is over.
                loop {
                    tokio::time::sleep(Duration::from_secs(15)).await;
                    let _ = heartbeat().await;
                }
            }
        });
    }

    let run_started = Instant::now();
    let output = Command::new(binary())
        .args(["run", "plan", "fleet"])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut peak_rss = 0;
    let mut dispatched_at = None;
    loop {
        peak_rss = peak_rss.max(proc_field(controller_pid, "VmRSS:"));
        let finished = done.load(Ordering::Relaxed);
        if dispatched_at.is_none() {
            let created = kubectl(
                &kubeconfig,
                &[
                    "get",
                    "rplan",
                    "fleet",
                    "-o",
                    "jsonpath={.status.currentRun.counts.total}",
                ],
                None,
            );
            if created.trim() == agents.to_string() {
                dispatched_at = Some(run_started.elapsed());
            }
        }
        if finished == agents {
            let phase = kubectl(
                &kubeconfig,
                &[
                    "get",
                    "rplan",
                    "fleet",
                    "-o",
                    "jsonpath={.status.currentRun.phase}",
                ],
                None,
            );
            if phase == "Succeeded" {
                break;
            }
        }
        assert!(
            run_started.elapsed() < Duration::from_secs(1800),
            "the run did not finish: {finished}/{agents} agents done"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let elapsed = run_started.elapsed();
    fleet.abort_all();
    let writes_after = writes(
        &reqwest::get(format!("{api}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    let run_writes = writes_after - writes_before;
    let cpu = cpu_seconds(controller_pid) - cpu_before;
    println!(
        "  all {agents} jobs complete {:.1}s after the run started (all counted in the plan after {:.1}s)",
        elapsed.as_secs_f64(),
        dispatched_at.unwrap_or_default().as_secs_f64()
    );
    println!(
        "  API writes during the run: {run_writes} = {:.2} per job (jobs, job status, plan status, events, agent status)",
        run_writes as f64 / agents as f64
    );
    println!(
        "  controller (with gateway): peak RSS {:.0} MiB, CPU {:.1}s",
        peak_rss as f64 / 1024.0,
        cpu
    );
}

/// The simulator holds a connection per agent, and more while they reconnect: lift the
/// open files limit (the hard one too, when allowed).
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let wanted = hard.max(131_072);
    if setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted).is_err() && soft < hard {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    if let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) {
        println!("open files limit: {soft}");
    }
}

fn main() {
    raise_open_files_limit();
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() { vec![1000] } else { sizes };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    for agents in sizes {
        println!("fleet of {agents} simulated agents:");
        runtime.block_on(simulate(agents));
    }
}
