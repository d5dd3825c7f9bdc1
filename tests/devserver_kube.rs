//! kube-rs clients (the ones the controller is built on) against `fleetpatch dev`: a
//! reflector keeps an accurate cache across a restart of a persistent server. The
//! selector watch and the controller scenarios run against the real API server too.

#![cfg(feature = "full")]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Config, ResourceExt};

use fleetpatch::api::{Agent, AgentMode, AgentSpec, OperatingSystem};
use support::{DevServer, Kubectl};

async fn client(server: &impl Kubectl) -> Client {
    let kubeconfig = Kubeconfig::read_from(server.kubeconfig()).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

fn agent(name: &str) -> Agent {
    Agent::new(
        name,
        AgentSpec {
            mode: AgentMode::External,
            os: OperatingSystem::Linux,
            node_name: None,
            paused: false,
            allowed_plans: Default::default(),
        },
    )
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflector_survives_a_restart_of_a_persistent_server() {
    let home = tempfile::tempdir().unwrap();
    let data = home.path().join("data");
    let mut server = DevServer::start(home.path(), Some(&data));
    let client = client(&server).await;

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in fleetpatch::api::crds() {
        crds.patch(
            &crd.name_any(),
            &PatchParams::apply("fleetpatch-test").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap();
    }
    let agents: Api<Agent> = Api::all(client.clone());
    agents
        .create(&PostParams::default(), &agent("before-restart"))
        .await
        .unwrap();

    let (reader, writer) = reflector::store::<Agent>();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen_errors = errors.clone();
    let stream = reflector(
        writer,
        watcher(agents.clone(), watcher::Config::default().timeout(20)),
    )
    .default_backoff();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(err) = event {
                seen_errors.lock().unwrap().push(err.to_string());
            }
        }
    });

    reader.wait_until_ready().await.unwrap();
    wait_for("the first agent", || {
        reader
            .state()
            .iter()
            .any(|a| a.name_any() == "before-restart")
    })
    .await;
    agents
        .create(&PostParams::default(), &agent("second"))
        .await
        .unwrap();
    wait_for("the second agent", || reader.state().len() == 2).await;
    let rv_before: u64 = agents
        .get("second")
        .await
        .unwrap()
        .resource_version()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        errors.lock().unwrap().is_empty(),
        "errors before the restart: {:?}",
        errors.lock().unwrap()
    );

    // Restart on the same port with the same data.
    let port = server.port;
    server.stop();
    let server = DevServer::start_on(home.path(), Some(&data), port);
    let errors_at_restart = errors.lock().unwrap().len();

    // Objects survived and versions keep rising.
    let kept = agents.get("before-restart").await.unwrap();
    assert_eq!(kept.spec.os, OperatingSystem::Linux);
    let third = agents
        .create(&PostParams::default(), &agent("after-restart"))
        .await
        .unwrap();
    let rv_after: u64 = third.resource_version().unwrap().parse().unwrap();
    assert!(rv_after > rv_before, "{rv_after} <= {rv_before}");

    // The reflector catches up with changes made after the restart.
    wait_for("the agent created after the restart", || {
        reader
            .state()
            .iter()
            .any(|a| a.name_any() == "after-restart")
    })
    .await;
    agents
        .delete("second", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the deletion", || {
        !reader.state().iter().any(|a| a.name_any() == "second")
    })
    .await;

    // Only connection failures while the server was down are acceptable: no API,
    // decoding or "resource version too old" errors.
    let errors = errors.lock().unwrap().clone();
    eprintln!("watcher errors across the restart: {errors:?}");
    for err in &errors {
        assert!(
            !err.contains("ApiError")
                && !err.contains("410")
                && !err.contains("decode")
                && !err.contains("Serde"),
            "unexpected watcher error: {err}"
        );
    }
    assert!(
        errors.len() <= errors_at_restart + 3,
        "errors kept coming after the restart: {errors:?}"
    );
    task.abort();

    // A watch from a version older than the restart is told to re-list (410 Expired).
    let mut stream = agents
        .watch(&kube::api::WatchParams::default().timeout(5), "1")
        .await
        .unwrap()
        .boxed();
    match stream.next().await {
        Some(Ok(kube::api::WatchEvent::Error(status))) => {
            assert_eq!(status.code, 410, "{status:?}")
        }
        other => panic!("expected a 410 error event, got {other:?}"),
    }
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selector_watches_see_objects_enter_and_leave() {
    let home = tempfile::tempdir().unwrap();
    let server = DevServer::start(home.path(), None);
    selector_watches(&server).await;
    // fleetpatch dev sends bookmarks at its --bookmark-interval-seconds; the real server
    // sends them when it sees fit (none came in 10 s here), as the API allows.
    bookmarks(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selector_watches_see_objects_enter_and_leave_on_the_real_api_server() {
    let home = tempfile::tempdir().unwrap();
    if let Some(cluster) = real(home.path()).await {
        selector_watches(&cluster).await;
    }
}

/// A private real control plane, started off the async runtime's threads.
async fn real(home: &std::path::Path) -> Option<support::Cluster> {
    let home = home.to_path_buf();
    tokio::task::spawn_blocking(move || support::Cluster::real(&home))
        .await
        .unwrap()
}

async fn selector_watches(server: &impl Kubectl) {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::WatchEvent;

    let client = client(server).await;
    let maps: Api<ConfigMap> = Api::namespaced(client, "default");
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some("cm".into());
    let created = maps.create(&PostParams::default(), &cm).await.unwrap();
    let params = kube::api::WatchParams::default()
        .labels("tier=gold")
        .timeout(10);
    let mut stream = maps
        .watch(&params, &created.resource_version().unwrap())
        .await
        .unwrap()
        .boxed();
    let label = |value: Option<&str>| serde_json::json!({"metadata": {"labels": {"tier": value}}});
    maps.patch(
        "cm",
        &PatchParams::default(),
        &Patch::Merge(label(Some("gold"))),
    )
    .await
    .unwrap();
    maps.patch(
        "cm",
        &PatchParams::default(),
        &Patch::Merge(label(Some("silver"))),
    )
    .await
    .unwrap();
    let mut events = Vec::new();
    while events.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
            Ok(Some(Ok(WatchEvent::Added(_)))) => events.push("ADDED"),
            Ok(Some(Ok(WatchEvent::Deleted(_)))) => events.push("DELETED"),
            Ok(Some(Ok(WatchEvent::Modified(_)))) => events.push("MODIFIED"),
            Ok(Some(Ok(WatchEvent::Bookmark(_)))) => {}
            other => panic!("unexpected {other:?} after {events:?}"),
        }
    }
    assert_eq!(events, ["ADDED", "DELETED"]);
}

