//! The API over TLS against a real fleet: HTTPS with the operator's certificate, TLS 1.3 only
//! unless 1.2 is allowed, clients that trust the CA (the CLI, the Python client) and clients
//! that do not, and certificates that cannot be used.

#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use taskfleet_tests::pki::Pki;
use taskfleet_tests::{FleetOptions, TestFleet, http_client};

fn pki(name: &str) -> Pki {
    let dir = std::env::temp_dir().join(format!("taskfleet-tls-{name}-{}", uuid::Uuid::new_v4()));
    Pki::make(&dir).unwrap()
}

fn ca(pki: &Pki) -> reqwest::Certificate {
    reqwest::Certificate::from_pem(&std::fs::read(&pki.ca).unwrap()).unwrap()
}

#[tokio::test]
async fn the_api_serves_tls_1_3_to_clients_that_trust_its_ca() {
    let pki = pki("api");
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        api_tls: Some(pki.clone()),
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    assert!(fleet.api.starts_with("https://localhost:"), "{}", fleet.api);
    let run = fleet
        .run(
            &json!({"steps": [{"id": "a", "python_code": "def main(x):\n    return x + 1\n"}]}),
            &json!(41),
        )
        .await;
    assert_eq!(run["output"], 42, "{run}");

    let url = format!("{}/v1/stats", fleet.api);
    let authorization = format!("Bearer {}", fleet.api_key);
    // TLS 1.3 works; a client that stops at 1.2 is refused; so is one without the CA.
    let tls13 = http_client()
        .tls_certs_only([ca(&pki)])
        .tls_version_min(reqwest::tls::Version::TLS_1_3)
        .build()
        .unwrap();
    let answer = tls13
        .get(&url)
        .header("authorization", &authorization)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    let tls12 = http_client()
        .tls_certs_only([ca(&pki)])
        .tls_version_max(reqwest::tls::Version::TLS_1_2)
        .build()
        .unwrap();
    assert!(tls12.get(&url).send().await.is_err());
    let untrusting = http_client().build().unwrap();
    let error = untrusting.get(&url).send().await.unwrap_err();
    let chain = format!("{error:?}");
    assert!(
        chain.contains("UnknownIssuer") || chain.contains("certificate"),
        "{chain}"
    );
    // Plain HTTP to the TLS port fails at once rather than hanging.
    let started = Instant::now();
    let plain = http_client()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let port = fleet.api.rsplit(':').next().unwrap();
    assert!(
        plain
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .is_err()
    );
    assert!(started.elapsed() < Duration::from_secs(15));

    // A client that connects and never speaks holds up no one.
    let _silent = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    let (status, _) = fleet.request("GET", "/v1/stats", None).await;
    assert_eq!(status, 200);

    // The CLI, with the CA from the environment, and without it.
    let cli = |ca_cert: Option<&std::path::Path>| {
        let mut command = Command::new(taskfleet_tests::bin_dir().join("taskfleet"));
        command
            .args(["stats", "--output", "json"])
            .env("TASKFLEET_API_URL", &fleet.api)
            .env("TASKFLEET_API_KEY", &fleet.api_key)
            .env_remove("TASKFLEET_CA_CERT");
        if let Some(path) = ca_cert {
            command.env("TASKFLEET_CA_CERT", path);
        }
        command.output().unwrap()
    };
    let trusted = cli(Some(&pki.ca));
    assert!(
        trusted.status.success(),
        "{}",
        String::from_utf8_lossy(&trusted.stderr)
    );
    let untrusted = cli(None);
    assert!(!untrusted.status.success());
    let stderr = String::from_utf8_lossy(&untrusted.stderr);
    assert!(
        stderr.contains("certificate") || stderr.contains("UnknownIssuer"),
        "{stderr}"
    );
    let missing = cli(Some(std::path::Path::new("/no/such/ca.pem")));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("TASKFLEET_CA_CERT") && stderr.contains("/no/such/ca.pem"),
        "{stderr}"
    );

    // The Python client, with the CA.
    let python = Command::new("python3")
        .args([
            "-c",
            "import os, taskfleet; print(taskfleet.Client(ca_cert=os.environ['CA']).stats()['tenant'])",
        ])
        .env("PYTHONPATH", taskfleet_tests::workspace_root().join("python"))
        .env("TASKFLEET_API_URL", &fleet.api)
        .env("TASKFLEET_API_KEY", &fleet.api_key)
        .env("CA", &pki.ca)
        .output()
        .unwrap();
    assert!(
        python.status.success(),
        "{}",
        String::from_utf8_lossy(&python.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&python.stdout).trim(), "None");
}

#[tokio::test]
async fn tls_1_2_is_accepted_only_when_allowed() {
    let pki = pki("tls12");
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 0,
        api_tls: Some(pki.clone()),
        scheduler_env: vec![("TASKFLEET_TLS_MIN_VERSION".into(), "1.2".into())],
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let tls12 = http_client()
        .tls_certs_only([ca(&pki)])
        .tls_version_max(reqwest::tls::Version::TLS_1_2)
        .build()
        .unwrap();
    let answer = tls12
        .get(format!("{}/healthz", fleet.api))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);
}

#[tokio::test]
async fn certificates_that_cannot_be_used_stop_the_start_and_say_why() {
    let pki = pki("bad");
    let other = pki_other();
    let garbage =
        std::env::temp_dir().join(format!("taskfleet-tls-garbage-{}", uuid::Uuid::new_v4()));
    std::fs::write(&garbage, "not a certificate").unwrap();
    let start = |cert: &std::path::Path, key: &std::path::Path| {
        let output = Command::new(taskfleet_tests::bin_dir().join("taskfleet-scheduler"))
            .env("TASKFLEET_TLS_CERT", cert)
            .env("TASKFLEET_TLS_KEY", key)
            .env("TASKFLEET_HTTP_ADDR", "127.0.0.1:0")
            .env(
                "TASKFLEET_DATABASE_URL",
                "postgres://postgres@127.0.0.1:1/none",
            )
            .output()
            .unwrap();
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let missing = start(std::path::Path::new("/no/such/cert.pem"), &pki.key);
    assert!(
        missing.contains("TASKFLEET_TLS_CERT /no/such/cert.pem")
            && missing.contains("cannot be read"),
        "{missing}"
    );
    let not_pem = start(&garbage, &pki.key);
    assert!(not_pem.contains("holds no PEM certificate"), "{not_pem}");
    let no_key = start(&pki.cert, &garbage);
    assert!(
        no_key.contains("TASKFLEET_TLS_KEY") && no_key.contains("private key"),
        "{no_key}"
    );
    let mismatched = start(&pki.cert, &other.key);
    assert!(
        mismatched.contains("cannot be used together"),
        "{mismatched}"
    );
    // Only one of the two is a usage error naming the other.
    let output = Command::new(taskfleet_tests::bin_dir().join("taskfleet-scheduler"))
        .env("TASKFLEET_TLS_CERT", &pki.cert)
        .env_remove("TASKFLEET_TLS_KEY")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--tls-key"));
}

fn pki_other() -> Pki {
    pki("other")
}
