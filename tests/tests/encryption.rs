//! Payload encryption against a real fleet: with `TASKFLEET_ENCRYPTION_KEYS`, no input, output,
//! error or log is found in clear in PostgreSQL, RabbitMQ or Redis, while the API shows them;
//! keys rotate; a wrong or missing key stops the start with a clear error; a stored value that
//! does not open holds up its own task only.

#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt as _;
use serde_json::json;
use taskfleet_tests::{AMQP, FleetOptions, POSTGRES, REDIS, TestFleet};

/// A key: `id:` and 32 bytes in base64.
fn key(id: &str, byte: u8) -> String {
    let bytes = [byte; 32];
    let encoded = Command::new("base64")
        .args(["-w", "0"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            child.stdin.take().unwrap().write_all(&bytes)?;
            child.wait_with_output()
        })
        .unwrap();
    format!("{id}:{}", String::from_utf8(encoded.stdout).unwrap().trim())
}

/// Everything the namespace holds in Redis, as text.
async fn redis_dump(namespace: &str) -> String {
    let client = redis::Client::open(REDIS).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{namespace}:*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    let mut dump = String::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .unwrap();
        let value: redis::Value = match kind.as_str() {
            "string" => redis::cmd("GET")
                .arg(&key)
                .query_async(&mut redis)
                .await
                .unwrap(),
            "hash" => redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut redis)
                .await
                .unwrap(),
            "zset" => redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query_async(&mut redis)
                .await
                .unwrap(),
            _ => redis::Value::Nil,
        };
        dump.push_str(&format!("{key} {value:?}\n"));
    }
    dump
}

/// The bodies of the messages waiting in a queue, which stay there.
async fn queued_bodies(queue: &str) -> Vec<String> {
    let connection = lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "encryption-test".into(),
            lapin::options::BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let mut bodies = Vec::new();
    while let Ok(Some(Ok(delivery))) =
        tokio::time::timeout(Duration::from_secs(2), consumer.next()).await
    {
        bodies.push(String::from_utf8_lossy(&delivery.data).into_owned());
        // Closing the channel gives it back to the queue.
        if !bodies.is_empty() {
            break;
        }
    }
    let _ = channel.close(200, "done".into()).await;
    let _ = connection.close(200, "done".into()).await;
    bodies
}

#[tokio::test]
async fn no_payload_rests_or_travels_in_clear_and_keys_rotate() {
    let k1 = key("k1", 1);
    let mut fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        scheduler_env: vec![("TASKFLEET_ENCRYPTION_KEYS".into(), k1.clone())],
        worker_env: vec![("TASKFLEET_ENCRYPTION_KEYS".into(), k1.clone())],
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let marker = format!("clear-{}", fleet.namespace);
    let definition = json!({"steps": [
        {"id": "jq", "dataflow": ".secret + \"-jq\""},
        {"id": "py", "after": ["jq"], "python_code":
            "def main(x):\n    print('printing', x)\n    return {'echo': x}\n"},
        {"id": "boom", "after": ["py"], "python_code":
            "def main(x):\n    raise ValueError('failing with ' + x['echo'])\n"},
    ]});
    let run = fleet.run(&definition, &json!({"secret": marker})).await;
    // The API shows everything in clear to its key.
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["input"]["secret"], marker.as_str(), "{run}");
    assert_eq!(
        run["steps"]["jq"]["output"],
        format!("{marker}-jq"),
        "{run}"
    );
    assert!(
        run["steps"]["py"]["logs"]
            .as_str()
            .unwrap()
            .contains(&marker),
        "{run}"
    );
    assert!(
        run["error"]["message"].as_str().unwrap().contains(&marker),
        "{run}"
    );
    // A job parked on a queue no worker reads keeps its message in RabbitMQ.
    let (status, parked) = fleet
        .request(
            "POST",
            "/v1/tasks",
            Some(&json!({"dataflow": ".", "queue": "nobody", "input": {"secret": marker}})),
        )
        .await;
    assert_eq!(status, 201, "{parked}");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let dump = Command::new("pg_dump")
        .args(["--data-only", &format!("{POSTGRES}/{}", fleet.database)])
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.contains("tfenc1:k1:"),
        "nothing is sealed in the database"
    );
    assert!(
        !dump.contains(&marker),
        "the database holds a payload in clear"
    );
    let redis = redis_dump(&fleet.namespace).await;
    assert!(
        !redis.contains(&marker),
        "Redis holds a payload in clear: {redis}"
    );
    let bodies = queued_bodies(&format!("{}.tasks.nobody", fleet.namespace)).await;
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    assert!(bodies[0].contains("tfenc1:k1:"), "{}", bodies[0]);
    assert!(
        !bodies[0].contains(&marker),
        "a task message holds its input in clear"
    );

    // Rotation: a new key first, the old one kept; old and new runs both read back.
    let k2 = key("k2", 2);
    fleet.set_env("TASKFLEET_ENCRYPTION_KEYS", &format!("{k2},{k1}"));
    fleet.kill_workers();
    fleet.start_worker().unwrap();
    fleet.restart_scheduler().await.unwrap();
    let id = run["id"].as_str().unwrap();
    let (status, old) = fleet.request("GET", &format!("/v1/runs/{id}"), None).await;
    assert_eq!(status, 200, "{old}");
    assert_eq!(old["input"]["secret"], marker.as_str(), "{old}");
    let new = fleet
        .run(
            &json!({"steps": [{"id": "jq", "dataflow": ". + 1"}]}),
            &json!(41),
        )
        .await;
    assert_eq!(new["output"], 42, "{new}");
    let dump = Command::new("pg_dump")
        .args(["--data-only", &format!("{POSTGRES}/{}", fleet.database)])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&dump.stdout).contains("tfenc1:k2:"));

    // Without the old key, or with a wrong one under its id, the scheduler does not start.
    let start = |keys: &str| {
        let output = Command::new(taskfleet_tests::bin_dir().join("taskfleet-scheduler"))
            .env(
                "TASKFLEET_DATABASE_URL",
                format!("{POSTGRES}/{}", fleet.database),
            )
            .env("TASKFLEET_NAMESPACE", &fleet.namespace)
            .env("TASKFLEET_HTTP_ADDR", "127.0.0.1:0")
            .env("TASKFLEET_ENCRYPTION_KEYS", keys)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{keys}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let lacking = start(&key("k9", 9));
    assert!(
        lacking.contains("\"k2\"") || lacking.contains("\"k1\""),
        "{lacking}"
    );
    let wrong = start(&format!("{},{}", key("k2", 7), key("k1", 1)));
    assert!(wrong.contains("does not open"), "{wrong}");
    let short = start("k1:AAAA");
    assert!(
        short.contains("TASKFLEET_ENCRYPTION_KEYS") && short.contains("32"),
        "{short}"
    );
    assert!(!short.contains("AAAA"), "{short}");
}

