//! The worker's configuration: defaults, then `TASKFLEET_*` environment variables, then flags.

use std::collections::HashMap;
use std::num::{NonZeroU64, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use taskfleet_common::names::{DEFAULT_NAMESPACE, DEFAULT_QUEUE, check_queue_name};
use taskfleet_common::{Namespace, amqp};

/// Everything a worker needs to know to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// RabbitMQ URL.
    pub amqp_url: String,
    /// Redis URL.
    pub redis_url: String,
    /// Prefix of every queue and Redis key.
    pub namespace: Namespace,
    /// The task queues consumed.
    pub queues: Vec<String>,
    /// Tasks in flight at once.
    pub concurrency: NonZeroUsize,
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
    /// How many Python executor processes run at once.
    pub python_executors: NonZeroUsize,
    /// Retire a Python executor after this many calls.
    pub python_max_tasks: Option<u64>,
    /// Retire a Python executor whose resident memory is above this many MiB after a call.
    pub python_max_rss_mb: Option<u64>,
    /// How long an interrupted Python step has to end before its executor is killed.
    pub python_kill_grace: Duration,
    /// How long a jq program may run when its step sets no `timeout_s`.
    pub jq_time_limit: Duration,
    /// The memory one jq program may take, in bytes.
    pub jq_memory_bytes: u64,
    /// The most sandbox processes running jq programs at once.
    pub jq_sandboxes: NonZeroUsize,
}

/// Describes a configuration value that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{variable}: {message}")]
pub struct ConfigError {
    variable: &'static str,
    message: String,
}

/// Values given on the command line; each overrides its environment variable.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--queues a,b`.
    pub queues: Option<String>,
    /// `--concurrency N`.
    pub concurrency: Option<usize>,
    /// `--python-path DIR`, repeatable.
    pub python_path: Vec<PathBuf>,
    /// `--venv DIR`.
    pub virtual_env: Option<PathBuf>,
    /// `--namespace`.
    pub namespace: Option<String>,
    /// `--python-executors N`.
    pub python_executors: Option<usize>,
    /// `--python-max-tasks N`.
    pub python_max_tasks: Option<u64>,
    /// `--python-max-rss-mb N`.
    pub python_max_rss_mb: Option<u64>,
}

fn parse<T: std::str::FromStr>(variable: &'static str, text: &str) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    text.parse().map_err(|error: T::Err| ConfigError {
        variable,
        message: format!("{text:?} is not valid: {error}"),
    })
}

