//! Rate limits on a real fleet: a step's `rate_limit` (for the whole step, or per key) and a
//! queue's, held across workers, measured by the times Python steps start; tasks that no
//! limit holds run meanwhile; the limits' state lost from Redis stalls nothing; a late start
//! is checked again and deferred; bad limits are refused.

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use serde_json::{Value, json};
use taskfleet_tests::{FleetOptions, REDIS, Services, TestFleet};

/// A Python step that returns when it started, its worker (the executor's parent process) and
/// its input.
const RECORD_START: &str = "import os, time\ndef main(input, ctx):\n    return {\"t\": time.time(), \"worker\": os.getppid(), \"input\": input}\n";

/// Submits `jobs` (each a job's body) and returns their ids, in order.
async fn submit_jobs(fleet: &TestFleet, jobs: Vec<Value>) -> Vec<String> {
    futures_util::stream::iter(jobs)
        .map(|job| async move {
            let (status, answer) = fleet.request("POST", "/v1/tasks", Some(&job)).await;
            assert_eq!(status, 201, "{answer}");
            answer["id"].as_str().unwrap().to_owned()
        })
        .buffered(16)
        .collect()
        .await
}

/// A job recording its start, with `rate_limit` (if any) and `input`.
fn recording_job(rate_limit: Option<Value>, input: Value) -> Value {
    let mut job = json!({"python_code": RECORD_START, "input": input});
    if let Some(rate_limit) = rate_limit {
        job["rate_limit"] = rate_limit;
    }
    job
}

/// One recorded start.
#[derive(Debug, Clone)]
struct Start {
    /// Seconds since the Unix epoch.
    t: f64,
    worker: i64,
    input: Value,
}

/// Waits for each job to succeed in one attempt and returns its recorded start.
async fn starts(fleet: &TestFleet, ids: &[String], within: Duration) -> Vec<Start> {
    let mut starts = Vec::new();
    for id in ids {
        let view = fleet.wait_job(id, within).await;
        assert_eq!(view["status"], "succeeded", "{view:#}");
        for (_, step) in view["steps"].as_object().unwrap() {
            assert_eq!(step["attempts"], 1, "a deferral is no attempt: {view:#}");
        }
        let output = &view["output"];
        starts.push(Start {
            t: output["t"].as_f64().unwrap(),
            worker: output["worker"].as_i64().unwrap(),
            input: output["input"].clone(),
        });
    }
    starts
}

