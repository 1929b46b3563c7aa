//! Concurrency limits against a real fleet: a step's `concurrency` holds across workers and
//! schedulers (measured by the times its attempts record), per key value, without waiting tasks
//! holding worker slots, through a worker killed mid-task, a cancellation (whose attempt keeps
//! its permit until it has stopped) and a re-run, with tasks of different limits in one group,
//! and admits waiters in order.

#![allow(clippy::unwrap_used, missing_docs)]
#![allow(
    clippy::print_stderr,
    reason = "the tests report the overlaps and latencies they saw"
)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt as _;
use serde_json::{Value, json};
use taskfleet_tests::{FleetOptions, POSTGRES, TestFleet};

/// Python source of a step that sleeps `input['sleep']` seconds and returns when it started and
/// ended (`time.time()`), with its input's `n`.
const TIMED: &str = "import time\n\
def main(input):\n    \
    start = time.time()\n    \
    time.sleep(input['sleep'])\n    \
    return {'n': input['n'], 'start': start, 'end': time.time()}\n";

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A job of step `step` running [`TIMED`] under `concurrency`.
fn timed_job(step: &str, concurrency: Value, n: usize, sleep: f64) -> Value {
    json!({
        "id": step,
        "python_code": TIMED,
        "concurrency": concurrency,
        "input": {"n": n, "sleep": sleep},
    })
}

/// Submits a job through the API at `api` (one of the fleet's schedulers) and returns its id.
async fn submit_job(fleet: &TestFleet, api: &str, job: &Value) -> String {
    let authorization = format!("Bearer {}", fleet.api_key);
    let (status, answer) = fleet
        .request_with_credentials(
            api,
            Some(authorization.as_bytes()),
            "POST",
            "/v1/tasks",
            Some(job),
        )
        .await;
    assert_eq!(status, 201, "{answer}");
    answer["id"].as_str().unwrap().to_owned()
}

/// Submits jobs, several at once, spread over the APIs at `apis`; returns their ids in order.
async fn submit_all(fleet: &TestFleet, apis: &[String], jobs: &[Value]) -> Vec<String> {
    futures_util::stream::iter(jobs.iter().enumerate())
        .map(|(n, job)| submit_job(fleet, &apis[n % apis.len()], job))
        .buffered(8)
        .collect()
        .await
}

/// A recorded attempt: the job's `n`, when it started and when it ended.
#[derive(Debug, Clone, Copy)]
struct Interval {
    n: u64,
    start: f64,
    end: f64,
}

/// Waits for each job to succeed and returns the interval its (last) attempt recorded.
async fn intervals(fleet: &TestFleet, ids: &[String], within: Duration) -> Vec<Interval> {
    let mut intervals = Vec::new();
    for id in ids {
        let view = fleet.wait_job(id, within).await;
        assert_eq!(view["status"], "succeeded", "{view:#}");
        intervals.push(interval(&view["output"]));
    }
    intervals
}

fn interval(output: &Value) -> Interval {
    Interval {
        n: output["n"].as_u64().unwrap(),
        start: output["start"].as_f64().unwrap(),
        end: output["end"].as_f64().unwrap(),
    }
}

/// The most intervals that overlap at any instant (an end and a start at the same instant do
/// not overlap).
fn max_overlap(intervals: &[Interval]) -> usize {
    let mut events: Vec<(f64, i32)> = intervals
        .iter()
        .flat_map(|i| [(i.start, 1), (i.end, -1)])
        .collect();
    events.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut running = 0_i32;
    let mut most = 0_i32;
    for (_, change) in events {
        running += change;
        most = most.max(running);
    }
    usize::try_from(most).unwrap()
}

/// The median time from the end of one attempt to the start of the next one that took its
/// permit, for intervals of one group that ran back to back (at the limit): admission's latency
/// plus dispatch.
fn median_handover(intervals: &[Interval]) -> f64 {
    let mut starts: Vec<f64> = intervals.iter().map(|i| i.start).collect();
    starts.sort_by(f64::total_cmp);
    let mut gaps: Vec<f64> = intervals
        .iter()
        .filter_map(|i| {
            starts
                .iter()
                .find(|start| **start >= i.end)
                .map(|start| start - i.end)
        })
        .collect();
    gaps.sort_by(f64::total_cmp);
    gaps.get(gaps.len() / 2).copied().unwrap_or(f64::NAN)
}