impl Config {
    /// Builds the configuration from an environment map and command-line overrides.
    pub fn load(env: &HashMap<String, String>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let get = |name: &str| env.get(name).filter(|value| !value.is_empty()).cloned();
        let namespace = overrides
            .namespace
            .clone()
            .or_else(|| get("TASKFLEET_NAMESPACE"))
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        let queues_text = overrides
            .queues
            .clone()
            .or_else(|| get("TASKFLEET_QUEUES"))
            .unwrap_or_else(|| DEFAULT_QUEUE.to_owned());
        let queues: Vec<String> = queues_text
            .split(',')
            .map(str::trim)
            .filter(|queue| !queue.is_empty())
            .map(str::to_owned)
            .collect();
        if queues.is_empty() {
            return Err(ConfigError {
                variable: "--queues",
                message: "names no queue".to_owned(),
            });
        }
        for queue in &queues {
            check_queue_name(queue).map_err(|error| ConfigError {
                variable: "--queues",
                message: error.to_string(),
            })?;
        }
        let default_concurrency = std::thread::available_parallelism()
            .map_or(4, |cores| cores.get() * 4)
            .to_string();
        let concurrency = match overrides.concurrency {
            Some(concurrency) => concurrency.to_string(),
            None => get("TASKFLEET_CONCURRENCY").unwrap_or(default_concurrency),
        };
        let mut python_path = overrides.python_path.clone();
        if let Some(extra) = get("TASKFLEET_PYTHON_PATH") {
            python_path.extend(std::env::split_paths(&extra));
        }
        let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        let setting = |flag: Option<String>, variable: &'static str, default: String| {
            let text = flag.or_else(|| get(variable)).unwrap_or(default);
            (variable, text)
        };
        let (variable, executors) = setting(
            overrides.python_executors.map(|n| n.to_string()),
            "TASKFLEET_PYTHON_EXECUTORS",
            cores.to_string(),
        );
        let python_executors = parse(variable, &executors)?;
        // 0 means no limit, for both recycling settings.
        let (variable, max_tasks) = setting(
            overrides.python_max_tasks.map(|n| n.to_string()),
            "TASKFLEET_PYTHON_MAX_TASKS",
            "0".to_owned(),
        );
        let python_max_tasks = Some(parse::<u64>(variable, &max_tasks)?).filter(|n| *n > 0);
        let (variable, max_rss) = setting(
            overrides.python_max_rss_mb.map(|n| n.to_string()),
            "TASKFLEET_PYTHON_MAX_RSS_MB",
            "0".to_owned(),
        );
        let python_max_rss_mb = Some(parse::<u64>(variable, &max_rss)?).filter(|n| *n > 0);
        let kill_grace: f64 = parse(
            "TASKFLEET_PYTHON_KILL_GRACE_S",
            &get("TASKFLEET_PYTHON_KILL_GRACE_S").unwrap_or_else(|| "2".to_owned()),
        )?;
        let python_kill_grace =
            Duration::try_from_secs_f64(kill_grace).map_err(|error| ConfigError {
                variable: "TASKFLEET_PYTHON_KILL_GRACE_S",
                message: format!("{kill_grace} is not a duration in seconds: {error}"),
            })?;
        let jq_time_limit_ms: NonZeroU64 = parse(
            "TASKFLEET_JQ_TIME_LIMIT_MS",
            &get("TASKFLEET_JQ_TIME_LIMIT_MS").unwrap_or_else(|| "60000".to_owned()),
        )?;
        let jq_memory_mb: NonZeroU64 = parse(
            "TASKFLEET_JQ_MEMORY_MB",
            &get("TASKFLEET_JQ_MEMORY_MB").unwrap_or_else(|| "512".to_owned()),
        )?;
        let jq_sandboxes = parse(
            "TASKFLEET_JQ_SANDBOXES",
            &get("TASKFLEET_JQ_SANDBOXES").unwrap_or_else(|| cores.to_string()),
        )?;
        let hostname = get("HOSTNAME")
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|name| name.trim().to_owned())
                    .filter(|name| !name.is_empty())
            })
            .unwrap_or_else(|| "worker".to_owned());
        Ok(Self {
            amqp_url: amqp::with_heartbeat(
                &get("TASKFLEET_AMQP_URL")
                    .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()),
                amqp::DEFAULT_HEARTBEAT_S,
            ),
            redis_url: get("TASKFLEET_REDIS_URL")
                .unwrap_or_else(|| "redis://127.0.0.1:6379/0".to_owned()),
            namespace: Namespace::new(&namespace).map_err(|error| ConfigError {
                variable: "TASKFLEET_NAMESPACE",
                message: error.to_string(),
            })?,
            queues,
            concurrency: parse("--concurrency", &concurrency)?,
            python_path,
            virtual_env: overrides
                .virtual_env
                .clone()
                .or_else(|| get("VIRTUAL_ENV").map(PathBuf::from)),
            host: hostname.clone(),
            worker_id: format!(
                "{hostname}-{}-{}",
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            lease_ttl: Duration::from_secs(parse(
                "TASKFLEET_LEASE_TTL_S",
                &get("TASKFLEET_LEASE_TTL_S").unwrap_or_else(|| "30".to_owned()),
            )?),
            max_log_chars: parse(
                "TASKFLEET_MAX_LOG_CHARS",
                &get("TASKFLEET_MAX_LOG_CHARS").unwrap_or_else(|| "65536".to_owned()),
            )?,
            python_executors,
            python_max_tasks,
            python_max_rss_mb,
            python_kill_grace,
            jq_time_limit: Duration::from_millis(jq_time_limit_ms.get()),
            jq_memory_bytes: jq_memory_mb.get().saturating_mul(1024 * 1024),
            jq_sandboxes,
            shutdown_grace: Duration::from_secs(parse(
                "TASKFLEET_SHUTDOWN_GRACE_S",
                &get("TASKFLEET_SHUTDOWN_GRACE_S").unwrap_or_else(|| "30".to_owned()),
            )?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_and_overrides() {
        let config = Config::load(&env(&[]), &Overrides::default()).expect("defaults load");
        assert_eq!(config.queues, vec!["default".to_owned()]);
        assert_eq!(config.namespace.as_str(), "taskfleet");
        let config = Config::load(
            &env(&[("TASKFLEET_QUEUES", "x"), ("VIRTUAL_ENV", "/venv")]),
            &Overrides {
                queues: Some("a, b".into()),
                concurrency: Some(3),
                ..Overrides::default()
            },
        )
        .expect("loads");
        assert_eq!(config.queues, vec!["a".to_owned(), "b".to_owned()]);
        assert_eq!(config.concurrency.get(), 3);
        assert_eq!(config.virtual_env, Some(PathBuf::from("/venv")));
        assert_eq!(config.python_max_tasks, None);
        assert_eq!(config.python_max_rss_mb, None);
        assert_eq!(config.python_kill_grace, Duration::from_secs(2));
        assert_eq!(config.jq_time_limit, Duration::from_secs(60));
        assert_eq!(config.jq_memory_bytes, 512 * 1024 * 1024);
        let config = Config::load(
            &env(&[
                ("TASKFLEET_PYTHON_EXECUTORS", "3"),
                ("TASKFLEET_PYTHON_MAX_TASKS", "100"),
                ("TASKFLEET_PYTHON_KILL_GRACE_S", "0.5"),
            ]),
            &Overrides {
                python_executors: Some(5),
                python_max_rss_mb: Some(512),
                ..Overrides::default()
            },
        )
        .expect("loads");
        assert_eq!(config.python_executors.get(), 5);
        assert_eq!(config.python_max_tasks, Some(100));
        assert_eq!(config.python_max_rss_mb, Some(512));
        assert_eq!(config.python_kill_grace, Duration::from_millis(500));
    }

    #[test]
    fn jq_limits_must_be_positive() {
        for variable in [
            "TASKFLEET_JQ_TIME_LIMIT_MS",
            "TASKFLEET_JQ_MEMORY_MB",
            "TASKFLEET_JQ_SANDBOXES",
        ] {
            let error = Config::load(&env(&[(variable, "0")]), &Overrides::default())
                .expect_err("zero is refused");
            assert!(error.to_string().starts_with(variable), "{error}");
        }
    }

    #[test]
    fn bad_values_are_named() {
        let error = Config::load(
            &env(&[]),
            &Overrides {
                concurrency: Some(0),
                ..Overrides::default()
            },
        )
        .expect_err("zero concurrency");
        assert!(error.to_string().starts_with("--concurrency"), "{error}");
        let error = Config::load(
            &env(&[]),
            &Overrides {
                queues: Some("a b".into()),
                ..Overrides::default()
            },
        )
        .expect_err("bad queue");
        assert!(error.to_string().contains("a b"), "{error}");
        for (variable, value) in [
            ("TASKFLEET_PYTHON_EXECUTORS", "0"),
            ("TASKFLEET_PYTHON_MAX_RSS_MB", "lots"),
            ("TASKFLEET_PYTHON_KILL_GRACE_S", "-1"),
        ] {
            let error = Config::load(&env(&[(variable, value)]), &Overrides::default())
                .expect_err("a bad value");
            assert!(error.to_string().starts_with(variable), "{error}");
        }
    }
}
