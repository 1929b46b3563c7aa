//! API keys and tenants against a real fleet: every `/v1` request needs a key, scopes limit what
//! a key may do, a tenant never reaches another's objects, revocation takes effect on every
//! scheduler within a second, and no secret is kept anywhere in the database.

#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use taskfleet_tests::{FleetOptions, POSTGRES, TestFleet};

/// Makes a key through the API with the fleet's admin key and returns (id, secret).
async fn make_key(fleet: &TestFleet, tenant: &str, scopes: &[&str]) -> (String, String) {
    let (status, answer) = fleet
        .request(
            "POST",
            "/v1/keys",
            Some(&json!({"tenant": tenant, "scopes": scopes, "description": "a test's"})),
        )
        .await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["tenant"], tenant, "{answer}");
    (
        answer["id"].as_str().unwrap().to_owned(),
        answer["key"].as_str().unwrap().to_owned(),
    )
}

fn python_run() -> Value {
    json!({"definition": {"steps": [
        {"id": "plain", "dataflow": "."},
        {"id": "code", "python_code": "def main(x):\n    return x\n", "after": ["plain"]}
    ]}, "input": 1})
}

#[tokio::test]
async fn keys_are_required_and_bad_credentials_get_a_clear_401() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 0,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let (id, secret) = make_key(&fleet, "acme", &["runs:read"]).await;
    let api = fleet.api.as_str();

    // Missing, unknown and revoked keys get the very same answer.
    let (status, missing) = fleet
        .request_with_credentials(api, None, "GET", "/v1/runs", None)
        .await;
    assert_eq!(status, 401, "{missing}");
    let (status, unknown) = fleet
        .request_as("tfk_not-a-key-at-all", "GET", "/v1/runs", None)
        .await;
    assert_eq!(status, 401, "{unknown}");
    assert_eq!(unknown, missing);
    let (status, _) = fleet.request_as(&secret, "GET", "/v1/runs", None).await;
    assert_eq!(status, 200);
    let (status, revoked) = fleet
        .request("DELETE", &format!("/v1/keys/{id}"), None)
        .await;
    assert_eq!(status, 200, "{revoked}");
    assert!(revoked["revoked_at"].is_string(), "{revoked}");
    let deadline = Instant::now() + Duration::from_millis(1500);
    loop {
        let (status, answer) = fleet.request_as(&secret, "GET", "/v1/runs", None).await;
        if status == 401 {
            assert_eq!(answer, missing);
            break;
        }
        assert!(Instant::now() < deadline, "the revoked key still works");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Malformed credentials are named.
    let long = format!("Bearer {}", "k".repeat(10_000));
    for (header, needle) in [
        (b"Bearer".as_slice(), "no key"),
        (b"Bearer    ".as_slice(), "no key"),
        (b"Basic dXNlcjpwYXNz".as_slice(), "Bearer <key>"),
        ("Bearer cl\u{e9}".as_bytes(), "ASCII"),
        (long.as_bytes(), "longer than"),
    ] {
        let (status, answer) = fleet
            .request_with_credentials(api, Some(header), "GET", "/v1/runs", None)
            .await;
        assert_eq!(status, 401, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{message}");
    }

    // Health and readiness need no key.
    for path in ["/healthz", "/readyz"] {
        let (status, answer) = fleet
            .request_with_credentials(api, None, "GET", path, None)
            .await;
        assert_eq!(status, 200, "{path}: {answer}");
    }

    // The OpenAPI document needs a key, of any scope, and lists what the API serves.
    let (status, _) = fleet
        .request_with_credentials(api, None, "GET", "/v1/openapi.json", None)
        .await;
    assert_eq!(status, 401);
    let (_, reader) = make_key(&fleet, "acme", &["runs:read"]).await;
    let (status, document) = fleet
        .request_as(&reader, "GET", "/v1/openapi.json", None)
        .await;
    assert_eq!(status, 200, "{document}");
    assert_eq!(document["openapi"], "3.1.0");
    for path in ["/v1/runs", "/v1/tasks/{id}", "/v1/keys", "/healthz"] {
        assert!(document["paths"][path].is_object(), "{path} is not listed");
    }
    assert_eq!(
        document["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
}

#[tokio::test]
async fn scopes_limit_what_a_key_may_do() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let (_, reader) = make_key(&fleet, "acme", &["runs:read"]).await;
    let (_, writer) = make_key(&fleet, "acme", &["runs:read", "runs:write"]).await;
    let (_, coder) = make_key(&fleet, "acme", &["runs:write", "python_code"]).await;
    let (_, author) = make_key(&fleet, "acme", &["workflows:write"]).await;

    let (status, answer) = fleet
        .request_as(&reader, "POST", "/v1/runs", Some(&python_run()))
        .await;
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("runs:write")
    );

    // Inline Python needs python_code, named with the step, for runs, jobs and registrations.
    let (status, answer) = fleet
        .request_as(&writer, "POST", "/v1/runs", Some(&python_run()))
        .await;
    assert_eq!(status, 403, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("\"code\"") && message.contains("python_code"),
        "{message}"
    );
    let job = json!({"python_code": "def main(x):\n    return x\n", "input": 2});
    let (status, _) = fleet
        .request_as(&writer, "POST", "/v1/tasks", Some(&job))
        .await;
    assert_eq!(status, 403);
    let definition = json!({"steps": [{"id": "c", "python_code": "def main(x):\n    return x\n"}]});
    let (status, answer) = fleet
        .request_as(&author, "PUT", "/v1/workflows/inline", Some(&definition))
        .await;
    assert_eq!(status, 403, "{answer}");
    let (status, answer) = fleet
        .request_as(
            &writer,
            "PUT",
            "/v1/workflows/plain",
            Some(&json!({"steps": [{"id": "a", "dataflow": "."}]})),
        )
        .await;
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("workflows:write")
    );

    let (status, answer) = fleet
        .request_as(&coder, "POST", "/v1/runs", Some(&python_run()))
        .await;
    assert_eq!(status, 201, "{answer}");
    let id = answer["id"].as_str().unwrap();
    let (status, run) = fleet
        .request_as(&writer, "GET", &format!("/v1/runs/{id}?wait=30"), None)
        .await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["status"], "succeeded", "{run}");

    // Fleet views, keys and the audit trail are an admin's.
    for path in ["/v1/workers", "/v1/queues", "/v1/keys", "/v1/audit"] {
        let (status, answer) = fleet.request_as(&writer, "GET", path, None).await;
        assert_eq!(status, 403, "{path}: {answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("admin")
        );
    }
    let (status, _) = fleet
        .request_as(
            &writer,
            "POST",
            "/v1/keys",
            Some(&json!({"tenant": "acme", "scopes": ["admin"]})),
        )
        .await;
    assert_eq!(status, 403);

    // Bad key requests name what is wrong.
    for (body, needle) in [
        (json!({"tenant": "acme", "scopes": ["root"]}), "\"root\""),
        (json!({"tenant": "acme", "scopes": []}), "at least one"),
        (json!({"tenant": "a b", "scopes": ["runs:read"]}), "tenant"),
        (json!({"tenant": "", "scopes": ["runs:read"]}), "tenant"),
        (
            json!({"tenant": "acme", "scopes": ["runs:read"], "colour": 1}),
            "colour",
        ),
    ] {
        let (status, answer) = fleet.request("POST", "/v1/keys", Some(&body)).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{message}");
    }
    for id in ["nope", "01a2484b-5aaf-75dc-8550-c4e9604df11d"] {
        let (status, _) = fleet
            .request("DELETE", &format!("/v1/keys/{id}"), None)
            .await;
        assert_eq!(status, 404);
    }
}

