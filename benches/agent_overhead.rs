//! Executor overhead: the time from one action's end to the next one's start (journal
//! write included), and the agent's memory while idle (waiting on a child) and while
//! running actions back to back. Run with `cargo bench --bench agent_overhead`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fleetpatch::agent::executor::{self, Event, Executor};
use fleetpatch::agent::journal::{JobRecord, Journal};
use fleetpatch::agent::reboot::SimulatedRebooter;
use fleetpatch::api::library::Library;
use fleetpatch::api::plan::{PatchSelection, RebootPolicy};
use fleetpatch::api::resolve::{self, JobTarget};
use fleetpatch::api::rules::Catalog;

const ACTIONS: usize = 10;
const ROUNDS: usize = 20;

fn manifests(first_body: &str) -> String {
    let mut text = String::new();
    let mut steps = Vec::new();
    for i in 0..ACTIONS {
        let body = if i == 0 { first_body } else { "true" };
        text += &format!(
            "apiVersion: fleetpatch.io/v1alpha1\nkind: Script\nmetadata: {{name: s{i}}}\nspec: {{language: Sh, content: '{body}'}}\n---\n\
             apiVersion: fleetpatch.io/v1alpha1\nkind: Task\nmetadata: {{name: t{i}}}\nspec: {{os: Linux, type: RunScript, runScript: {{scriptRef: {{name: s{i}}}}}}}\n---\n"
        );
        steps.push(format!("{{taskRef: {{name: t{i}}}}}"));
    }
    // Five pre and five post tasks: the workflow limit.
    text += &format!(
        "apiVersion: fleetpatch.io/v1alpha1\nkind: Workflow\nmetadata: {{name: bench}}\nspec:\n  os: Linux\n  preTasks: [{}]\n  postTasks: [{}]\n  failurePolicy: {{pre: Continue, post: Continue}}\n",
        steps[..5].join(", "),
        steps[5..].join(", ")
    );
    text
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn gaps() -> Vec<Duration> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("m.yaml"), manifests("true")).unwrap();
    let documents = fleetpatch::manifests::load(&[dir.path().join("m.yaml")]).unwrap();
    let report = fleetpatch::manifests::check(
        &documents,
        &fleetpatch::manifests::Schemas::new(),
        &Default::default(),
    );
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let mut catalog: Catalog = report.catalog;
    Library::load(&catalog.library_namespace.clone()).add_to(&mut catalog);
    let target = JobTarget {
        agent: "bench".into(),
        plan: String::new(),
        run: String::new(),
        patches: PatchSelection {
            skip: true,
            ..Default::default()
        },
        reboot: RebootPolicy::Never,
    };
    let spec = resolve::resolve_named(&catalog, "default", "bench", target).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let journal = Journal::open(dir.path()).unwrap();
    let rebooter = SimulatedRebooter {
        counter_file: dir.path().join("boot"),
    };
    let mut all = Vec::new();
    for round in 0..ROUNDS {
        let marks: Mutex<Vec<(Instant, bool)>> = Mutex::new(Vec::new());
        let on_event = |_: &JobRecord, event: &Event| match event {
            Event::ActionStarted { .. } => marks.lock().unwrap().push((Instant::now(), true)),
            Event::ActionFinished { .. } => marks.lock().unwrap().push((Instant::now(), false)),
            _ => {}
        };
        let executor = Executor {
            journal: &journal,
            work_dir: dir.path().join("work"),
            patcher: None,
            rebooter: &rebooter,
            minute: Duration::from_secs(60),
            max_download_bytes: 1 << 20,
            on_event: &on_event,
            reboot_gate: None,
            cancel: None,
            reboot_refusal: None,
        };
        let mut record = executor::new_record(format!("bench-{round}"), "bench", spec.clone());
        runtime.block_on(executor.run(&mut record)).unwrap();
        let marks = marks.into_inner().unwrap();
        // Gap = a start mark minus the finish mark just before it. The patch step sits
        // between the pre and post lists; its (skipped) record write counts too.
        for pair in marks.windows(2) {
            if let [(finished, false), (started, true)] = pair {
                all.push(*started - *finished);
            }
        }
    }
    all.sort();
    all
}

fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn memory(binary: &Path) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("m.yaml"), manifests("sleep 2")).unwrap();
    let mut child = Command::new(binary)
        .args([
            "agent",
            "exec",
            "--patches",
            "none",
            "--reboot",
            "never",
            "--workflow",
            "bench",
            "-f",
        ])
        .arg(dir.path().join("m.yaml"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    let idle = rss_kib(child.id(), "VmRSS:").unwrap_or(0);
    let mut peak = idle;
    while child.try_wait().unwrap().is_none() {
        if let Some(hwm) = rss_kib(child.id(), "VmHWM:") {
            peak = peak.max(hwm);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    (idle, peak)
}

fn main() {
    let gaps = gaps();
    println!(
        "executor overhead between actions ({} gaps, {ACTIONS} actions x {ROUNDS} jobs):",
        gaps.len()
    );
    println!(
        "  p50 {:.2} ms   p95 {:.2} ms   max {:.2} ms   (target <= 20 ms)",
        percentile(&gaps, 0.5).as_secs_f64() * 1e3,
        percentile(&gaps, 0.95).as_secs_f64() * 1e3,
        gaps.last().unwrap().as_secs_f64() * 1e3
    );
    let binary = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/fleetpatch");
    if !binary.exists() {
        println!("agent RSS: build the release binary first (cargo build --release) to measure it");
        return;
    }
    let (idle, peak) = memory(&binary);
    println!(
        "agent RSS: idle (waiting on an action) {:.1} MiB, peak while running {:.1} MiB   (target <= 25 MiB)",
        idle as f64 / 1024.0,
        peak as f64 / 1024.0
    );
}