/// The most starts within any window of `window` seconds (from one start on).
fn most_in_window(starts: &[Start], window: f64) -> usize {
    let mut times: Vec<f64> = starts.iter().map(|start| start.t).collect();
    times.sort_by(f64::total_cmp);
    (0..times.len())
        .map(|first| {
            times[first..]
                .iter()
                .take_while(|t| **t < times[first] + window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// Seconds from the first start to the last.
fn span(starts: &[Start]) -> f64 {
    let times = starts.iter().map(|start| start.t);
    times.clone().fold(f64::MIN, f64::max) - times.fold(f64::MAX, f64::min)
}

/// The namespace's rate limit keys in Redis.
async fn rate_keys(fleet: &TestFleet) -> Vec<String> {
    let client = redis::Client::open(REDIS).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let mut keys = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{}:rate:*", fleet.namespace))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut redis)
            .await
            .unwrap();
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

/// The value of a metric without labels in the scheduler's exposition.
async fn scheduler_metric(fleet: &TestFleet, name: &str) -> f64 {
    let text = fleet.metrics_text().await;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_global_limit_holds_across_two_workers() {
    let mut fleet = TestFleet::start().await.unwrap();
    let (per_second, burst, count) = (4.0, 1, 16);
    let limit = json!({"per_second": per_second, "burst": burst});
    let jobs = (0..count)
        .map(|n| recording_job(Some(limit.clone()), json!(n)))
        .collect();
    let ids = submit_jobs(&fleet, jobs).await;
    let starts = starts(&fleet, &ids, Duration::from_secs(60)).await;

    let most = most_in_window(&starts, 1.0);
    assert!(
        most <= per_second as usize + burst,
        "{most} starts within one second, limit {per_second}/s burst {burst}: {starts:?}"
    );
    let expected = f64::from(count - 1) / per_second;
    let took = span(&starts);
    assert!(
        // The upper bound leaves room for a loaded machine of two cores.
        took >= expected - 0.25 && took <= expected + 5.0,
        "{count} starts took {took:.2} s, expected about {expected:.2} s"
    );
    let pids = fleet.worker_pids();
    let mut workers: Vec<i64> = starts.iter().map(|start| start.worker).collect();
    workers.sort_unstable();
    workers.dedup();
    assert_eq!(
        workers.len(),
        2,
        "both workers ran some: {workers:?}, {pids:?}"
    );
    assert!(
        workers
            .iter()
            .all(|worker| pids.contains(&u32::try_from(*worker).unwrap()))
    );
    assert!(
        scheduler_metric(&fleet, "taskfleet_rate_limited_total{queue=\"default\"}").await
            >= f64::from(count - 2),
        "the waits are counted"
    );

    // An idle limit leaves nothing behind in Redis.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !rate_keys(&fleet).await.is_empty() {
        assert!(Instant::now() < deadline, "{:?}", rate_keys(&fleet).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    fleet.kill_workers();
}

#[tokio::test]
async fn each_key_has_its_own_rate() {
    let fleet = TestFleet::start().await.unwrap();
    let (per_second, count) = (2.0, 6);
    let limit = json!({"per_second": per_second, "key": ".k"});
    let jobs = (0..count)
        .flat_map(|n| {
            ["a", "b"].map(|k| recording_job(Some(limit.clone()), json!({"k": k, "n": n})))
        })
        .collect();
    let ids = submit_jobs(&fleet, jobs).await;
    let starts = starts(&fleet, &ids, Duration::from_secs(60)).await;
    let expected = f64::from(count - 1) / per_second;
    for k in ["a", "b"] {
        let of_key: Vec<Start> = starts
            .iter()
            .filter(|start| start.input["k"] == k)
            .cloned()
            .collect();
        let most = most_in_window(&of_key, 1.0);
        assert!(most <= 3, "{most} starts of key {k} within one second");
        let took = span(&of_key);
        assert!(
            took >= expected - 0.25,
            "key {k}: {count} starts took {took:.2} s, expected about {expected:.2} s"
        );
    }
    // Together they ran twice as fast as one limit would let them.
    let took = span(&starts);
    assert!(
        took < expected + 2.0,
        "{} starts of two keys took {took:.2} s; one shared limit takes {:.2} s",
        2 * count,
        f64::from(2 * count - 1) / per_second
    );
}

#[tokio::test]
async fn a_queue_limit_holds_every_task_of_the_queue() {
    let fleet = TestFleet::start().await.unwrap();
    let (per_second, count) = (3.0, 10);
    let body = json!({ "rate_limit_per_s": per_second });
    let (status, answer) = fleet
        .request("PUT", "/v1/queues/default", Some(&body))
        .await;
    assert_eq!(status, 200, "{answer}");
    // A scheduler reads its queues' limits every second.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let jobs = (0..count).map(|n| recording_job(None, json!(n))).collect();
    let ids = submit_jobs(&fleet, jobs).await;
    let starts = starts(&fleet, &ids, Duration::from_secs(60)).await;
    let most = most_in_window(&starts, 1.0);
    assert!(most <= 4, "{most} starts within one second: {starts:?}");
    let expected = f64::from(count - 1) / per_second;
    let took = span(&starts);
    assert!(
        // The upper bound leaves room for a loaded machine of two cores.
        took >= expected - 0.25 && took <= expected + 5.0,
        "{count} starts took {took:.2} s, expected about {expected:.2} s"
    );
}

#[tokio::test]
async fn unlimited_tasks_run_at_full_speed_while_limited_ones_wait() {
    let fleet = TestFleet::start().await.unwrap();
    let limited_count = 10;
    let limited = (0..limited_count)
        .map(|n| json!({"dataflow": ".", "input": n, "rate_limit": {"per_second": 1}}))
        .collect();
    let limited = submit_jobs(&fleet, limited).await;
    let started = Instant::now();
    let free = (0..200)
        .map(|n| json!({"dataflow": ". + 1", "input": n}))
        .collect();
    let free = submit_jobs(&fleet, free).await;
    for id in &free {
        let view = fleet.wait_job(id, Duration::from_secs(30)).await;
        assert_eq!(view["status"], "succeeded", "{view:#}");
    }
    let took = started.elapsed();
    let mut finished = 0;
    for id in &limited {
        let (status, view) = fleet.request("GET", &format!("/v1/tasks/{id}"), None).await;
        assert_eq!(status, 200, "{view}");
        if view["status"] == "succeeded" {
            finished += 1;
        }
    }
    assert!(
        took < Duration::from_secs(8),
        "200 tasks no limit holds took {took:?}"
    );
    // At one start a second, no more than the seconds passed (and the first) have started.
    let allowed = usize::try_from(took.as_secs()).unwrap() + 2;
    assert!(
        finished <= allowed && finished < limited_count,
        "{finished} of {limited_count} limited tasks finished within {took:?}"
    );
    for id in &limited {
        let view = fleet.wait_job(id, Duration::from_secs(30)).await;
        assert_eq!(view["status"], "succeeded", "{view:#}");
    }
}

#[tokio::test]
async fn limits_lost_from_redis_stall_nothing() {
    let fleet = TestFleet::start().await.unwrap();
    let (per_second, count) = (3.0, 12);
    let limit = json!({"per_second": per_second});
    let jobs = (0..count)
        .map(|n| recording_job(Some(limit.clone()), json!(n)))
        .collect();
    let ids = submit_jobs(&fleet, jobs).await;
    // Mid-way, the limits' state is lost, as a Redis restart would lose it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let keys = rate_keys(&fleet).await;
    assert!(!keys.is_empty(), "the limit is kept in Redis");
    let client = redis::Client::open(REDIS).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut redis)
        .await
        .unwrap();

    let starts = starts(&fleet, &ids, Duration::from_secs(30)).await;
    let expected = f64::from(count - 1) / per_second;
    let took = span(&starts);
    // It may let a little more through, never all at once, and never stalls.
    assert!(
        took >= expected - 1.5 && took <= expected + 5.0,
        "{count} starts took {took:.2} s, expected about {expected:.2} s"
    );
    // A burst more at most: the limit's 3 a second, 1 more as after a quiet time (the state is
    // lost), and 1 reserved before the loss and still held for its slot.
    let most = most_in_window(&starts, 1.0);
    assert!(
        most <= per_second as usize + 2,
        "{most} starts within one second: {starts:?}"
    );
}

#[tokio::test]
async fn a_late_start_is_checked_again_and_deferred_without_an_attempt() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        concurrency: 2,
        worker_env: vec![("TASKFLEET_PYTHON_EXECUTORS".into(), "2".into())],
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    // Two long steps take both of the worker's slots.
    let blockers = submit_jobs(
        &fleet,
        (0..2)
            .map(|n| {
                json!({"python_code": "import time\ndef main(input, ctx):\n    time.sleep(2.5)\n    return input\n", "input": n})
            })
            .collect(),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    for id in &blockers {
        loop {
            let (_, view) = fleet.request("GET", &format!("/v1/tasks/{id}"), None).await;
            let running = view["steps"]
                .as_object()
                .is_some_and(|steps| steps.values().all(|step| step["status"] == "running"));
            if running {
                break;
            }
            assert!(Instant::now() < deadline, "{view:#}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Published at their slots, these wait in the queue behind them, and all come late; at 4/s
    // several starts fall within the 0.5 s the scheduler reserves ahead.
    let (per_second, count) = (4.0, 10);
    let limit = json!({"per_second": per_second});
    let jobs = (0..count)
        .map(|n| recording_job(Some(limit.clone()), json!(n)))
        .collect();
    let ids = submit_jobs(&fleet, jobs).await;
    let starts = starts(&fleet, &ids, Duration::from_secs(60)).await;
    let deferred = scheduler_metric(&fleet, "taskfleet_tasks_deferred_total").await;
    assert!(deferred >= 1.0, "no late start was deferred: {starts:?}");
    // Late starts never go together: no more than the rate and the burst in any second.
    let most = most_in_window(&starts, 1.0);
    assert!(
        most <= per_second as usize + 1,
        "{most} starts within one second: {starts:?}"
    );
}

/// A TCP proxy to Redis that can be taken down (its connections cut, new ones refused) and
/// brought back, as a Redis outage seen by one fleet only.
struct RedisProxy {
    port: u16,
    up: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl RedisProxy {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (accepting, accepted) = (up.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !accepting.load(Ordering::SeqCst) {
                    continue;
                }
                let connection = tokio::spawn(async move {
                    let mut redis = tokio::net::TcpStream::connect("127.0.0.1:6379")
                        .await
                        .unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut redis).await;
                });
                accepted.lock().unwrap().push(connection);
            }
        });
        Self {
            port,
            up,
            connections,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn without_redis_limited_tasks_wait_and_none_is_lost() {
    let proxy = RedisProxy::start().await;
    let mut services = Services::shared();
    services.redis = proxy.url();
    let fleet = TestFleet::start_with(FleetOptions {
        services,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    // The workers connect first (a worker that cannot reach Redis at its start stops).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = fleet.request("GET", "/v1/workers", None).await;
        assert_eq!(status, 200, "{body}");
        if body["workers"].as_array().unwrap().len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "workers never appeared: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.down();
    let (per_second, count) = (2.0, 6);
    let limit = json!({"per_second": per_second});
    let jobs = (0..count)
        .map(|n| recording_job(Some(limit.clone()), json!(n)))
        .collect();
    let ids = submit_jobs(&fleet, jobs).await;
    // Redis stays out of reach for 3 s (reading a task through the API would wait on Redis),
    // and no task is published meanwhile (a worker could not start one anyway: its lease waits).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let published = scheduler_metric(
        &fleet,
        "taskfleet_tasks_dispatched_total{queue=\"default\"}",
    )
    .await;
    assert_eq!(published, 0.0, "tasks were published unchecked");
    let back = now_since(0.0).as_secs_f64();
    proxy.up();
    let starts = starts(&fleet, &ids, Duration::from_secs(30)).await;
    // Nothing started unchecked while Redis was out of reach, and nothing was lost.
    assert!(
        starts.iter().all(|start| start.t >= back),
        "started before Redis came back at {back}: {starts:?}"
    );
    // One more than the limit allows: a task published at its slot may still wait for its
    // worker's own connection to Redis (its lease) to come back, and start later, off its slot.
    let most = most_in_window(&starts, 1.0);
    assert!(most <= 4, "{most} starts within one second: {starts:?}");
}

#[tokio::test]
async fn a_re_run_respects_the_limit() {
    let fleet = TestFleet::start().await.unwrap();
    let (per_second, count) = (2.0, 6);
    // Every first run fails, however long they take, until a file exists; the re-runs find it.
    let go = std::env::temp_dir().join(format!("taskfleet-rate-re-run-{}", fleet.namespace));
    let code = "import os, time\ndef main(input, ctx):\n    if not os.path.exists(input['go']):\n        raise RuntimeError('not yet')\n    return {'t': time.time()}\n";
    let jobs = (0..count)
        .map(|n| {
            json!({"python_code": code, "input": {"go": go, "n": n},
                   "rate_limit": {"per_second": per_second}})
        })
        .collect();
    let ids = submit_jobs(&fleet, jobs).await;
    for id in &ids {
        let view = fleet.wait_job(id, Duration::from_secs(30)).await;
        assert_eq!(view["status"], "failed", "{view:#}");
    }
    std::fs::write(&go, b"").unwrap();
    let fleet = &fleet;
    futures_util::future::join_all(ids.iter().map(|id| async move {
        let (status, answer) = fleet
            .request("POST", &format!("/v1/tasks/{id}/retry"), None)
            .await;
        assert_eq!(status, 200, "{answer}");
    }))
    .await;
    let mut starts = Vec::new();
    for id in &ids {
        let view = fleet.wait_job(id, Duration::from_secs(30)).await;
        assert_eq!(view["status"], "succeeded", "{view:#}");
        starts.push(Start {
            t: view["output"]["t"].as_f64().unwrap(),
            worker: 0,
            input: Value::Null,
        });
    }
    let most = most_in_window(&starts, 1.0);
    assert!(
        most <= 3,
        "{most} re-run starts within one second: {starts:?}"
    );
    let expected = f64::from(count - 1) / per_second;
    let took = span(&starts);
    assert!(
        took >= expected - 0.25,
        "{count} re-run starts took {took:.2} s, expected about {expected:.2} s"
    );
    std::fs::remove_file(&go).unwrap();
}

/// Seconds since `then` (seconds since the Unix epoch).
fn now_since(then: f64) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    Duration::from_secs_f64((now - then).max(0.0))
}
