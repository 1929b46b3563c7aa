//! The worker's configuration: every setting is a flag and an environment variable (clap's
//! `env` support: a flag wins over its variable, a variable over the default; an empty variable
//! counts as unset), except `TASKFLEET_PYTHON_PATH`, whose entries add to the flags' (see
//! [`Settings::python_path`]). Parsed once at start into typed values; a bad value stops the
//! start with a message naming the flag.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use taskfleet_common::Namespace;
use taskfleet_common::names::{DEFAULT_QUEUE, check_queue_name};
use taskfleet_io::amqp::AmqpUrl;
use taskfleet_io::redis_connection::RedisUrl;
use taskfleet_io::settings::{self, EncryptionSettings, FleetSettings};

use crate::executor::process::Confinement;

/// Whether Python executors' file system is confined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PythonSandbox {
    /// With Landlock, where the kernel has it.
    Landlock,
    /// Not confined.
    Off,
}

/// The variable whose directories are added to `--python-path`'s.
pub const PYTHON_PATH_VARIABLE: &str = "TASKFLEET_PYTHON_PATH";

/// A taskfleet worker: runs dataflow (jq) and Python steps from RabbitMQ. Every flag has its
/// environment variable (shown with it); a flag wins over its variable.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "taskfleet-worker", version, about, long_about = None)]
pub struct Settings {
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
    /// Task queues to consume, comma separated.
    #[arg(long, env = "TASKFLEET_QUEUES", default_value = DEFAULT_QUEUE, value_parser = parse_queues)]
    pub queues: Queues,
    /// Tasks in flight at once (default: 4 per core).
    #[arg(long, env = "TASKFLEET_CONCURRENCY")]
    pub concurrency: Option<NonZeroUsize>,
    /// Where to serve Prometheus metrics (/metrics) and a liveness probe (/healthz), such as
    /// 0.0.0.0:9464; unset, the worker keeps no metrics.
    #[arg(long, env = "TASKFLEET_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// A directory prepended to Python's `sys.path`; repeat for several. The directories of
    /// TASKFLEET_PYTHON_PATH (`:`-separated) come after these: an image names its step
    /// packages in the variable and an operator adds more with the flag, so the two add up
    /// rather than one replacing the other.
    #[arg(long = "python-path", value_name = "DIR")]
    pub python_path: Vec<PathBuf>,
    /// A virtualenv whose packages steps may import.
    #[arg(long = "venv", value_name = "DIR", env = "VIRTUAL_ENV")]
    pub virtual_env: Option<PathBuf>,
    /// How long a lease of a running task lives without renewal, in seconds (the default is
    /// `taskfleet_common::records::DEFAULT_LEASE_TTL_S`, which the scheduler's view of live
    /// workers assumes).
    #[arg(long = "lease-ttl-s", value_name = "SECONDS", env = "TASKFLEET_LEASE_TTL_S", default_value = "30", value_parser = settings::seconds)]
    pub lease_ttl: Duration,
    /// How long in-flight tasks may take to finish after SIGTERM, in seconds.
    #[arg(long = "shutdown-grace-s", value_name = "SECONDS", env = "TASKFLEET_SHUTDOWN_GRACE_S", default_value = "30", value_parser = settings::seconds)]
    pub shutdown_grace: Duration,
    /// The most characters of a Python step's printed and logged output kept per attempt.
    #[arg(long, env = "TASKFLEET_MAX_LOG_CHARS", default_value = "65536")]
    pub max_log_chars: usize,
    /// The largest step output, in bytes of JSON; a larger one fails its step with
    /// `invalid_output`.
    #[arg(long, env = "TASKFLEET_MAX_VALUE_BYTES", default_value = "4194304", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_value_bytes: u64,
    /// Python executor processes, each running one Python step at a time (default: one per
    /// core).
    #[arg(long, env = "TASKFLEET_PYTHON_EXECUTORS")]
    pub python_executors: Option<NonZeroUsize>,
    /// Replace a Python executor after it ran this many steps (0: never).
    #[arg(long, env = "TASKFLEET_PYTHON_MAX_TASKS", default_value = "0")]
    pub python_max_tasks: u64,
    /// Replace a Python executor whose resident memory is above this many MiB after a step
    /// (0: no limit).
    #[arg(
        long,
        value_name = "MIB",
        env = "TASKFLEET_PYTHON_MAX_RSS_MB",
        default_value = "0"
    )]
    pub python_max_rss_mb: u64,
    /// How long an interrupted Python step has to end before its executor is killed, in
    /// seconds (fractions allowed).
    #[arg(long = "python-kill-grace-s", value_name = "SECONDS", env = "TASKFLEET_PYTHON_KILL_GRACE_S", default_value = "2", value_parser = settings::fractional_seconds)]
    pub python_kill_grace: Duration,
    /// The address space of each Python executor, in MiB (0: no limit); past it, a step's
    /// allocations fail with MemoryError.
    #[arg(
        long,
        value_name = "MIB",
        env = "TASKFLEET_PYTHON_MEMORY_MB",
        default_value = "4096"
    )]
    pub python_memory_mb: u64,
    /// The files each Python executor may have open at once (0: no limit).
    #[arg(
        long,
        value_name = "N",
        env = "TASKFLEET_PYTHON_OPEN_FILES",
        default_value = "1024"
    )]
    pub python_open_files: u64,
    /// The processes and threads the worker's user may have, as seen by Python executors
    /// (RLIMIT_NPROC; 0: no limit; root is not limited).
    #[arg(
        long,
        value_name = "N",
        env = "TASKFLEET_PYTHON_PROCESSES",
        default_value = "4096"
    )]
    pub python_processes: u64,
    /// The CPU seconds each Python executor may use in its life before it is killed and
    /// replaced (0: no limit).
    #[arg(
        long = "python-cpu-s",
        value_name = "SECONDS",
        env = "TASKFLEET_PYTHON_CPU_S",
        default_value = "0"
    )]
    pub python_cpu_s: u64,
    /// Confine each Python executor's file system with Landlock (read-only but for a scratch
    /// directory emptied after every step): landlock, or off.
    #[arg(
        long,
        value_name = "MODE",
        env = "TASKFLEET_PYTHON_SANDBOX",
        default_value = "landlock"
    )]
    pub python_sandbox: PythonSandbox,
    /// Directories Python steps may write to besides their scratch directory, when their
    /// file system is confined (`:`-separated; each must exist).
    #[arg(
        long,
        value_name = "DIR",
        env = "TASKFLEET_PYTHON_WRITABLE_PATHS",
        value_delimiter = ':'
    )]
    pub python_writable_paths: Vec<PathBuf>,
    /// How long a jq program may run when its step sets no `timeout_s`, in ms.
    #[arg(long = "jq-time-limit-ms", value_name = "MS", env = "TASKFLEET_JQ_TIME_LIMIT_MS", default_value = "60000", value_parser = settings::positive_millis)]
    pub jq_time_limit: Duration,
    /// The memory one jq program may take, in MiB.
    #[arg(long = "jq-memory-mb", value_name = "MIB", env = "TASKFLEET_JQ_MEMORY_MB", default_value = "512", value_parser = settings::positive_mib)]
    pub jq_memory_bytes: u64,
    /// Sandbox processes running jq programs at once (default: one per core).
    #[arg(long, env = "TASKFLEET_JQ_SANDBOXES")]
    pub jq_sandboxes: Option<NonZeroUsize>,
}

