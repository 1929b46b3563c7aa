//! TLS endpoints a test brings up without touching the shared services' configuration, and
//! takes down when it ends, failed or not: a Redis server of its own with a TLS port and no
//! plain one, a TLS listener added to the shared RabbitMQ broker, and a PostgreSQL cluster of
//! its own with TLS on. They need root (the cluster runs as `postgres`, `rabbitmqctl` talks to
//! the broker).

#![allow(missing_docs)]

use std::fs::File;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::pki::Pki;
use crate::{Services, free_port};

/// The certificate problem every connection without the CA must report.
pub const UNKNOWN_ISSUER: &str = "UnknownIssuer";

pub fn port_open(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

pub fn wait_port_open(port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !port_open(port) {
        if Instant::now() > deadline {
            bail!("{what} did not open port {port} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Runs a command to its end; returns its standard output, or fails with its standard error.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {args:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// Copies `from` to `to`, owned by `user`, with `mode`.
pub fn install(from: &Path, to: &Path, user: &str, mode: &str) -> Result<()> {
    run(
        "install",
        &[
            "-o",
            user,
            "-g",
            user,
            "-m",
            mode,
            path_str(from),
            path_str(to),
        ],
    )?;
    Ok(())
}

/// A directory under /tmp that every service's user can traverse, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("taskfleet-tls-services-{}", &id[..12]));
        run("install", &["-d", "-m", "0755", path_str(&dir)])?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A Redis server of the test's own that listens on a TLS port only; killed when dropped.
pub struct TlsRedis {
    pub server: Child,
    pub port: u16,
}

impl TlsRedis {
    pub fn start(pki: &Pki, dir: &Path) -> Result<Self> {
        let dir = dir.join("redis");
        std::fs::create_dir_all(&dir)?;
        let port = free_port();
        let log = File::create(dir.join("redis.log"))?;
        let server = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--tls-cert-file", path_str(&pki.cert)])
            .args(["--tls-key-file", path_str(&pki.key)])
            .args(["--tls-ca-cert-file", path_str(&pki.ca)])
            .args(["--tls-auth-clients", "no"])
            .args(["--save", "", "--appendonly", "no", "--dir", path_str(&dir)])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting redis-server")?;
        let redis = Self { server, port };
        wait_port_open(port, "the TLS redis")?;
        Ok(redis)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// A TLS listener added to the shared RabbitMQ at run time; removed when dropped.
pub struct AmqpTlsListener {
    pub port: u16,
}

impl AmqpTlsListener {
    pub fn start(pki: &Pki, dir: &Path) -> Result<Self> {
        // The broker reads the files as its own user.
        let dir = dir.join("rabbitmq");
        run("install", &["-d", "-m", "0755", path_str(&dir)])?;
        let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
        install(&pki.cert, &cert, "rabbitmq", "0644")?;
        install(&pki.key, &key, "rabbitmq", "0600")?;
        let port = free_port();
        let listener = format!(
            "rabbit_networking:start_ssl_listener({{\"127.0.0.1\", {port}}}, \
             [{{certfile, \"{}\"}}, {{keyfile, \"{}\"}}, {{cacertfile, \"{}\"}}, \
             {{versions, ['tlsv1.3', 'tlsv1.2']}}, {{verify, verify_none}}, \
             {{fail_if_no_peer_cert, false}}], 2).",
            path_str(&cert),
            path_str(&key),
            path_str(&pki.ca),
        );
        let answer = run("rabbitmqctl", &["-q", "eval", &listener])?;
        if answer.trim() != "ok" {
            bail!("starting the TLS listener of rabbitmq answered {answer}");
        }
        let amqp = Self { port };
        wait_port_open(port, "the TLS listener of rabbitmq")?;
        Ok(amqp)
    }

    /// Returns the process id and TLS version of each connection to this listener, as the
    /// broker lists them.
    pub fn connections(&self) -> Result<Vec<(String, String)>> {
        let listed = run(
            "rabbitmqctl",
            &[
                "-q",
                "--no-table-headers",
                "list_connections",
                "pid",
                "port",
                "ssl",
                "ssl_protocol",
            ],
        )?;
        let port = self.port.to_string();
        let mut connections = Vec::new();
        for line in listed.lines() {
            let fields: Vec<&str> = line.split('\t').map(str::trim).collect();
            if let [pid, listener, ssl, protocol] = fields[..]
                && listener == port
            {
                assert_eq!(ssl, "true", "{line}");
                connections.push((pid.to_owned(), protocol.to_owned()));
            }
        }
        Ok(connections)
    }

    /// Returns the TLS version of each connection to this listener.
    pub fn versions(&self) -> Result<Vec<String>> {
        Ok(self
            .connections()?
            .into_iter()
            .map(|(_, version)| version)
            .collect())
    }

    /// Closes every connection to this listener, as a broker that goes away would.
    pub fn close_connections(&self) -> Result<usize> {
        let connections = self.connections()?;
        for (pid, _) in &connections {
            run("rabbitmqctl", &["-q", "close_connection", pid, "test"])?;
        }
        Ok(connections.len())
    }
}

impl Drop for AmqpTlsListener {
    fn drop(&mut self) {
        let stop = format!(
            "rabbit_networking:stop_tcp_listener({{\"127.0.0.1\", {}}}).",
            self.port
        );
        if let Err(error) = run("rabbitmqctl", &["-q", "eval", &stop]) {
            eprintln!("removing the TLS listener of rabbitmq: {error:#}");
        }
    }
}

/// A PostgreSQL cluster of the test's own, run as `postgres`, with TLS 1.3 on; stopped when
/// dropped.
pub struct TlsPostgres {
    pub data: PathBuf,
    pub port: u16,
}

impl TlsPostgres {
    pub fn start(pki: &Pki, dir: &Path) -> Result<Self> {
        let dir = dir.join("postgres");
        let owned = ["-d", "-o", "postgres", "-g", "postgres", "-m", "0700"];
        run("install", &[&owned[..], &[path_str(&dir)]].concat())?;
        // The server refuses a key that others may read.
        let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
        install(&pki.cert, &cert, "postgres", "0644")?;
        install(&pki.key, &key, "postgres", "0600")?;
        let data = dir.join("data");
        run(
            "runuser",
            &[
                "-u",
                "postgres",
                "--",
                "initdb",
                "-D",
                path_str(&data),
                "--auth=trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        )?;
        let port = free_port();
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c ssl=on -c ssl_cert_file={} \
             -c ssl_key_file={} -c ssl_min_protocol_version=TLSv1.3 -c fsync=off",
            path_str(&dir),
            path_str(&cert),
            path_str(&key),
        );
        let postgres = Self { data, port };
        run(
            "runuser",
            &[
                "-u",
                "postgres",
                "--",
                "pg_ctl",
                "-D",
                path_str(&postgres.data),
                "-l",
                path_str(&dir.join("postgres.log")),
                "-o",
                &options,
                "-w",
                "start",
            ],
        )?;
        Ok(postgres)
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let stopped = run(
            "runuser",
            &[
                "-u",
                "postgres",
                "--",
                "pg_ctl",
                "-D",
                path_str(&self.data),
                "-m",
                "immediate",
                "stop",
            ],
        );
        if let Err(error) = stopped {
            eprintln!("stopping the test's postgresql: {error:#}");
        }
    }
}

/// The three TLS endpoints of a test and their CA. Dropped in field order: the services stop
/// before their files go.
pub struct TlsServices {
    pub redis: TlsRedis,
    pub amqp: AmqpTlsListener,
    pub postgres: TlsPostgres,
    pub pki: Pki,
    pub _dir: Scratch,
}

/// Whether a fleet's URLs name the test's CA for PostgreSQL (`sslrootcert`).
#[derive(Clone, Copy)]
pub enum Trust {
    Ca,
    SystemOnly,
}

impl TlsServices {
    pub fn start() -> Result<Self> {
        let dir = Scratch::new()?;
        let pki = Pki::make(&dir.0.join("pki"))?;
        // Started one by one, each guarded as soon as it runs: a failure stops those before it.
        let redis = TlsRedis::start(&pki, &dir.0)?;
        let amqp = AmqpTlsListener::start(&pki, &dir.0)?;
        let postgres = TlsPostgres::start(&pki, &dir.0)?;
        Ok(Self {
            redis,
            amqp,
            postgres,
            pki,
            _dir: dir,
        })
    }

    pub fn services(&self, trust: Trust) -> Services {
        let root = match trust {
            Trust::Ca => format!("&sslrootcert={}", path_str(&self.pki.ca)),
            Trust::SystemOnly => String::new(),
        };
        Services {
            postgres: format!(
                "postgres://postgres@localhost:{}?sslmode=verify-full{root}",
                self.postgres.port
            ),
            amqp: format!("amqps://guest:guest@localhost:{}/%2f", self.amqp.port),
            redis: format!("rediss://localhost:{}/0", self.redis.port),
        }
    }

    pub fn ca_env(&self) -> Vec<(String, String)> {
        vec![(
            "TASKFLEET_CA_CERT".to_owned(),
            path_str(&self.pki.ca).to_owned(),
        )]
    }

    /// Returns a client of the test's Redis that trusts the CA.
    pub fn redis_client(&self) -> redis::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        redis::Client::build_with_tls(
            format!("rediss://localhost:{}/0", self.redis.port),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(std::fs::read(&self.pki.ca).unwrap()),
            },
        )
        .unwrap()
    }
}