#[tokio::test]
async fn values_that_look_encrypted_travel_unchanged_and_break_nothing() {
    // Encryption off, the default: a client's or a step's strings shaped like sealed values
    // are data like any other.
    let mut fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let forged = json!({"a": "tfenc1:k1:AAAA", "b": ["tfesc:x", "tfenc1:y:z"]});
    let definition = json!({"steps": [
        {"id": "same", "dataflow": "."},
        {"id": "each", "after": ["same"], "for_each": "[.b[]]", "dataflow": "."},
        {"id": "made", "after": ["each"], "dataflow": "\"tfenc1:made:BBBB\""},
    ]});
    let run = fleet.run(&definition, &forged).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["input"], forged, "{run}");
    assert_eq!(run["steps"]["same"]["output"], forged, "{run}");
    assert_eq!(run["steps"]["each"]["output"], forged["b"], "{run}");
    assert_eq!(run["output"], "tfenc1:made:BBBB", "{run}");
    // A scheduler starts again over them.
    fleet.restart_scheduler().await.unwrap();
    let id = run["id"].as_str().unwrap();
    let (status, again) = fleet.request("GET", &format!("/v1/runs/{id}"), None).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["input"], forged, "{again}");
}

#[tokio::test]
async fn a_task_whose_input_no_key_opens_fails_or_waits_alone() {
    let keys = ("TASKFLEET_ENCRYPTION_KEYS".to_owned(), key("k1", 7));
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        scheduler_env: vec![keys.clone()],
        worker_env: vec![keys],
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    // Three delayed jobs, due together. Meanwhile one's stored input is altered, and another's
    // is replaced by a value sealed with a key this scheduler does not have.
    let mut ids = Vec::new();
    for input in [1, 2, 3] {
        let (status, job) = fleet
            .request(
                "POST",
                "/v1/tasks",
                Some(&json!({"dataflow": ". + 1", "input": input, "delay_s": 2})),
            )
            .await;
        assert_eq!(status, 201, "{job}");
        ids.push(job["id"].as_str().unwrap().to_owned());
    }
    for (id, stored) in [(&ids[0], "tfenc1:k1:AAAA"), (&ids[1], "tfenc1:gone:AAAA")] {
        let updated = Command::new("psql")
            .args([
                "-Atq",
                &format!("{POSTGRES}/{}", fleet.database),
                "-c",
                &format!("UPDATE tasks SET input = '\"{stored}\"' WHERE run_id = '{id}'"),
            ])
            .output()
            .unwrap();
        assert!(updated.status.success(), "{updated:?}");
    }
    // The altered one fails at once, naming why.
    let (_, altered) = fleet
        .request("GET", &format!("/v1/tasks/{}?wait=30", ids[0]), None)
        .await;
    assert_eq!(altered["status"], "failed", "{altered}");
    let error = &altered["error"];
    assert_eq!(error["type"], "invalid_task", "{altered}");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("cannot be opened"), "{message}");
    assert!(message.contains("altered"), "{message}");
    // The others go on: the readable one succeeds, the one sealed with another key waits for a
    // scheduler that has it.
    let (_, readable) = fleet
        .request("GET", &format!("/v1/tasks/{}?wait=30", ids[2]), None)
        .await;
    assert_eq!(readable["status"], "succeeded", "{readable}");
    assert_eq!(readable["output"], 4, "{readable}");
    let (_, waiting) = fleet
        .request("GET", &format!("/v1/tasks/{}?wait=1", ids[1]), None)
        .await;
    assert!(
        matches!(waiting["status"].as_str(), Some("pending" | "running")),
        "{waiting}"
    );
}