#[test]
fn overlaps_are_counted() {
    let at = |n, start, end| Interval { n, start, end };
    assert_eq!(max_overlap(&[]), 0);
    assert_eq!(max_overlap(&[at(0, 0.0, 1.0), at(1, 1.0, 2.0)]), 1);
    assert_eq!(
        max_overlap(&[at(0, 0.0, 1.0), at(1, 0.5, 2.0), at(2, 0.9, 1.5)]),
        3
    );
    assert_eq!(
        max_overlap(&[at(0, 0.0, 1.0), at(1, 0.5, 2.0), at(2, 1.2, 1.5)]),
        2
    );
}

#[tokio::test]
async fn a_concurrency_limit_holds_across_workers_and_schedulers() {
    let mut fleet = TestFleet::start_with(FleetOptions {
        workers: 2,
        concurrency: 4,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let other = fleet.start_another_scheduler().await.unwrap();
    let apis = [fleet.api.clone(), other];
    let jobs: Vec<Value> = (0..12)
        .map(|n| timed_job("limited", json!({"limit": 2}), n, 0.3))
        .collect();
    let ids = submit_all(&fleet, &apis, &jobs).await;
    let intervals = intervals(&fleet, &ids, Duration::from_secs(60)).await;
    let overlap = max_overlap(&intervals);
    eprintln!(
        "max overlap {overlap} of limit 2; median handover {:.3} s",
        median_handover(&intervals)
    );
    assert!(overlap <= 2, "{overlap} ran at once: {intervals:?}");
    assert_eq!(overlap, 2, "the limit was never reached: {intervals:?}");
}

#[tokio::test]
async fn a_keyed_limit_holds_per_key_value() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 2,
        concurrency: 4,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let concurrency = json!({"limit": 1, "key": ".customer"});
    let jobs: Vec<Value> = (0..10)
        .map(|n| {
            let customer = if n % 2 == 0 { "acme" } else { "globex" };
            json!({
                "id": "keyed",
                "python_code": TIMED,
                "concurrency": concurrency,
                "input": {"n": n, "sleep": 0.3, "customer": customer},
            })
        })
        .collect();
    let ids = submit_all(&fleet, std::slice::from_ref(&fleet.api), &jobs).await;
    let intervals = intervals(&fleet, &ids, Duration::from_secs(60)).await;
    let (acme, globex): (Vec<Interval>, Vec<Interval>) =
        intervals.iter().partition(|i| i.n % 2 == 0);
    for (key, of_key) in [("acme", &acme), ("globex", &globex)] {
        assert_eq!(max_overlap(of_key), 1, "{key}: {of_key:?}");
    }
    assert_eq!(
        max_overlap(&intervals),
        2,
        "the keys never ran side by side: {intervals:?}"
    );
}

#[tokio::test]
async fn waiting_tasks_hold_no_worker_slot() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        concurrency: 2,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    // Eight limited jobs of 2 s each: one at a time, they take 16 s.
    let submitted = Instant::now();
    let limited: Vec<Value> = (0..8)
        .map(|n| timed_job("slow", json!({"limit": 1}), n, 2.0))
        .collect();
    let limited = submit_all(&fleet, std::slice::from_ref(&fleet.api), &limited).await;
    let started = Instant::now();
    let quick: Vec<Value> = (0..100)
        .map(|n| json!({"id": "quick", "dataflow": ". + 1", "input": n}))
        .collect();
    let quick = submit_all(&fleet, std::slice::from_ref(&fleet.api), &quick).await;
    for id in &quick {
        let view = fleet.wait_job(id, Duration::from_secs(30)).await;
        assert_eq!(view["status"], "succeeded", "{view:#}");
    }
    let quick_done = started.elapsed();
    // The limited jobs run one at a time, 2 s each: by now at most one per 2 s (and the one
    // running) has left the waiting ones.
    let mut waiting = 0;
    for id in &limited {
        let (_, view) = fleet.request("GET", &format!("/v1/tasks/{id}"), None).await;
        if view["steps"]["slow"]["status"] == "pending" {
            waiting += 1;
        }
    }
    let elapsed = submitted.elapsed();
    let left = usize::try_from(elapsed.as_secs() / 2 + 1).unwrap();
    eprintln!(
        "100 quick jobs done in {quick_done:?} while {waiting} limited jobs waited ({elapsed:?} after they were submitted)"
    );
    // Had the limited jobs held the worker's two slots, the quick ones would have waited for
    // them (16 s).
    assert!(
        quick_done < Duration::from_secs(8),
        "the quick jobs took {quick_done:?}"
    );
    assert!(
        waiting >= limited.len().saturating_sub(left),
        "only {waiting} limited jobs were waiting {elapsed:?} after they were submitted"
    );
    let intervals = intervals(&fleet, &limited, Duration::from_secs(60)).await;
    assert_eq!(max_overlap(&intervals), 1, "{intervals:?}");
}

