//! The scheduler's configuration: every setting is a flag and a `TASKFLEET_*` environment
//! variable (clap's `env` support: a flag wins over its variable, a variable over the default;
//! an empty variable counts as unset). Parsed once at start into typed values; a bad value
//! stops the start with a message naming the flag.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use taskfleet_common::Namespace;
use taskfleet_io::amqp::AmqpUrl;
use taskfleet_io::redis_connection::RedisUrl;
use taskfleet_io::settings::{self, EncryptionSettings, FleetSettings};

pub use crate::auth::AuthMode;
pub use crate::tls::{MinVersion, TlsSettings};

/// The taskfleet scheduler: HTTP API, durable record in PostgreSQL, dispatch through RabbitMQ.
/// Every flag has its environment variable (shown with it); a flag wins over its variable.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "taskfleet-scheduler", version, about, long_about = None)]
pub struct Settings {
    /// PostgreSQL URL; the database is created and migrated if missing.
    #[arg(
        long,
        env = "TASKFLEET_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/taskfleet"
    )]
    pub database_url: String,
    /// RabbitMQ, Redis, the CA certificate of their TLS connections, and the namespace.
    #[command(flatten)]
    pub fleet: FleetSettings,
    /// Payload encryption.
    #[command(flatten)]
    pub encryption: EncryptionSettings,
    /// How log lines are written.
    #[command(flatten)]
    pub log: taskfleet_io::logging::LogSettings,
    /// Where spans are exported (OTLP).
    #[command(flatten)]
    pub spans: taskfleet_io::spans::SpanSettings,
    /// Where the HTTP API listens.
    #[arg(long, env = "TASKFLEET_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// The largest request body the API accepts, in bytes (larger ones get 413).
    #[arg(long, env = "TASKFLEET_MAX_BODY_BYTES", default_value = "10485760")]
    pub max_body_bytes: usize,
    /// The largest run or job input, in bytes of JSON (larger ones get 413).
    #[arg(long, env = "TASKFLEET_MAX_VALUE_BYTES", default_value = "4194304", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_value_bytes: u64,
    /// The longest long poll (`?wait=`) a client may ask for, in seconds.
    #[arg(long = "max-wait-s", value_name = "SECONDS", env = "TASKFLEET_MAX_WAIT_S", default_value = "60", value_parser = settings::seconds)]
    pub max_wait: Duration,
    /// PostgreSQL connections in the pool.
    #[arg(long, env = "TASKFLEET_DATABASE_POOL_SIZE", default_value = "16")]
    pub database_pool_size: u32,
    /// Age in seconds at which a committed task the broker never confirmed is published again;
    /// at least [`MIN_RELAY_AFTER`].
    #[arg(long = "relay-after-s", value_name = "SECONDS", env = "TASKFLEET_RELAY_AFTER_S", default_value = "10", value_parser = relay_after)]
    pub relay_after: Duration,
    /// The most tasks one broker message carries when many are dispatched at once.
    #[arg(long, env = "TASKFLEET_MAX_TASKS_PER_MESSAGE", default_value = "64")]
    pub max_tasks_per_message: NonZeroUsize,
    /// How long one jq program of planning (`input`, `when`, `for_each`) may run, in ms.
    #[arg(long = "planning-jq-time-limit-ms", value_name = "MS", env = "TASKFLEET_PLANNING_JQ_TIME_LIMIT_MS", default_value = "1000", value_parser = settings::positive_millis)]
    pub jq_time_limit: Duration,
    /// The memory one jq program of planning may take, in MiB.
    #[arg(long = "planning-jq-memory-mb", value_name = "MIB", env = "TASKFLEET_PLANNING_JQ_MEMORY_MB", default_value = "256", value_parser = settings::positive_mib)]
    pub jq_memory_bytes: u64,
    /// Sandbox processes running planning's jq programs at once (default: one per core).
    #[arg(
        long = "planning-jq-sandboxes",
        env = "TASKFLEET_PLANNING_JQ_SANDBOXES"
    )]
    pub jq_sandboxes: Option<NonZeroUsize>,
    /// Whether /v1 requests need an API key: required, or off (local development only: the
    /// API then listens on a loopback address only).
    #[arg(long, env = "TASKFLEET_AUTH", default_value = "required")]
    pub auth: AuthMode,
    /// The API's TLS certificate chain (PEM); with --tls-key, the API serves HTTPS only.
    #[arg(
        long,
        value_name = "PATH",
        env = "TASKFLEET_TLS_CERT",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(
        long,
        value_name = "PATH",
        env = "TASKFLEET_TLS_KEY",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// The oldest TLS version the API accepts: 1.3, or 1.2 for clients that lack 1.3.
    #[arg(
        long,
        value_name = "VERSION",
        env = "TASKFLEET_TLS_MIN_VERSION",
        default_value = "1.3"
    )]
    pub tls_min_version: MinVersion,
    /// How long finished runs and jobs are kept, in seconds, before they are deleted with
    /// their tasks; 0 keeps them forever.
    #[arg(
        long = "retention-s",
        value_name = "SECONDS",
        env = "TASKFLEET_RETENTION_S",
        default_value = "604800",
        value_parser = clap::value_parser!(u64).range(0..=MAX_RETENTION_S)
    )]
    pub retention_s: u64,
    /// How late a schedule's tick may be and still fire as it is; a schedule further behind
    /// (its schedulers were down) missed its ticks, and its `catch_up` decides.
    #[arg(
        long = "schedule-grace-s",
        value_name = "SECONDS",
        env = "TASKFLEET_SCHEDULE_GRACE_S",
        default_value = "10",
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub schedule_grace_s: u64,
    /// Whether to keep Prometheus metrics and serve them at /metrics.
    #[arg(long, env = "TASKFLEET_METRICS", default_value = "on")]
    pub metrics: taskfleet_io::metrics::Switch,
    /// What to do instead of serving.
    #[command(subcommand)]
    pub command: Option<SchedulerCommand>,
}

