//! Benchmark of `fleetpatch dev` (ignored by default; run with
//! `cargo test --release --test devserver_bench -- --ignored --nocapture`):
//! 10,000 custom objects of about 2 KiB created over loopback while 10 watchers
//! follow, then a full list. Prints create rate, fan-out completion, list latency
//! and the server's RSS. Targets: >= 2,000 creates/s, full list <= 1 s, RSS <= 300 MiB.

#![cfg(feature = "full")]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};

use fleetpatch::api::{Script, ScriptCategory, ScriptLanguage, ScriptSpec};
use support::DevServer;

const OBJECTS: usize = 10_000;
const CONCURRENCY: usize = 32;
const WATCHERS: usize = 10;

fn script(i: usize) -> Script {
    // ~2 KiB per object once serialized.
    let mut content = String::from("#!/bin/bash\nset -eu\n");
    while content.len() < 1900 {
        content.push_str(&format!(
            "echo \"step {i}: checking patch level and free space\"\n"
        ));
    }
    Script::new(
        &format!("bench-{i:05}"),
        ScriptSpec {
            language: ScriptLanguage::Bash,
            content,
            signature: None,
            category: ScriptCategory::Standard,
            description: Some("benchmark object".into()),
            parameters: Vec::new(),
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly with --ignored --nocapture, preferably --release"]
async fn ten_thousand_objects() {
    println!("== in memory");
    run(false).await;
    println!("== with --data-dir (journal flushed per write)");
    run(true).await;
}

async fn run(persistent: bool) {
    let home = tempfile::tempdir().unwrap();
    let data = home.path().join("data");
    let server = DevServer::start(home.path(), persistent.then_some(data.as_path()));
    let kubeconfig = Kubeconfig::read_from(&server.kubeconfig).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    let client = Client::try_from(config).unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in fleetpatch::api::crds() {
        crds.patch(
            &crd.name_any(),
            &PatchParams::apply("bench").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap();
    }
    let scripts: Api<Script> = Api::namespaced(client.clone(), "default");
    let size = serde_json::to_vec(&script(0)).unwrap().len();
    println!("object size: {size} bytes serialized");
    let rss_start = server.rss_kib().unwrap_or_default();

    // Watchers first, so every create fans out to all of them.
    let done = Arc::new(AtomicUsize::new(0));
    let mut watchers = Vec::new();
    for _ in 0..WATCHERS {
        let api = scripts.clone();
        let done = done.clone();
        watchers.push(tokio::spawn(async move {
            let mut seen = 0usize;
            let mut stream = api
                .watch(&WatchParams::default().timeout(290), "0")
                .await
                .unwrap()
                .boxed();
            while let Some(event) = stream.try_next().await.unwrap() {
                if let WatchEvent::Added(_) = event {
                    seen += 1;
                    if seen == OBJECTS {
                        done.fetch_add(1, Ordering::SeqCst);
                        return Instant::now();
                    }
                }
            }
            panic!("watch ended after {seen} events");
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut creators = Vec::new();
    for _ in 0..CONCURRENCY {
        let api = scripts.clone();
        let next = next.clone();
        creators.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= OBJECTS {
                    return;
                }
                api.create(&PostParams::default(), &script(i))
                    .await
                    .unwrap();
            }
        }));
    }
    for creator in creators {
        creator.await.unwrap();
    }
    let create_time = started.elapsed();
    let mut last_watcher = started;
    for watcher in watchers {
        let finished = tokio::time::timeout(Duration::from_secs(120), watcher)
            .await
            .expect("watchers finish")
            .unwrap();
        last_watcher = last_watcher.max(finished);
    }
    let fan_out = last_watcher - started;

    let list_started = Instant::now();
    let listed = scripts.list(&ListParams::default()).await.unwrap();
    let list_time = list_started.elapsed();
    assert_eq!(listed.items.len(), OBJECTS);
    let list_bytes = serde_json::to_vec(&listed).unwrap().len();
    let rss_end = server.rss_kib().unwrap_or_default();

    let rate = OBJECTS as f64 / create_time.as_secs_f64();
    println!(
        "creates: {OBJECTS} in {create_time:.2?} = {rate:.0}/s ({CONCURRENCY} concurrent clients)"
    );
    println!(
        "watch fan-out: all {WATCHERS} watchers saw all {OBJECTS} ADDED events {fan_out:.2?} after the first create"
    );
    println!(
        "full list: {OBJECTS} objects ({:.1} MiB) in {list_time:.2?}",
        list_bytes as f64 / 1048576.0
    );
    println!(
        "server RSS: {:.1} MiB at start, {:.1} MiB after (targets: >= 2000 creates/s, list <= 1 s, RSS <= 300 MiB)",
        rss_start as f64 / 1024.0,
        rss_end as f64 / 1024.0
    );
}