#[tokio::test]
async fn a_worker_killed_mid_task_leaks_no_permit() {
    let mut fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        concurrency: 4,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let jobs: Vec<Value> = (0..8)
        .map(|n| timed_job("held", json!({"limit": 2}), n, 1.0))
        .collect();
    let ids = submit_all(&fleet, std::slice::from_ref(&fleet.api), &jobs).await;
    // Once two attempts run on the only worker, it dies holding both permits' tasks.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut running = 0;
        for id in &ids {
            let (_, view) = fleet.request("GET", &format!("/v1/tasks/{id}"), None).await;
            if view["steps"]["held"]["status"] == "running" {
                running += 1;
            }
        }
        if running == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "two jobs never ran at once");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fleet.signal_worker(0, "KILL").unwrap();
    let killed_at = now();
    fleet.start_worker().unwrap();
    fleet.start_worker().unwrap();
    let intervals = intervals(&fleet, &ids, Duration::from_secs(60)).await;
    let after: Vec<Interval> = intervals
        .iter()
        .copied()
        .filter(|i| i.start > killed_at)
        .collect();
    eprintln!(
        "after the kill: {} attempts, max overlap {}",
        after.len(),
        max_overlap(&after)
    );
    assert!(max_overlap(&intervals) <= 2, "{intervals:?}");
    // Both permits came back: the jobs after the kill still ran two at a time.
    assert_eq!(max_overlap(&after), 2, "{intervals:?}");
}

/// Python source of a step that appends `time.time()` to the file `input['path']` every 20 ms
/// and never ends, not even when it is stopped (it catches the interrupt): it runs until its
/// process is killed, and the file's last line says when it last ran. If the file is there
/// already (a later attempt, or a re-run), it runs as [`TIMED`] for 0.3 s instead.
const STUBBORN: &str = "import os, time\n\
def main(input):\n    \
    if os.path.exists(input['path']):\n        \
        start = time.time()\n        \
        time.sleep(0.3)\n        \
        return {'n': input['n'], 'start': start, 'end': time.time()}\n    \
    while True:\n        \
        try:\n            \
            with open(input['path'], 'a') as f:\n                \
                f.write('%.6f\\n' % time.time())\n            \
            time.sleep(0.02)\n        \
        except BaseException:\n            \
            pass\n";

/// A job of step `step` running [`STUBBORN`] with limit 1, writing to `path`.
fn stubborn_job(step: &str, path: &std::path::Path) -> Value {
    json!({
        "id": step,
        "python_code": STUBBORN,
        "concurrency": {"limit": 1},
        "input": {"n": 0, "path": path.to_str().unwrap()},
    })
}

