//! RabbitMQ restarted under a running fleet (`rabbitmqctl stop_app` / `start_app`): the
//! scheduler and the workers reconnect in place, and every run accepted before, during and
//! after the restart finishes. Runs alone (see .config/nextest.toml): it stops the broker every
//! other test uses.

#![allow(clippy::unwrap_used, clippy::print_stderr, missing_docs)]

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use taskfleet_tests::{FleetOptions, TestFleet};

fn rabbitmqctl(command: &str) {
    let status = Command::new("rabbitmqctl")
        .args(["-q", command])
        .status()
        .expect("running rabbitmqctl");
    assert!(status.success(), "rabbitmqctl {command} failed");
}

/// Starts the broker again even if the test fails half-way.
struct Restart;

impl Drop for Restart {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "start_app"])
            .status();
    }
}

#[tokio::test]
async fn fleet_reconnects_after_a_broker_restart_and_loses_nothing() {
    let mut fleet = TestFleet::start_with(FleetOptions {
        workers: 2,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let definition = json!({"steps": [
        {"id": "nap", "python": "fleet_steps:slow"},
        {"id": "double", "dataflow": ".sleep * 2", "after": ["nap"]},
    ]});
    // Some runs are in flight when the broker stops: sleeping in a worker, or queued.
    let mut runs = Vec::new();
    for n in 0..12 {
        let input = json!({"sleep": 0.5 + f64::from(n) * 0.1});
        runs.push((fleet.submit(&definition, &input).await, input));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _restart = Restart;
    let stopped = Instant::now();
    rabbitmqctl("stop_app");
    // Accepted while the broker is down: durable in PostgreSQL, published once it is back.
    for n in 0..4 {
        let input = json!({"sleep": 0.1 * f64::from(n)});
        runs.push((fleet.submit(&definition, &input).await, input));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbitmqctl("start_app");
    eprintln!("broker down for {:?}", stopped.elapsed());
    let started = Instant::now();
    for n in 0..4 {
        let input = json!({"sleep": 0.05 * f64::from(n)});
        runs.push((fleet.submit(&definition, &input).await, input));
    }
    for (id, input) in &runs {
        let run = fleet.wait_run(id, Duration::from_secs(90)).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        assert_eq!(run["output"], json!(input["sleep"].as_f64().unwrap() * 2.0));
    }
    eprintln!(
        "all {} runs finished {:?} after the broker came back",
        runs.len(),
        started.elapsed()
    );
    assert!(fleet.scheduler_alive(), "the scheduler kept running");
    assert_eq!(fleet.workers_alive(), 2, "the workers kept running");
}
