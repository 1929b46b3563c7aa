//! The dead letters against a real fleet: messages that name no task, dead-lettered by the
//! fleet's own scheduler and worker, are listed with their labels and the start of their bodies
//! without being consumed, only to an `admin` key, and purged, with an audit event and a metric;
//! and the same through the CLI.

#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, ConnectionProperties};
use serde_json::{Value, json};
use taskfleet_tests::{AMQP, FleetOptions, TestFleet};

/// Publishes `body`, persistent, to the fleet's queue `queue` (named without its namespace),
/// declared first with the arguments the fleet declares it with.
async fn publish(channel: &lapin::Channel, fleet: &TestFleet, queue: &str, body: &[u8]) {
    let name = fleet.declare_queue(channel, queue).await;
    channel
        .basic_publish(
            "".into(),
            name.as_str().into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Lists the dead letters until the queue holds `count`, up to 30 s; returns the listing.
async fn wait_for_dead_letters(fleet: &TestFleet, count: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, listing) = fleet.request("GET", "/v1/dead-letters", None).await;
        assert_eq!(status, 200, "{listing}");
        if listing["total"] == count {
            return listing;
        }
        assert!(
            Instant::now() < deadline,
            "the dead letters never numbered {count}: {listing:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Returns how many messages the fleet's dead-letters queue holds, as RabbitMQ counts them.
async fn ready_in_queue(channel: &lapin::Channel, fleet: &TestFleet) -> u32 {
    let queue = channel
        .queue_declare(
            format!("{}.dead-letters", fleet.namespace).into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    queue.message_count()
}

#[tokio::test]
async fn dead_letters_are_listed_in_place_and_purged_by_an_admin() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let connection = lapin::Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();

    // Nothing was ever dead-lettered: the queue does not exist, and that is an empty list.
    let (status, empty) = fleet.request("GET", "/v1/dead-letters", None).await;
    assert_eq!(status, 200, "{empty}");
    assert_eq!(empty, json!({"total": 0, "messages": []}));

    // One at a time, so that their order in the queue is known: a completion that names no task
    // (the scheduler dead-letters it), a task message that is not JSON (the worker does), and a
    // long completion whose 256th byte is the first of a two-byte character.
    let completions = format!("{}.completions", fleet.namespace);
    let tasks = format!("{}.tasks.default", fleet.namespace);
    let long = format!("{{\"pad\": \"{}\"}}", "é".repeat(600));
    let bodies: [(&str, &[u8]); 3] = [
        ("completions", br#"{"hello": "world"}"#),
        ("tasks.default", b"not json at all"),
        ("completions", long.as_bytes()),
    ];
    for (count, (queue, body)) in (1..).zip(bodies) {
        publish(&channel, &fleet, queue, body).await;
        wait_for_dead_letters(&fleet, count).await;
    }

    let (status, listing) = fleet.request("GET", "/v1/dead-letters", None).await;
    assert_eq!(status, 200, "{listing}");
    assert_eq!(listing["total"], 3, "{listing:#}");
    let messages = listing["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 3, "{listing:#}");
    assert_eq!(messages[0]["reason"], "a completion that names no task");
    assert_eq!(messages[0]["source"], completions.as_str());
    assert_eq!(messages[0]["size"], 18);
    assert_eq!(messages[0]["body_prefix"], r#"{"hello": "world"}"#);
    assert_eq!(messages[1]["source"], tasks.as_str());
    assert_eq!(messages[1]["body_prefix"], "not json at all");
    let reason = messages[1]["reason"].as_str().unwrap();
    assert!(!reason.is_empty(), "{listing:#}");
    assert_eq!(messages[2]["size"], long.len());
    // The first 256 bytes, without the character the cut split.
    let prefix = format!("{{\"pad\": \"{}", "é".repeat(123));
    assert_eq!(messages[2]["body_prefix"], prefix.as_str());
    for message in messages {
        let at = message["dead_lettered_at"].as_str().unwrap();
        assert!(at.ends_with('Z'), "{message}");
    }
    assert!(messages[0]["dead_lettered_at"].as_str() <= messages[2]["dead_lettered_at"].as_str());

    // Listing consumed nothing: the same messages, in the same order, and RabbitMQ counts
    // them all as ready.
    let (_, again) = fleet.request("GET", "/v1/dead-letters", None).await;
    assert_eq!(again, listing);
    assert_eq!(ready_in_queue(&channel, &fleet).await, 3);
    let (status, first) = fleet.request("GET", "/v1/dead-letters?limit=1", None).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["total"], 3, "{first}");
    assert_eq!(first["messages"], json!([messages[0]]));
    for query in ["limit=0", "limit=1001", "limit=x", "cursor=a"] {
        let (status, refused) = fleet
            .request("GET", &format!("/v1/dead-letters?{query}"), None)
            .await;
        assert_eq!(status, 400, "{query}: {refused}");
    }

    // Only an admin key sees or purges them.
    let reader = fleet.create_key("team-a", "runs:read,runs:write").unwrap();
    for (method, path) in [
        ("GET", "/v1/dead-letters"),
        ("POST", "/v1/dead-letters:purge"),
    ] {
        let (status, refused) = fleet.request_as(&reader, method, path, None).await;
        assert_eq!(status, 403, "{method} {path}: {refused}");
    }
    assert_eq!(ready_in_queue(&channel, &fleet).await, 3);

    let (status, purged) = fleet.request("POST", "/v1/dead-letters:purge", None).await;
    assert_eq!(status, 200, "{purged}");
    assert_eq!(purged, json!({"purged": 3}));
    let (_, emptied) = fleet.request("GET", "/v1/dead-letters", None).await;
    assert_eq!(emptied, json!({"total": 0, "messages": []}));

    let (status, audit) = fleet.request("GET", "/v1/audit", None).await;
    assert_eq!(status, 200, "{audit}");
    let event = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|event| event["action"] == "dead_letters.purge")
        .unwrap_or_else(|| panic!("no purge in the audit trail: {audit:#}"));
    assert_eq!(
        event["target"],
        format!("{}.dead-letters", fleet.namespace).as_str()
    );
    assert_eq!(event["detail"], json!({"purged": 3}));
    assert!(event["key_id"].is_string(), "{event}");
    let metrics = fleet.metrics_text().await;
    assert!(
        metrics.contains("\ntaskfleet_dead_letters_purged_total 3\n"),
        "{metrics}"
    );

    // The CLI lists (as a table, and as the API's JSON) and purges.
    publish(&channel, &fleet, "completions", br#"{"again": true}"#).await;
    wait_for_dead_letters(&fleet, 1).await;
    let taskfleet = |args: &[&str]| {
        let output = Command::new(taskfleet_tests::bin_dir().join("taskfleet"))
            .args(args)
            .env("TASKFLEET_API_URL", &fleet.api)
            .env("TASKFLEET_API_KEY", &fleet.api_key)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{args:?}: {stderr}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let table = taskfleet(&["dead-letters"]);
    assert!(table.starts_with("1 dead letter\n"), "{table}");
    assert!(table.contains(&completions), "{table}");
    assert!(table.contains(r#"{"again": true}"#), "{table}");
    let listed: Value = serde_json::from_str(&taskfleet(&[
        "dead-letters",
        "list",
        "--limit",
        "5",
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(listed["total"], 1, "{listed}");
    assert_eq!(listed["messages"][0]["body_prefix"], r#"{"again": true}"#);
    assert_eq!(
        taskfleet(&["dead-letters", "purge"]).trim(),
        "purged 1 dead letter"
    );
    assert_eq!(ready_in_queue(&channel, &fleet).await, 0);
    let _ = connection.close(200, "test done".into()).await;
}