/// Watches that ask for bookmarks get them, carrying the current resourceVersion.
async fn bookmarks(server: &impl Kubectl) {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::WatchEvent;

    let maps: Api<ConfigMap> = Api::namespaced(client(server).await, "default");
    let created = maps.get("cm").await.unwrap();
    let mut stream = maps
        .watch(
            &kube::api::WatchParams::default().timeout(10),
            &created.resource_version().unwrap(),
        )
        .await
        .unwrap()
        .boxed();
    let bookmark = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
            Ok(Some(Ok(WatchEvent::Bookmark(bookmark)))) => break bookmark,
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a bookmark, got {other:?}"),
        }
    };
    let rv: u64 = bookmark.metadata.resource_version.parse().unwrap();
    assert!(rv >= 3, "bookmark at {rv}");
}

/// A kube-rs `Controller`, as the fleetpatch controller runs, reconciling against the
/// dev server: it writes status through server-side apply and sees its own changes come
/// back through the watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kube_rs_controller_reconciles_against_the_dev_server() {
    let home = tempfile::tempdir().unwrap();
    let server = DevServer::start(home.path(), None);
    server.kubectl_ok(&["apply", "-f", "crds/"]);
    reconciles(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kube_rs_controller_reconciles_against_the_real_api_server() {
    let home = tempfile::tempdir().unwrap();
    if let Some(cluster) = real(home.path()).await {
        cluster.install_crds();
        reconciles(&cluster).await;
    }
}

async fn reconciles(server: &impl Kubectl) {
    use fleetpatch::api::{Task, TaskStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use kube::runtime::controller::{Action, Controller};

    server.kubectl_ok(&["create", "namespace", "fleetpatch-system"]);
    server.kubectl_ok(&["apply", "-f", "examples/linux/", "--recursive"]);
    let client = client(server).await;
    let tasks: Api<Task> = Api::namespaced(client.clone(), "default");

    #[derive(Debug, thiserror::Error)]
    #[error(transparent)]
    struct ReconcileError(#[from] kube::Error);

    async fn reconcile(task: Arc<Task>, tasks: Arc<Api<Task>>) -> Result<Action, ReconcileError> {
        let status = TaskStatus {
            observed_generation: task.metadata.generation,
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: "Reconciled".into(),
                message: "seen by the test controller".into(),
                last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
                observed_generation: task.metadata.generation,
            }],
        };
        let patch = serde_json::json!({
            "apiVersion": "fleetpatch.io/v1alpha1", "kind": "Task", "status": status,
        });
        tasks
            .patch_status(
                &task.name_any(),
                &PatchParams::apply("fleetpatch.io/test-controller").force(),
                &Patch::Apply(&patch),
            )
            .await?;
        Ok(Action::await_change())
    }

    let context = Arc::new(tasks.clone());
    let controller = tokio::spawn(
        Controller::new(tasks.clone(), watcher::Config::default())
            .run(
                reconcile,
                |_, _, _| Action::requeue(Duration::from_secs(1)),
                context,
            )
            .for_each(|result| async move {
                if let Err(err) = result {
                    eprintln!("reconcile failed: {err:?}");
                }
            }),
    );
    let expected = server
        .kubectl_ok(&["get", "tasks", "-o", "name"])
        .lines()
        .count();
    let mut ready = 0;
    for _ in 0..100 {
        let list = tasks.list(&Default::default()).await.unwrap();
        ready = list
            .items
            .iter()
            .filter(|t| {
                t.status.as_ref().is_some_and(|s| {
                    s.observed_generation == t.metadata.generation
                        && s.conditions
                            .iter()
                            .any(|c| c.type_ == "Ready" && c.status == "True")
                })
            })
            .count();
        if ready == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready, expected, "not every Task was reconciled");
    // A spec change is a new generation, which the controller reconciles again.
    server.kubectl_ok(&[
        "patch",
        "task",
        "check-disk-space",
        "--type=merge",
        "-p",
        r#"{"spec":{"timeoutMinutes":4}}"#,
    ]);
    let mut observed = None;
    for _ in 0..100 {
        let task = tasks.get("check-disk-space").await.unwrap();
        observed = task.status.and_then(|s| s.observed_generation);
        if observed == Some(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(observed, Some(2));
    controller.abort();

    // Events as the controller will publish them (events.k8s.io/v1), twice: the
    // second time the recorder patches the existing Event into a series.
    use kube::Resource;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "fleetpatch-test".into(),
            instance: None,
        },
    );
    let task = tasks.get("check-disk-space").await.unwrap();
    let event = Event {
        type_: EventType::Normal,
        reason: "Reconciled".into(),
        note: Some("the task is ready".into()),
        action: "Reconcile".into(),
        secondary: None,
    };
    recorder
        .publish(&event, &task.object_ref(&()))
        .await
        .unwrap();
    recorder
        .publish(&event, &task.object_ref(&()))
        .await
        .unwrap();
    let events = server.kubectl_ok(&["get", "events.events.k8s.io"]);
    assert!(
        events.contains("Reconciled") && events.contains("the task is ready"),
        "{events}"
    );
    // The same Event through the core API, which is what `kubectl describe` reads.
    let core = server.kubectl_ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=check-disk-space,involvedObject.kind=Task",
    ]);
    assert!(core.contains("Reconciled"), "{core}");
    let describe = server.kubectl_ok(&["describe", "task", "check-disk-space"]);
    let (_, described) = describe
        .split_once("\nEvents:")
        .unwrap_or_else(|| panic!("{describe}"));
    assert!(
        described.contains("Reconciled")
            && described.contains("the task is ready")
            && described.contains("(x2 over")
            && described.contains("fleetpatch-test"),
        "{describe}"
    );
}