/// The task queues a worker consumes: at least one, each a valid queue name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queues(pub Vec<String>);

/// Parses a comma-separated list of queue names.
fn parse_queues(text: &str) -> Result<Queues, String> {
    let queues: Vec<String> = text
        .split(',')
        .map(str::trim)
        .filter(|queue| !queue.is_empty())
        .map(str::to_owned)
        .collect();
    if queues.is_empty() {
        return Err("names no queue".to_owned());
    }
    for queue in &queues {
        check_queue_name(queue).map_err(|error| error.to_string())?;
    }
    Ok(Queues(queues))
}

/// Everything a worker needs to know to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// RabbitMQ URL, with its heartbeat, and the CA certificate its TLS connections trust.
    pub amqp_url: AmqpUrl,
    /// Redis URL, and the CA certificate its TLS connections trust.
    pub redis_url: RedisUrl,
    /// Prefix of every queue and Redis key.
    pub namespace: Namespace,
    /// The task queues consumed.
    pub queues: Vec<String>,
    /// Tasks in flight at once.
    pub concurrency: NonZeroUsize,
    /// Where metrics are served, if they are kept.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Directories prepended to Python's `sys.path`, first first.
    pub python_path: Vec<PathBuf>,
    /// The virtualenv whose packages steps may import.
    pub virtual_env: Option<PathBuf>,
    /// This worker's id, unique in the fleet.
    pub worker_id: String,
    /// The host the worker runs on, as shown by `GET /v1/workers`.
    pub host: String,
    /// How long a lease lives without renewal.
    pub lease_ttl: Duration,
    /// How long in-flight tasks may take to finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// The most characters of a Python step's printed and logged output kept per attempt.
    pub max_log_chars: usize,
    /// The largest step output, in bytes of JSON.
    pub max_value_bytes: usize,
    /// How many Python executor processes run at once.
    pub python_executors: NonZeroUsize,
    /// Retire a Python executor after this many calls.
    pub python_max_tasks: Option<u64>,
    /// Retire a Python executor whose resident memory is above this many MiB after a call.
    pub python_max_rss_mb: Option<u64>,
    /// How long an interrupted Python step has to end before its executor is killed.
    pub python_kill_grace: Duration,
    /// What each Python executor may use.
    pub python_confinement: Confinement,
    /// How long a jq program may run when its step sets no `timeout_s`.
    pub jq_time_limit: Duration,
    /// The memory one jq program may take, in bytes.
    pub jq_memory_bytes: u64,
    /// The most sandbox processes running jq programs at once.
    pub jq_sandboxes: NonZeroUsize,
}