/// What the scheduler binary can do besides serving.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum SchedulerCommand {
    /// Makes an API key straight in the database (the first `admin` key, say) and prints it
    /// as the last line; it is shown nowhere else
    CreateKey(CreateKeyArgs),
    /// Prints the API's OpenAPI 3.1 document (what `GET /v1/openapi.json` serves) and exits;
    /// needs no service
    Openapi,
}

pub use taskfleet_common::settings::NewKeyArgs as CreateKeyArgs;

/// The longest retention accepted: 100 years (0 keeps runs forever).
const MAX_RETENTION_S: u64 = 100 * 365 * 24 * 3600;

/// Everything the scheduler needs to know to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// PostgreSQL URL; the database is created if missing.
    pub database_url: String,
    /// RabbitMQ URL, with its heartbeat, and the CA certificate its TLS connections trust.
    pub amqp_url: AmqpUrl,
    /// Redis URL, and the CA certificate its TLS connections trust.
    pub redis_url: RedisUrl,
    /// Where the HTTP API listens.
    pub http_addr: SocketAddr,
    /// Prefix of every queue and Redis key.
    pub namespace: Namespace,
    /// The largest request body the API accepts, in bytes.
    pub max_body_bytes: usize,
    /// The largest run or job input, in bytes of JSON.
    pub max_value_bytes: usize,
    /// The longest `?wait=` a client may ask for.
    pub max_wait: Duration,
    /// Connections in the PostgreSQL pool.
    pub database_pool_size: u32,
    /// How old an undispatched task must be before the relay publishes it again.
    pub relay_after: Duration,
    /// The most tasks one broker message carries when many are dispatched at once.
    pub max_tasks_per_message: NonZeroUsize,
    /// How long one jq program of planning (`input`, `when`, `for_each`) may run.
    pub jq_time_limit: Duration,
    /// The memory one jq program of planning may take, in bytes.
    pub jq_memory_bytes: u64,
    /// The most sandbox processes running planning's jq programs at once.
    pub jq_sandboxes: NonZeroUsize,
    /// Whether requests need an API key.
    pub auth: AuthMode,
    /// The API's certificate and key, when it serves HTTPS.
    pub tls: Option<TlsSettings>,
    /// Whether to keep metrics and serve them at `/metrics`.
    pub metrics: bool,
    /// How long finished runs are kept; `None`: forever.
    pub retention: Option<Duration>,
    /// How late a schedule's tick may fire; later, its ticks were missed.
    pub schedule_grace: Duration,
}

