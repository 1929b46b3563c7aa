//! The fleet's connections to its services over TLS, trusting a CA the test makes
//! (`TASKFLEET_CA_CERT` for RabbitMQ and Redis, the URL's `sslrootcert` for PostgreSQL), and
//! refused without it. Each test brings up its own TLS endpoints, and takes them down when it
//! ends, failed or not, without touching the shared services' configuration:
//!
//! - Redis: a server of its own with a TLS port and no plain one;
//! - RabbitMQ: a TLS listener added to the shared broker while the test runs;
//! - PostgreSQL: a cluster of its own with TLS on. The shared cluster's certificate is one of
//!   this machine's trusted CA certificates, so it cannot show a connection refused for want
//!   of the CA.
//!
//! These tests need root (the cluster runs as `postgres`, `rabbitmqctl` talks to the broker).

#![allow(clippy::unwrap_used, clippy::print_stderr, missing_docs)]

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;
use taskfleet_tests::pki::Pki;
use taskfleet_tests::tls_services::*;
use taskfleet_tests::{FleetOptions, Services, TestFleet, bin_dir, free_port};

/// Starts a scheduler and a worker that reach `tls`'s services trusting their CA.
async fn fleet_trusting_the_ca(tls: &TlsServices) -> TestFleet {
    TestFleet::start_with(FleetOptions {
        workers: 1,
        scheduler_env: tls.ca_env(),
        worker_env: tls.ca_env(),
        services: tls.services(Trust::Ca),
        ..FleetOptions::default()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_fleet_reaches_all_its_services_over_tls_trusting_its_ca() {
    let tls = TlsServices::start().unwrap();
    let fleet = fleet_trusting_the_ca(&tls).await;
    let definition = json!({"steps": [
        {"id": "double", "dataflow": ".n * 2"},
        {"id": "describe", "python_code": "def main(n):\n    return f'{n} over tls'\n",
         "after": ["double"]},
    ]});
    let run = fleet.run(&definition, &json!({"n": 21})).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["output"], "42 over tls", "{run:#}");

    let (postgres, amqp, keys) = all_connections_are_tls(&tls, &fleet).await;
    eprintln!(
        "over tls: {postgres} postgresql connections, {amqp} rabbitmq connections, {keys} redis keys"
    );
}

/// Checks that the fleet's connections are all TLS 1.3 (PostgreSQL, RabbitMQ) or made to a
/// server with no plain port (Redis), and that the fleet uses each; returns how many
/// connections to PostgreSQL and RabbitMQ it has, and how many keys in Redis.
async fn all_connections_are_tls(tls: &TlsServices, fleet: &TestFleet) -> (usize, usize, usize) {
    // PostgreSQL: every connection of the scheduler to the fleet's database.
    let mut db = {
        use sqlx::Connection;
        let url = tls.services(Trust::Ca).database_url(&fleet.database);
        sqlx::PgConnection::connect(&url).await.unwrap()
    };
    let connections: Vec<(bool, Option<String>)> = sqlx::query_as(
        "SELECT s.ssl, s.version FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
         WHERE a.datname = $1 AND a.pid <> pg_backend_pid()",
    )
    .bind(&fleet.database)
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert!(!connections.is_empty(), "the scheduler holds connections");
    for connection in &connections {
        assert_eq!(connection, &(true, Some("TLSv1.3".to_owned())));
    }

    // Redis: the server has no plain port, and holds the fleet's keys.
    let mut redis = tls
        .redis_client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let port: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("port")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(port, ["port", "0"]);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", fleet.namespace))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        keys.iter().any(|key| key.contains(":result:")),
        "the worker cached the results here: {keys:?}"
    );

    // RabbitMQ: the scheduler and the worker are connected through the TLS listener.
    let versions = tls.amqp.versions().unwrap();
    assert!(versions.len() >= 2, "{versions:?}");
    assert!(
        versions.iter().all(|version| version == "tlsv1.3"),
        "{versions:?}"
    );
    (connections.len(), versions.len(), keys.len())
}

#[tokio::test]
async fn connections_cut_by_the_services_come_back_over_tls() {
    let tls = TlsServices::start().unwrap();
    let fleet = fleet_trusting_the_ca(&tls).await;
    let definition = json!({"steps": [
        {"id": "double", "dataflow": ".n * 2"},
        {"id": "half", "python_code": "def main(n):\n    return n / 2\n", "after": ["double"]},
    ]});
    let run = fleet.run(&definition, &json!({"n": 3})).await;
    assert_eq!(run["output"], 3.0, "{run:#}");

    // Each service drops the fleet's connections, as a restart would.
    let closed = tls.amqp.close_connections().unwrap();
    assert!(closed >= 2, "{closed}");
    let mut redis = tls
        .redis_client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for kind in ["normal", "pubsub"] {
        let _: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg(kind)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    {
        use sqlx::Connection;
        let url = tls.services(Trust::Ca).database_url("postgres");
        let mut db = sqlx::PgConnection::connect(&url).await.unwrap();
        let _: Vec<(bool,)> = sqlx::query_as(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&fleet.database)
        .fetch_all(&mut db)
        .await
        .unwrap();
    }

    // The processes reconnect, through the same TLS endpoints (the only ones they know), and
    // runs go on. The first statements on connections that died may fail: submit until one is
    // taken.
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = loop {
        let (status, body) = fleet
            .request(
                "POST",
                "/v1/runs",
                Some(&json!({"definition": definition, "input": {"n": 5}})),
            )
            .await;
        if status == 201 {
            break body["id"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "{status}: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let run = fleet.wait_run(&id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["output"], 5.0, "{run:#}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while tls.amqp.versions().unwrap().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the fleet did not reconnect to rabbitmq"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (postgres, amqp, keys) = all_connections_are_tls(&tls, &fleet).await;
    eprintln!(
        "over tls again: {postgres} postgresql connections, {amqp} rabbitmq connections, {keys} redis keys"
    );
}

/// A process of a test, its standard output and error in one file; killed when dropped.
struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn start(binary: &str, env: &[(String, String)], log: PathBuf) -> Result<Self> {
        let file = File::create(&log)?;
        let child = Command::new(bin_dir().join(binary))
            .env_remove("TASKFLEET_CA_CERT")
            .envs(env.iter().map(|(key, value)| (key, value)))
            .env("RUST_LOG", "info")
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {binary}"))?;
        Ok(Self { child, log })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the process exits, up to `within`.
    async fn exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {within:?}: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the log holds `text`, up to `within`, the process still running.
    async fn logs(&mut self, text: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let log = self.log();
            if log.contains(text) {
                return log;
            }
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "exited without logging {text}: {log}"
            );
            assert!(
                Instant::now() < deadline,
                "{text} not logged within {within:?}: {log}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The environment of a process of `services`, in a namespace of its own, with `extra`.
fn environment(services: &Services, extra: &[(&str, String)]) -> Vec<(String, String)> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let mut env = vec![
        (
            "TASKFLEET_DATABASE_URL".to_owned(),
            services.database_url("taskfleet"),
        ),
        ("TASKFLEET_AMQP_URL".to_owned(), services.amqp.clone()),
        ("TASKFLEET_REDIS_URL".to_owned(), services.redis.clone()),
        (
            "TASKFLEET_NAMESPACE".to_owned(),
            format!("tft-{}", &id[..12]),
        ),
    ];
    env.extend(
        extra
            .iter()
            .map(|(key, value)| ((*key).to_owned(), value.clone())),
    );
    env
}

fn log_dir(test: &str) -> PathBuf {
    let dir = taskfleet_tests::workspace_root()
        .join("target/test-logs")
        .join(test);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts a scheduler that must fail to reach a service for want of the CA, and checks that it
/// exits naming the certificate problem without ever serving.
async fn scheduler_exits_on_unknown_issuer(
    services: &Services,
    extra: &[(&str, String)],
    log: PathBuf,
) {
    let http = free_port();
    let env = environment(
        services,
        &[
            extra,
            &[("TASKFLEET_HTTP_ADDR", format!("127.0.0.1:{http}"))],
        ]
        .concat(),
    );
    let mut scheduler = Process::start("taskfleet-scheduler", &env, log).unwrap();
    let status = scheduler.exit(Duration::from_secs(30)).await;
    let log = scheduler.log();
    assert!(!status.success(), "{log}");
    assert!(log.contains(UNKNOWN_ISSUER), "{log}");
    assert!(!log.contains("scheduler listening"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test]
async fn without_the_ca_no_service_is_reached_and_the_certificate_is_named() {
    let tls = TlsServices::start().unwrap();
    let logs = log_dir("tls-without-ca");
    let trusted = tls.services(Trust::Ca);
    let untrusted = tls.services(Trust::SystemOnly);
    let ca = ("TASKFLEET_CA_CERT", path_str(&tls.pki.ca).to_owned());

    // PostgreSQL, verify-full without sslrootcert: the scheduler stops at start.
    scheduler_exits_on_unknown_issuer(
        &untrusted,
        std::slice::from_ref(&ca),
        logs.join("scheduler-postgres.log"),
    )
    .await;

    // Redis, with the database reached: the scheduler stops at start.
    scheduler_exits_on_unknown_issuer(
        &Services {
            redis: untrusted.redis.clone(),
            ..trusted.clone()
        },
        &[],
        logs.join("scheduler-redis.log"),
    )
    .await;

    // RabbitMQ, with the database and Redis (the shared one, plain) reached: the scheduler keeps
    // trying, as it does while a broker is down, and serves nothing meanwhile.
    let http = free_port();
    let env = environment(
        &Services {
            redis: taskfleet_tests::REDIS.to_owned(),
            ..trusted.clone()
        },
        &[("TASKFLEET_HTTP_ADDR", format!("127.0.0.1:{http}"))],
    );
    let mut scheduler =
        Process::start("taskfleet-scheduler", &env, logs.join("scheduler-amqp.log")).unwrap();
    let log = scheduler
        .logs(UNKNOWN_ISSUER, Duration::from_secs(30))
        .await;
    assert!(log.contains("connecting to rabbitmq"), "{log}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !port_open(http),
        "the scheduler serves: {}",
        scheduler.log()
    );
    assert!(!scheduler.log().contains("scheduler listening"));

    // The worker reaches RabbitMQ first, and keeps trying just the same.
    let env = environment(&untrusted, &[]);
    let mut worker =
        Process::start("taskfleet-worker", &env, logs.join("worker-amqp.log")).unwrap();
    let log = worker.logs(UNKNOWN_ISSUER, Duration::from_secs(30)).await;
    assert!(log.contains("connecting to rabbitmq"), "{log}");
    assert!(!log.contains("worker consuming"), "{log}");
    assert!(
        tls.amqp.versions().unwrap().is_empty(),
        "no connection was made"
    );
}

#[tokio::test]
async fn a_ca_certificate_that_cannot_be_used_stops_the_processes_at_start() {
    let logs = log_dir("tls-bad-ca");
    let scratch = Scratch::new().unwrap();
    let pki = Pki::make(&scratch.0).unwrap();
    let missing = scratch.0.join("missing.pem");
    let cases = [
        (path_str(&missing).to_owned(), "No such file or directory"),
        // A key, not a certificate.
        (path_str(&pki.key).to_owned(), "holds no PEM certificate"),
    ];
    // Services that refuse every connection: nothing is reached even if the check were gone.
    let nowhere = Services {
        postgres: "postgres://postgres@127.0.0.1:1".to_owned(),
        amqp: "amqp://guest:guest@127.0.0.1:1/%2f".to_owned(),
        redis: "redis://127.0.0.1:1/0".to_owned(),
    };
    for binary in ["taskfleet-scheduler", "taskfleet-worker"] {
        for (n, (ca, problem)) in cases.iter().enumerate() {
            let env = environment(&nowhere, &[("TASKFLEET_CA_CERT", ca.clone())]);
            let mut process =
                Process::start(binary, &env, logs.join(format!("{binary}-{n}.log"))).unwrap();
            let status = process.exit(Duration::from_secs(10)).await;
            let log = process.log();
            assert_eq!(status.code(), Some(2), "{binary}: {log}");
            for named in ["TASKFLEET_CA_CERT", ca.as_str(), problem] {
                assert!(log.contains(named), "{binary}, {named}: {log}");
            }
            assert!(!log.contains("panicked"), "{binary}: {log}");
        }
    }
    // The database URL's CA file is checked the same way, before any connection.
    for (n, (ca, problem)) in cases.iter().enumerate() {
        let services = Services {
            postgres: format!("{}?sslmode=verify-full&sslrootcert={ca}", nowhere.postgres),
            ..nowhere.clone()
        };
        let env = environment(&services, &[]);
        let log = logs.join(format!("taskfleet-scheduler-sslrootcert-{n}.log"));
        let mut scheduler = Process::start("taskfleet-scheduler", &env, log).unwrap();
        let status = scheduler.exit(Duration::from_secs(10)).await;
        let log = scheduler.log();
        assert_eq!(status.code(), Some(1), "{log}");
        for named in ["sslrootcert", ca.as_str(), problem] {
            assert!(log.contains(named), "{named}: {log}");
        }
        assert!(!log.contains("panicked"), "{log}");
    }
}