impl Config {
    /// Builds the configuration from parsed settings, the directories of
    /// [`PYTHON_PATH_VARIABLE`] (`None` when unset) and the host's name (`None`: read from the
    /// kernel).
    pub fn new(
        settings: Settings,
        python_path_variable: Option<&str>,
        host: Option<String>,
    ) -> Self {
        let cores = NonZeroUsize::new(settings::cores()).unwrap_or(NonZeroUsize::MIN);
        let mut python_path = settings.python_path;
        if let Some(extra) = python_path_variable.filter(|extra| !extra.is_empty()) {
            python_path.extend(std::env::split_paths(extra));
        }
        let host = host
            .filter(|name| !name.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|name| name.trim().to_owned())
                    .filter(|name| !name.is_empty())
            })
            .unwrap_or_else(|| "worker".to_owned());
        Self {
            amqp_url: settings.fleet.amqp(),
            redis_url: settings.fleet.redis(),
            namespace: settings.fleet.namespace,
            queues: settings.queues.0,
            metrics_addr: settings.metrics_addr,
            concurrency: settings
                .concurrency
                .unwrap_or(cores.saturating_mul(NonZeroUsize::new(4).unwrap_or(NonZeroUsize::MIN))),
            python_path,
            virtual_env: settings.virtual_env,
            worker_id: format!(
                "{host}-{}-{}",
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            host,
            lease_ttl: settings.lease_ttl,
            shutdown_grace: settings.shutdown_grace,
            max_log_chars: settings.max_log_chars,
            max_value_bytes: usize::try_from(settings.max_value_bytes).unwrap_or(usize::MAX),
            python_executors: settings.python_executors.unwrap_or(cores),
            // 0 means no limit, for both recycling settings.
            python_max_tasks: Some(settings.python_max_tasks).filter(|n| *n > 0),
            python_max_rss_mb: Some(settings.python_max_rss_mb).filter(|n| *n > 0),
            python_kill_grace: settings.python_kill_grace,
            python_confinement: Confinement {
                memory_bytes: (settings.python_memory_mb > 0)
                    .then(|| settings.python_memory_mb.saturating_mul(1024 * 1024)),
                open_files: (settings.python_open_files > 0).then_some(settings.python_open_files),
                processes: (settings.python_processes > 0).then_some(settings.python_processes),
                cpu_seconds: (settings.python_cpu_s > 0).then_some(settings.python_cpu_s),
                scratch: None,
                writable: settings.python_writable_paths,
                landlock: settings.python_sandbox == PythonSandbox::Landlock,
            },
            jq_time_limit: settings.jq_time_limit,
            jq_memory_bytes: settings.jq_memory_bytes,
            jq_sandboxes: settings.jq_sandboxes.unwrap_or(cores),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn load(args: &[&str], python_path: Option<&str>) -> Result<Config, clap::Error> {
        let args = std::iter::once("taskfleet-worker").chain(args.iter().copied());
        let settings = settings::try_parse_from_args::<Settings>(args)?;
        Ok(Config::new(settings, python_path, Some("host".to_owned())))
    }

    #[test]
    fn defaults_and_flags() {
        let config = load(&[], None).expect("defaults load");
        assert_eq!(config.queues, vec!["default".to_owned()]);
        assert_eq!(config.namespace.as_str(), "taskfleet");
        assert_eq!(config.python_max_tasks, None);
        assert_eq!(config.python_max_rss_mb, None);
        assert_eq!(config.python_kill_grace, Duration::from_secs(2));
        assert_eq!(config.jq_time_limit, Duration::from_secs(60));
        assert_eq!(config.jq_memory_bytes, 512 * 1024 * 1024);
        // The scheduler counts a worker gone after three of these without a heartbeat.
        assert_eq!(
            config.lease_ttl,
            Duration::from_secs(taskfleet_common::records::DEFAULT_LEASE_TTL_S)
        );
        assert!(config.worker_id.starts_with("host-"));
        let config = load(
            &[
                "--queues",
                "a, b",
                "--concurrency",
                "3",
                "--venv",
                "/venv",
                "--python-executors",
                "5",
                "--python-max-tasks",
                "100",
                "--python-max-rss-mb",
                "512",
                "--python-kill-grace-s",
                "0.5",
            ],
            None,
        )
        .expect("loads");
        assert_eq!(config.queues, vec!["a".to_owned(), "b".to_owned()]);
        assert_eq!(config.concurrency.get(), 3);
        assert_eq!(config.virtual_env, Some(PathBuf::from("/venv")));
        assert_eq!(config.python_executors.get(), 5);
        assert_eq!(config.python_max_tasks, Some(100));
        assert_eq!(config.python_max_rss_mb, Some(512));
        assert_eq!(config.python_kill_grace, Duration::from_millis(500));
    }

    #[test]
    fn python_path_entries_of_the_flag_come_before_the_variables() {
        let config = load(
            &["--python-path", "/a", "--python-path", "/b"],
            Some("/c:/d"),
        )
        .expect("loads");
        let expected: Vec<PathBuf> = ["/a", "/b", "/c", "/d"].iter().map(PathBuf::from).collect();
        assert_eq!(config.python_path, expected);
    }

    #[test]
    fn bad_values_are_named() {
        for (flag, value) in [
            ("--concurrency", "0"),
            ("--queues", "a b"),
            ("--queues", ","),
            ("--python-executors", "0"),
            ("--python-max-rss-mb", "lots"),
            ("--python-kill-grace-s", "nan"),
            ("--jq-time-limit-ms", "0"),
            ("--jq-memory-mb", "0"),
            ("--jq-sandboxes", "0"),
        ] {
            let error = load(&[flag, value], None).expect_err("a bad value");
            assert!(error.to_string().contains(flag), "{flag}: {error}");
        }
    }

    #[test]
    fn every_setting_has_its_environment_variable() {
        for arg in Settings::command().get_arguments() {
            let id = arg.get_id().as_str();
            // The Python path's variable adds to the flag instead (see its doc).
            if arg.is_hide_set() || ["help", "version", "python_path"].contains(&id) {
                continue;
            }
            assert!(arg.get_env().is_some(), "{id} has no variable");
        }
    }
}