impl Config {
    /// Checks what no single setting can: authentication is off only on a loopback address.
    pub fn check(&self) -> Result<(), String> {
        if self.auth == AuthMode::Off && !self.http_addr.ip().is_loopback() {
            return Err(format!(
                "TASKFLEET_AUTH=off serves the API to anyone who can reach it, so it is allowed \
                 only on a loopback address, and TASKFLEET_HTTP_ADDR is {}; use a loopback \
                 address (127.0.0.1) or TASKFLEET_AUTH=required with API keys",
                self.http_addr
            ));
        }
        Ok(())
    }
}

impl From<Settings> for Config {
    fn from(settings: Settings) -> Self {
        Self {
            database_url: settings.database_url,
            amqp_url: settings.fleet.amqp(),
            redis_url: settings.fleet.redis(),
            http_addr: settings.http_addr,
            namespace: settings.fleet.namespace,
            max_body_bytes: settings.max_body_bytes,
            max_value_bytes: usize::try_from(settings.max_value_bytes).unwrap_or(usize::MAX),
            max_wait: settings.max_wait,
            database_pool_size: settings.database_pool_size,
            relay_after: settings.relay_after,
            max_tasks_per_message: settings.max_tasks_per_message,
            jq_time_limit: settings.jq_time_limit,
            jq_memory_bytes: settings.jq_memory_bytes,
            jq_sandboxes: settings
                .jq_sandboxes
                .unwrap_or(NonZeroUsize::new(settings::cores()).unwrap_or(NonZeroUsize::MIN)),
            auth: settings.auth,
            metrics: settings.metrics == taskfleet_io::metrics::Switch::On,
            retention: (settings.retention_s > 0)
                .then(|| Duration::from_secs(settings.retention_s)),
            schedule_grace: Duration::from_secs(settings.schedule_grace_s),
            tls: settings
                .tls_cert
                .zip(settings.tls_key)
                .map(|(cert, key)| TlsSettings {
                    cert,
                    key,
                    min_version: settings.tls_min_version,
                }),
        }
    }
}

/// The shortest `relay_after`: well above how far ahead rate-limited starts are reserved and
/// held in memory (`dispatch::rate::HORIZON`, 0.5 s), so that the relay never publishes a task
/// a scheduler holds for its slot.
pub const MIN_RELAY_AFTER: Duration = Duration::from_secs(2);

