//! The test harness: starts a real fleet (one scheduler, N workers, as processes from the
//! workspace's built binaries) against the real PostgreSQL, RabbitMQ and Redis, each fleet in
//! its own database and namespace, and cleans up after it.
//!
//! The binaries must be built first (`cargo build --workspace --bins`); the harness finds them
//! next to the test executable, or in `TASKFLEET_BIN_DIR`.

#![allow(clippy::unwrap_used, clippy::print_stderr, missing_docs)]

mod http;
pub mod pki;
mod processes;
pub mod services;
pub mod tls_services;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Child;

use anyhow::{Result, bail};

/// PostgreSQL server the tests use (trust auth as `postgres`).
/// The tenant of the `admin` key every test fleet makes ([`TestFleet::api_key`]).
pub const TEST_TENANT: &str = "test";

pub const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432";
/// RabbitMQ the tests use.
pub const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Redis the tests use.
pub const REDIS: &str = "redis://127.0.0.1:6379/0";

/// Where a fleet's processes find PostgreSQL, RabbitMQ and Redis.
#[derive(Debug, Clone)]
pub struct Services {
    /// PostgreSQL server URL without a database (`postgres://user@host:port`), optionally with
    /// a query (`?sslmode=...`) that is kept after the database's name.
    pub postgres: String,
    /// RabbitMQ URL.
    pub amqp: String,
    /// Redis URL.
    pub redis: String,
}

impl Services {
    /// The services every test shares: [`POSTGRES`], [`AMQP`] and [`REDIS`].
    pub fn shared() -> Self {
        Self {
            postgres: POSTGRES.to_owned(),
            amqp: AMQP.to_owned(),
            redis: REDIS.to_owned(),
        }
    }

    /// Returns the URL of `database` on the PostgreSQL server.
    pub fn database_url(&self, database: &str) -> String {
        match self.postgres.split_once('?') {
            Some((server, query)) => format!("{server}/{database}?{query}"),
            None => format!("{}/{database}", self.postgres),
        }
    }
}

/// How a fleet is started.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Workers to start.
    pub workers: usize,
    /// Tasks in flight per worker.
    pub concurrency: usize,
    /// Extra environment of the scheduler.
    pub scheduler_env: Vec<(String, String)>,
    /// Use this existing database (of another fleet) instead of a new one; it is left in place.
    pub shared_database: Option<String>,
    /// Extra command-line arguments of every worker.
    pub worker_args: Vec<String>,
    /// Extra environment of every worker.
    pub worker_env: Vec<(String, String)>,
    /// Serve the API over TLS with this certificate (and trust its CA).
    pub api_tls: Option<pki::Pki>,
    /// The services the fleet's processes use. Whatever the fleet leaves in them is removed from
    /// the shared services only: a test that gives others removes what it leaves there itself.
    pub services: Services,
}

impl Default for FleetOptions {
    fn default() -> Self {
        Self {
            workers: 2,
            concurrency: 4,
            scheduler_env: Vec::new(),
            shared_database: None,
            worker_args: Vec::new(),
            worker_env: Vec::new(),
            api_tls: None,
            services: Services::shared(),
        }
    }
}

/// A running fleet. Dropping it kills its processes and removes its database, queues and keys.
pub struct TestFleet {
    pub api: String,
    pub namespace: String,
    pub database: String,
    /// An `admin` key of tenant `test`, which `http` sends with every request.
    pub api_key: String,
    pub http: reqwest::Client,
    scheduler: Option<Child>,
    scheduler_port: u16,
    started_schedulers: usize,
    other_schedulers: Vec<Child>,
    workers: Vec<Child>,
    options: FleetOptions,
    log_dir: PathBuf,
    started_workers: usize,
}

/// Returns a builder of HTTP clients, with the one TLS stack (rustls with ring) in place.
pub fn http_client() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

/// Returns the directory holding the workspace's binaries.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("TASKFLEET_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // target/<profile>/deps/<test binary>, or target/<profile>/<binary>
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent().unwrap().to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Returns the workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Returns a TCP port free on the loopback address now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn binary(name: &str) -> Result<PathBuf> {
    let path = bin_dir().join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build the binaries first with `cargo build --workspace --bins`",
            path.display()
        );
    }
    Ok(path)
}