/// Waits until the [`STUBBORN`] step writing to `path` runs.
async fn until_it_beats(path: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while heartbeats(path).is_none() {
        assert!(Instant::now() < deadline, "the stubborn job never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The first and last times a [`STUBBORN`] step wrote to `path` (lines cut short by an interrupt
/// are passed over).
fn heartbeats(path: &std::path::Path) -> Option<(f64, f64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let times: Vec<f64> = text.lines().filter_map(|line| line.parse().ok()).collect();
    Some((*times.first()?, *times.last()?))
}

/// Starts a fleet of one worker with two slots and a [`STUBBORN`] job of `step` on it, and
/// returns the fleet, the file the job writes to and the job's id once it is running.
async fn stubborn_running(step: &str) -> (TestFleet, std::path::PathBuf, String) {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        concurrency: 2,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let path = std::env::temp_dir().join(format!("taskfleet-{step}-{}", fleet.namespace));
    let _ = std::fs::remove_file(&path);
    let id = submit_job(&fleet, &fleet.api, &stubborn_job(step, &path)).await;
    until_it_beats(&path).await;
    (fleet, path, id)
}

#[tokio::test]
async fn a_cancelled_attempt_holds_its_permit_until_it_has_stopped() {
    let (fleet, path, blocker) = stubborn_running("one").await;
    let next: Vec<Value> = (1..3)
        .map(|n| timed_job("one", json!({"limit": 1}), n, 0.3))
        .collect();
    let next = submit_all(&fleet, std::slice::from_ref(&fleet.api), &next).await;
    // The others wait behind the first: nothing else starts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for id in &next {
        let (_, view) = fleet.request("GET", &format!("/v1/tasks/{id}"), None).await;
        assert_eq!(view["steps"]["one"]["status"], "pending", "{view:#}");
    }
    let cancelled_at = now();
    let (status, answer) = fleet
        .request("POST", &format!("/v1/tasks/{blocker}/cancel"), None)
        .await;
    assert_eq!(status, 200, "{answer}");
    // The cancelled attempt goes on until the worker kills it, past the cancel; the next job
    // starts only after that, and soon after (the grace, then the backstop's next look).
    let intervals = intervals(&fleet, &next, Duration::from_secs(30)).await;
    let (first_beat, last_beat) = heartbeats(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let first_start = intervals
        .iter()
        .map(|i| i.start)
        .fold(f64::INFINITY, f64::min);
    eprintln!(
        "the cancelled attempt ran {:.3} s after the cancel; the next job started {:.3} s after it",
        last_beat - cancelled_at,
        first_start - cancelled_at
    );
    assert!(
        last_beat > cancelled_at + 0.5,
        "the cancelled attempt stopped at once ({:.3} s after the cancel)",
        last_beat - cancelled_at
    );
    let blocker = Interval {
        n: 0,
        start: first_beat,
        end: last_beat,
    };
    assert!(
        first_start > last_beat,
        "the next job started {:.3} s before the cancelled attempt stopped",
        last_beat - first_start
    );
    assert!(
        first_start - cancelled_at < 12.0,
        "the permit came back {:.3} s after the cancel",
        first_start - cancelled_at
    );
    let mut all = intervals.clone();
    all.push(blocker);
    assert_eq!(max_overlap(&all), 1, "{all:?}");
}

#[tokio::test]
async fn a_rerun_within_the_grace_waits_for_the_cancelled_attempt() {
    let (fleet, path, id) = stubborn_running("again").await;
    let cancelled_at = now();
    let (status, answer) = fleet
        .request("POST", &format!("/v1/tasks/{id}/cancel"), None)
        .await;
    assert_eq!(status, 200, "{answer}");
    // Run again at once: its new attempt takes the permit only once the cancelled one stopped.
    let (status, answer) = fleet
        .request("POST", &format!("/v1/tasks/{id}/retry"), None)
        .await;
    assert_eq!(status, 200, "{answer}");
    let again = intervals(&fleet, std::slice::from_ref(&id), Duration::from_secs(30)).await[0];
    let (_, last_beat) = heartbeats(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    eprintln!(
        "the cancelled attempt ran {:.3} s after the cancel; the re-run started {:.3} s after it",
        last_beat - cancelled_at,
        again.start - cancelled_at
    );
    assert!(
        again.start > last_beat,
        "the re-run started {:.3} s before the cancelled attempt stopped",
        last_beat - again.start
    );
    assert!(
        again.start - cancelled_at < 12.0,
        "the permit came back {:.3} s after the cancel",
        again.start - cancelled_at
    );
}

/// Whether `a` and `b` ran at the same time.
fn overlap(a: &Interval, b: &Interval) -> bool {
    a.start < b.end && b.start < a.end
}

#[tokio::test]
async fn tasks_with_different_limits_in_one_group_each_keep_their_own() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        concurrency: 4,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    // One group (the step id), three limits: a job of limit 3 first in admission order (its
    // priority), but ready last; two of limit 1, ready before it.
    let job = |n: usize, limit: u32, priority: u8, delay_s: f64| {
        let mut job = timed_job("mixed", json!({"limit": limit}), n, 2.0);
        job["priority"] = json!(priority);
        job["delay_s"] = json!(delay_s);
        job
    };
    let jobs = [job(0, 3, 5, 2.5), job(1, 1, 0, 1.5), job(2, 1, 0, 1.5)];
    let mut ids = Vec::new();
    for job in &jobs {
        ids.push(submit_job(&fleet, &fleet.api, job).await);
    }
    let intervals = intervals(&fleet, &ids, Duration::from_secs(40)).await;
    eprintln!("{intervals:?}");
    // A job of limit 1 never ran beside another.
    for limited in intervals.iter().filter(|i| i.n != 0) {
        for other in intervals.iter().filter(|i| i.n != limited.n) {
            assert!(
                !overlap(limited, other),
                "job {} (limit 1) ran beside job {}: {intervals:?}",
                limited.n,
                other.n
            );
        }
    }
}

#[tokio::test]
async fn a_rerun_respects_the_limit() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 2,
        concurrency: 4,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    // Each item fails until `until`, then records its interval.
    let definition = json!({"steps": [{
        "id": "items",
        "for_each": "[range(.count) as $n | {n: $n, until: .until}]",
        "concurrency": {"limit": 2},
        "python_code": "import time\n\
    def main(input):\n    \
    if time.time() < input['until']:\n        \
        raise RuntimeError('too early')\n    \
    start = time.time()\n    \
    time.sleep(0.3)\n    \
    return {'n': input['n'], 'start': start, 'end': time.time()}\n",
    }]});
    // Long enough for every item to have failed once, even on a loaded machine.
    let until = now() + 5.0;
    let id = fleet
        .submit(&definition, &json!({"count": 8, "until": until}))
        .await;
    let failed = fleet.wait_run(&id, Duration::from_secs(30)).await;
    assert_eq!(failed["status"], "failed", "{failed:#}");
    tokio::time::sleep(Duration::from_secs_f64((until - now()).max(0.0) + 0.1)).await;
    let (status, answer) = fleet
        .request("POST", &format!("/v1/runs/{id}/retry"), None)
        .await;
    assert_eq!(status, 200, "{answer}");
    let done = fleet.wait_run(&id, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    let intervals: Vec<Interval> = done["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(interval)
        .collect();
    assert_eq!(intervals.len(), 8);
    let overlap = max_overlap(&intervals);
    assert!(overlap <= 2, "{overlap} ran at once: {intervals:?}");
    assert_eq!(overlap, 2, "the limit was never reached: {intervals:?}");
}

#[tokio::test]
async fn waiters_are_admitted_by_priority_then_in_submission_order() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        concurrency: 4,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let job = |n: usize, priority: u8, sleep: f64| {
        let mut job = timed_job("ordered", json!({"limit": 1}), n, sleep);
        job["priority"] = json!(priority);
        job
    };
    // The blocker outlasts the six submissions that follow it, one at a time, however slow.
    let blocker = submit_job(&fleet, &fleet.api, &job(0, 0, 6.0)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, view) = fleet
            .request("GET", &format!("/v1/tasks/{blocker}"), None)
            .await;
        if view["steps"]["ordered"]["status"] == "running" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first job never ran: {view:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // One at a time, so that submission order is the order of their ids.
    let mut ids = vec![blocker];
    for (n, priority) in [(1, 0), (2, 0), (3, 0), (4, 5), (5, 0), (6, 5)] {
        ids.push(submit_job(&fleet, &fleet.api, &job(n, priority, 0.1)).await);
    }
    let mut intervals = intervals(&fleet, &ids, Duration::from_secs(30)).await;
    intervals.sort_by(|a, b| a.start.total_cmp(&b.start));
    let order: Vec<u64> = intervals.iter().map(|i| i.n).collect();
    assert_eq!(order, [0, 4, 6, 1, 2, 3, 5], "{intervals:?}");
}

#[tokio::test]
async fn limited_steps_planned_later_or_delayed_start_once_ready() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        concurrency: 4,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    // A limited step planned by the completion loop, after a step without a limit.
    let definition = json!({"steps": [
        {"id": "first", "python_code": "def main(input):\n    return input\n"},
        {"id": "second", "after": ["first"], "input": ".steps.first",
         "concurrency": {"limit": 1}, "python_code": TIMED},
    ]});
    let mut latencies = Vec::new();
    for n in 0..3 {
        let submitted = now();
        let id = fleet
            .submit(&definition, &json!({"n": n, "sleep": 0.1}))
            .await;
        let run = fleet.wait_run(&id, Duration::from_secs(30)).await;
        assert_eq!(run["status"], "succeeded", "{run:#}");
        latencies.push(interval(&run["output"]).start - submitted);
    }
    latencies.sort_by(f64::total_cmp);
    // A delayed limited job is admitted once its delay is over, not before.
    let submitted = now();
    let mut job = timed_job("delayed", json!({"limit": 1}), 0, 0.1);
    job["delay_s"] = json!(1.5);
    let id = submit_job(&fleet, &fleet.api, &job).await;
    let view = fleet.wait_job(&id, Duration::from_secs(30)).await;
    assert_eq!(view["status"], "succeeded", "{view:#}");
    let delayed = interval(&view["output"]).start - submitted;
    eprintln!(
        "limited second steps started {latencies:?} s after submission; the delayed job {delayed:.3} s"
    );
    assert!(latencies[1] < 2.5, "{latencies:?}");
    assert!((1.5..5.0).contains(&delayed), "{delayed}");
}

#[tokio::test]
async fn the_backstop_looks_about_once_per_period_for_a_fleet_of_schedulers() {
    let mut fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        concurrency: 2,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    fleet.start_another_scheduler().await.unwrap();
    fleet.start_another_scheduler().await.unwrap();
    // Each look the backstop claims is recorded, by whichever scheduler claims it.
    let db = sqlx::PgPool::connect(&format!("{POSTGRES}/{}", fleet.database))
        .await
        .unwrap();
    sqlx::raw_sql(
        "CREATE TABLE looks (at timestamptz NOT NULL DEFAULT clock_timestamp());
         CREATE FUNCTION record_look() RETURNS trigger LANGUAGE plpgsql
             AS $$ BEGIN INSERT INTO looks DEFAULT VALUES; RETURN NULL; END $$;
         CREATE TRIGGER record_look AFTER INSERT OR UPDATE ON admission_backstop
             FOR EACH ROW EXECUTE FUNCTION record_look();",
    )
    .execute(&db)
    .await
    .unwrap();
    let window = Duration::from_secs(8);
    tokio::time::sleep(window).await;
    let looks: i64 = sqlx::query_scalar("SELECT count(*) FROM looks")
        .fetch_one(&db)
        .await
        .unwrap();
    eprintln!("three schedulers looked {looks} times in {window:?}");
    // One scheduler looks every 2 s (4 times in 8 s), three at most once per 1.5 s (6): had
    // each looked at its own pace, they would have looked about 12 times.
    assert!((2..=7).contains(&looks), "{looks} looks in {window:?}");
}