/// Parses `--relay-after-s`: whole seconds, at least [`MIN_RELAY_AFTER`].
fn relay_after(text: &str) -> Result<Duration, String> {
    let relay_after = settings::seconds(text)?;
    if relay_after < MIN_RELAY_AFTER {
        return Err(format!(
            "--relay-after-s must be at least {} s (rate-limited tasks are held up to 0.5 s \
             before they are published, and must not be relayed meanwhile)",
            MIN_RELAY_AFTER.as_secs()
        ));
    }
    Ok(relay_after)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn load(args: &[&str]) -> Result<Config, clap::Error> {
        let args = std::iter::once("taskfleet-scheduler").chain(args.iter().copied());
        settings::try_parse_from_args::<Settings>(args).map(Config::from)
    }

    #[test]
    fn defaults_follow_the_docs() {
        let config = load(&[]).expect("defaults load");
        assert_eq!(
            config.database_url,
            "postgres://postgres@127.0.0.1:5432/taskfleet"
        );
        assert_eq!(
            config.amqp_url.as_str(),
            "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=5"
        );
        assert_eq!(config.redis_url.as_str(), "redis://127.0.0.1:6379/0");
        assert_eq!(config.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(config.namespace.as_str(), "taskfleet");
        assert_eq!(config.max_wait, Duration::from_secs(60));
        assert_eq!(config.relay_after, Duration::from_secs(10));
        assert_eq!(config.jq_time_limit, Duration::from_secs(1));
        assert_eq!(config.jq_memory_bytes, 256 * 1024 * 1024);
    }

    #[test]
    fn flags_set_values_and_bad_values_are_named() {
        let config = load(&[
            "--http-addr",
            "127.0.0.1:2",
            "--planning-jq-time-limit-ms",
            "250",
        ])
        .expect("loads");
        assert_eq!(config.http_addr.port(), 2);
        assert_eq!(config.jq_time_limit, Duration::from_millis(250));
        for (flag, value) in [
            ("--namespace", "a b"),
            ("--http-addr", "nowhere"),
            ("--planning-jq-time-limit-ms", "0"),
            ("--planning-jq-memory-mb", "0"),
            ("--planning-jq-sandboxes", "0"),
            ("--relay-after-s", "1"),
            ("--relay-after-s", "0"),
        ] {
            let error = load(&[flag, value]).expect_err("a bad value");
            assert!(error.to_string().contains(flag), "{flag}: {error}");
        }
        let shortest = load(&["--relay-after-s", "2"]).expect("loads");
        assert_eq!(shortest.relay_after, MIN_RELAY_AFTER);
    }

    #[test]
    fn tls_needs_both_certificate_and_key() {
        assert!(load(&[]).expect("loads").tls.is_none());
        let error = load(&["--tls-cert", "c.pem"]).expect_err("a key is needed too");
        assert!(error.to_string().contains("--tls-key"), "{error}");
        let config = load(&["--tls-cert", "c.pem", "--tls-key", "k.pem"]).expect("loads");
        let tls = config.tls.expect("TLS is on");
        assert_eq!(tls.min_version, MinVersion::Tls13);
        let config = load(&[
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--tls-min-version",
            "1.2",
        ])
        .expect("loads");
        assert_eq!(
            config.tls.map(|tls| tls.min_version),
            Some(MinVersion::Tls12)
        );
        assert!(load(&["--tls-min-version", "1.1"]).is_err());
    }

    #[test]
    fn authentication_is_off_only_on_loopback() {
        let required = load(&["--http-addr", "0.0.0.0:8080"]).expect("loads");
        assert_eq!(required.auth, AuthMode::Required);
        assert!(required.check().is_ok());
        let local = load(&["--auth", "off"]).expect("loads");
        assert!(local.check().is_ok());
        let exposed = load(&["--auth", "off", "--http-addr", "0.0.0.0:8080"]).expect("loads");
        let error = exposed.check().expect_err("off on every address");
        assert!(error.contains("0.0.0.0:8080"), "{error}");
        assert!(load(&["--auth", "maybe"]).is_err());
    }

    #[test]
    fn every_setting_has_its_environment_variable() {
        for arg in Settings::command().get_arguments() {
            if arg.is_hide_set() || arg.get_id() == "help" || arg.get_id() == "version" {
                continue;
            }
            let env = arg
                .get_env()
                .and_then(|env| env.to_str())
                .unwrap_or_default();
            // The OpenTelemetry settings keep the specification's names.
            assert!(
                env.starts_with("TASKFLEET_") || env.starts_with("OTEL_"),
                "{} has no variable",
                arg.get_id()
            );
        }
    }
}