#[tokio::test]
async fn a_tenant_never_reaches_another_tenants_runs_jobs_or_workflows() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let scopes = ["runs:read", "runs:write", "workflows:write"];
    let (_, acme) = make_key(&fleet, "acme", &scopes).await;
    let (_, globex) = make_key(&fleet, "globex", &scopes).await;

    // The same workflow name and idempotency key in each tenant: two of each.
    for (key, program) in [(&acme, ". + 1"), (&globex, ". * 10")] {
        let definition = json!({"steps": [{"id": "a", "dataflow": program}]});
        let (status, answer) = fleet
            .request_as(key, "PUT", "/v1/workflows/shared", Some(&definition))
            .await;
        assert_eq!(status, 201, "{answer}");
        assert_eq!(answer["version"], 1, "{answer}");
    }
    let submit = json!({"workflow": "shared", "input": 5, "idempotency_key": "k1"});
    let (_, acme_run) = fleet
        .request_as(&acme, "POST", "/v1/runs", Some(&submit))
        .await;
    let (status, globex_run) = fleet
        .request_as(&globex, "POST", "/v1/runs", Some(&submit))
        .await;
    assert_eq!(status, 201, "{globex_run}");
    let acme_id = acme_run["id"].as_str().unwrap();
    let globex_id = globex_run["id"].as_str().unwrap();
    assert_ne!(acme_id, globex_id);
    let (_, acme_done) = fleet
        .request_as(&acme, "GET", &format!("/v1/runs/{acme_id}?wait=30"), None)
        .await;
    assert_eq!(acme_done["output"], 6, "{acme_done}");
    let (_, globex_done) = fleet
        .request_as(
            &globex,
            "GET",
            &format!("/v1/runs/{globex_id}?wait=30"),
            None,
        )
        .await;
    assert_eq!(globex_done["output"], 50, "{globex_done}");

    // Another tenant's run, job and workflow answer exactly as if they did not exist.
    let (_, parked) = fleet
        .request_as(
            &acme,
            "POST",
            "/v1/tasks",
            Some(&json!({"dataflow": ".", "queue": "nobody"})),
        )
        .await;
    let job_id = parked["id"].as_str().unwrap();
    let missing_run = "01a2484b-5aaf-75dc-8550-c4e9604df11d";
    for (method, path, twin) in [
        (
            "GET",
            format!("/v1/runs/{acme_id}"),
            format!("/v1/runs/{missing_run}"),
        ),
        (
            "GET",
            format!("/v1/runs/{acme_id}?wait=1"),
            format!("/v1/runs/{missing_run}?wait=1"),
        ),
        (
            "POST",
            format!("/v1/runs/{acme_id}/cancel"),
            format!("/v1/runs/{missing_run}/cancel"),
        ),
        (
            "GET",
            format!("/v1/tasks/{job_id}"),
            format!("/v1/tasks/{missing_run}"),
        ),
        (
            "POST",
            format!("/v1/tasks/{job_id}/cancel"),
            format!("/v1/tasks/{missing_run}/cancel"),
        ),
    ] {
        let (status, answer) = fleet.request_as(&globex, method, &path, None).await;
        assert_eq!(status, 404, "{path}: {answer}");
        let (_, absent) = fleet.request_as(&globex, method, &twin, None).await;
        let strip = |value: &Value| {
            value["error"]["message"]
                .as_str()
                .unwrap()
                .replace(acme_id, "ID")
                .replace(job_id, "ID")
                .replace(missing_run, "ID")
        };
        assert_eq!(strip(&answer), strip(&absent), "{path}");
    }
    let (_, listed) = fleet.request_as(&globex, "GET", "/v1/runs", None).await;
    let ids: Vec<&str> = listed["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![globex_id], "{listed}");
    let (_, jobs) = fleet.request_as(&globex, "GET", "/v1/tasks", None).await;
    assert_eq!(jobs["jobs"], json!([]), "{jobs}");
    let (_, stats) = fleet.request_as(&globex, "GET", "/v1/stats", None).await;
    assert_eq!(stats["tenant"], "globex", "{stats}");
    assert_eq!(stats["runs"], json!({"succeeded": 1}), "{stats}");

    // The owner still reaches them, and may cancel; the cancellation is audited.
    let (status, _) = fleet
        .request_as(&acme, "POST", &format!("/v1/tasks/{job_id}/cancel"), None)
        .await;
    assert_eq!(status, 200);
    let (_, audit) = fleet.request("GET", "/v1/audit", None).await;
    let actions: Vec<&str> = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|event| event["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions[0], "job.cancel", "{audit}");
    assert_eq!(audit["events"][0]["target"], job_id, "{audit}");
    assert!(actions.contains(&"key.create"), "{audit}");
}

#[tokio::test]
async fn a_revoked_key_stops_working_on_every_scheduler_and_no_secret_is_stored() {
    let mut fleet = TestFleet::start_with(FleetOptions {
        workers: 0,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let other = fleet.start_another_scheduler().await.unwrap();
    let (id, secret) = make_key(&fleet, "acme", &["runs:read"]).await;
    let authorization = format!("Bearer {secret}");
    for api in [fleet.api.clone(), other.clone()] {
        let (status, _) = fleet
            .request_with_credentials(
                &api,
                Some(authorization.as_bytes()),
                "GET",
                "/v1/runs",
                None,
            )
            .await;
        assert_eq!(status, 200);
    }
    let (_, keys) = fleet.request("GET", "/v1/keys", None).await;
    let listed = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|key| key["id"] == id.as_str())
        .cloned()
        .unwrap();
    assert!(listed.get("key").is_none(), "{listed}");
    assert_eq!(listed["scopes"], json!(["runs:read"]), "{listed}");

    let revoked_at = Instant::now();
    let (status, _) = fleet
        .request("DELETE", &format!("/v1/keys/{id}"), None)
        .await;
    assert_eq!(status, 200);
    for api in [fleet.api.clone(), other.clone()] {
        loop {
            let (status, _) = fleet
                .request_with_credentials(
                    &api,
                    Some(authorization.as_bytes()),
                    "GET",
                    "/v1/runs",
                    None,
                )
                .await;
            if status == 401 {
                break;
            }
            assert!(
                revoked_at.elapsed() < Duration::from_millis(1500),
                "{api} still accepts the revoked key"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // The whole database, dumped, holds neither this key nor the fleet's admin key.
    let dump = Command::new("pg_dump")
        .args(["--data-only", &format!("{POSTGRES}/{}", fleet.database)])
        .output()
        .unwrap();
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains(&id), "the dump holds the key's id");
    assert!(!dump.contains(&secret), "the dump holds a key's secret");
    assert!(
        !dump.contains(&fleet.api_key),
        "the dump holds the admin key's secret"
    );
    assert!(!dump.contains(&secret["tfk_".len()..]));
}

#[tokio::test]
async fn authentication_off_serves_only_on_loopback_and_needs_no_key() {
    // On every address, the scheduler refuses to start and says why.
    let refused = Command::new(taskfleet_tests::bin_dir().join("taskfleet-scheduler"))
        .env("TASKFLEET_AUTH", "off")
        .env("TASKFLEET_HTTP_ADDR", "0.0.0.0:1")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("TASKFLEET_AUTH=off") && stderr.contains("0.0.0.0:1"),
        "{stderr}"
    );

    let fleet = TestFleet::start_with(FleetOptions {
        workers: 0,
        scheduler_env: vec![("TASKFLEET_AUTH".into(), "off".into())],
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let (status, answer) = fleet
        .request_with_credentials(&fleet.api, None, "GET", "/v1/stats", None)
        .await;
    assert_eq!(status, 200, "{answer}");

    // A bad scope on the command line is named, and nothing is made.
    let bad = Command::new(taskfleet_tests::bin_dir().join("taskfleet-scheduler"))
        .args([
            "create-key",
            "--tenant",
            "acme",
            "--scopes",
            "runs:read,root",
        ])
        .env(
            "TASKFLEET_DATABASE_URL",
            format!("{POSTGRES}/{}", fleet.database),
        )
        .env("TASKFLEET_NAMESPACE", &fleet.namespace)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("\"root\""));
}

#[tokio::test]
async fn tenant_quotas_answer_429_past_their_limits_and_leave_other_tenants_alone() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 0,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let scopes = ["runs:read", "runs:write"];
    let (_, acme) = make_key(&fleet, "acme", &scopes).await;
    let (_, globex) = make_key(&fleet, "globex", &scopes).await;
    // Jobs on a queue no worker reads stay unfinished.
    let parked = json!({"dataflow": ".", "queue": "nobody"});

    let (status, answer) = fleet
        .request(
            "PUT",
            "/v1/tenants/acme",
            Some(&json!({"runs_in_flight": 2})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        json!({"tenant": "acme", "submissions_per_s": null, "runs_in_flight": 2})
    );
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (status, answer) = fleet
            .request_as(&acme, "POST", "/v1/tasks", Some(&parked))
            .await;
        assert_eq!(status, 201, "{answer}");
        ids.push(answer["id"].as_str().unwrap().to_owned());
    }
    let refused = fleet
        .http
        .post(format!("{}/v1/tasks", fleet.api))
        .bearer_auth(&acme)
        .json(&parked)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "quota_exceeded", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 2 runs unfinished")
    );
    // Repeating an accepted submission is never refused: its answer is the job it made.
    let keyed = json!({"dataflow": ".", "queue": "nobody", "idempotency_key": "once"});
    let (status, first) = fleet
        .request_as(&acme, "POST", "/v1/tasks", Some(&keyed))
        .await;
    assert_eq!(status, 429, "{first}");
    let (status, _) = fleet
        .request_as(&acme, "POST", &format!("/v1/tasks/{}/cancel", ids[1]), None)
        .await;
    assert_eq!(status, 200);
    let (status, first) = fleet
        .request_as(&acme, "POST", "/v1/tasks", Some(&keyed))
        .await;
    assert_eq!(status, 201, "{first}");
    let (status, again) = fleet
        .request_as(&acme, "POST", "/v1/tasks", Some(&keyed))
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["id"], first["id"], "{again}");
    // A batch larger than the quota is refused whole; another tenant is not limited.
    let batch = json!({"runs": [
        {"definition": {"steps": [{"id": "a", "dataflow": ".", "queue": "nobody"}]}},
        {"definition": {"steps": [{"id": "a", "dataflow": ".", "queue": "nobody"}]}},
        {"definition": {"steps": [{"id": "a", "dataflow": ".", "queue": "nobody"}]}},
    ]});
    let (status, _) = fleet
        .request_as(&acme, "POST", "/v1/runs:batch", Some(&batch))
        .await;
    assert_eq!(status, 429);
    let (status, _) = fleet
        .request_as(&globex, "POST", "/v1/runs:batch", Some(&batch))
        .await;
    assert_eq!(status, 201);
    // A finished (here cancelled) run frees its place.
    let (status, _) = fleet
        .request_as(&acme, "POST", &format!("/v1/tasks/{}/cancel", ids[0]), None)
        .await;
    assert_eq!(status, 200);
    let (status, answer) = fleet
        .request_as(&acme, "POST", "/v1/tasks", Some(&parked))
        .await;
    assert_eq!(status, 201, "{answer}");

    // Submissions per second, across the fleet; the change applies within a second.
    let (status, _) = fleet
        .request(
            "PUT",
            "/v1/tenants/acme",
            Some(&json!({"submissions_per_s": 3, "runs_in_flight": null})),
        )
        .await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let started = Instant::now();
    let mut accepted = 0;
    let mut refused = 0;
    for _ in 0..20 {
        let (status, answer) = fleet
            .request_as(&acme, "POST", "/v1/tasks", Some(&parked))
            .await;
        match status {
            201 => accepted += 1,
            429 => {
                refused += 1;
                assert!(
                    answer["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("3 runs per second")
                );
            }
            other => panic!("{other}: {answer}"),
        }
    }
    let windows = started.elapsed().as_secs() + 2;
    assert!(refused > 0, "none of 20 quick submissions was refused");
    assert!(
        accepted <= 3 * windows,
        "{accepted} accepted in {windows} one-second windows"
    );

    let (_, tenants) = fleet.request("GET", "/v1/tenants", None).await;
    assert_eq!(tenants["tenants"][0]["tenant"], "acme", "{tenants}");
    assert_eq!(tenants["tenants"][0]["submissions_per_s"], 3, "{tenants}");
    let (_, audit) = fleet.request("GET", "/v1/audit?limit=1000", None).await;
    let quota_changes = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|event| event["action"] == "tenant.quota")
        .count();
    assert_eq!(quota_changes, 2, "{audit}");

    // Bad quotas and callers without admin.
    for (path, body, needle) in [
        (
            "/v1/tenants/acme",
            json!({"runs_in_flight": 0}),
            "runs_in_flight",
        ),
        (
            "/v1/tenants/acme",
            json!({"submissions_per_s": -1}),
            "submissions_per_s",
        ),
        (
            "/v1/tenants/acme",
            json!({"submissions_per_s": 10_000_000_000_i64}),
            "submissions_per_s",
        ),
        (
            "/v1/tenants/acme",
            json!({"runs_in_flight": "many"}),
            "runs_in_flight",
        ),
        ("/v1/tenants/acme", json!({"burst": 1}), "burst"),
        ("/v1/tenants/a%20b", json!({}), "tenant"),
    ] {
        let (status, answer) = fleet.request("PUT", path, Some(&body)).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{message}");
    }
    let (status, _) = fleet
        .request_as(&acme, "PUT", "/v1/tenants/acme", Some(&json!({})))
        .await;
    assert_eq!(status, 403);
}
