//! Stops and starts the local services, for the tests of their restarts. They need the rights
//! the project's machines give (root), and stop what every other test uses: such tests run
//! alone (see `.config/nextest.toml`).

use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

fn run(program: &str, args: &[&str]) -> Result<()> {
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {args:?} failed: {status}");
    }
    Ok(())
}

fn port_open(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

fn wait_port(port: u16, open: bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while port_open(port) != open {
        if Instant::now() > deadline {
            bail!(
                "port {port} did not become {}",
                if open { "open" } else { "closed" }
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn postgres_version() -> Result<String> {
    let mut versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
        .context("listing /etc/postgresql")?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect();
    versions.sort_by_key(|version| version.parse::<u32>().unwrap_or(0));
    versions
        .pop()
        .context("no PostgreSQL cluster in /etc/postgresql")
}

/// `rabbitmqctl stop_app`: the broker closes every connection and refuses new ones.
pub fn stop_rabbitmq() -> Result<()> {
    run("rabbitmqctl", &["-q", "stop_app"])
}

/// `rabbitmqctl start_app`.
pub fn start_rabbitmq() -> Result<()> {
    run("rabbitmqctl", &["-q", "start_app"])
}

/// Shuts Redis down without saving: everything it held is gone.
pub fn stop_redis() -> Result<()> {
    run("redis-cli", &["shutdown", "nosave"])?;
    wait_port(6379, false)
}

/// Starts Redis as `scripts/services.sh` does (nothing kept on disk), unless it runs.
pub fn start_redis() -> Result<()> {
    if !port_open(6379) {
        run(
            "redis-server",
            &[
                "--daemonize",
                "yes",
                "--bind",
                "127.0.0.1",
                "-::1",
                "--port",
                "6379",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
        )?;
    }
    wait_port(6379, true)
}

/// Stops PostgreSQL (fast shutdown: sessions are disconnected).
pub fn stop_postgres() -> Result<()> {
    let version = postgres_version()?;
    run(
        "pg_ctlcluster",
        &[
            "--skip-systemctl-redirect",
            &version,
            "main",
            "stop",
            "-m",
            "fast",
        ],
    )?;
    wait_port(5432, false)
}

/// Starts PostgreSQL unless it runs.
pub fn start_postgres() -> Result<()> {
    if !port_open(5432) {
        let version = postgres_version()?;
        run(
            "pg_ctlcluster",
            &["--skip-systemctl-redirect", &version, "main", "start"],
        )?;
    }
    wait_port(5432, true)
}

/// Starts every service again when dropped, so a failing test leaves them running.
pub struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = start_rabbitmq();
        let _ = start_redis();
        let _ = start_postgres();
    }
}
