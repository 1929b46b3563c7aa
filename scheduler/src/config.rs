//! The scheduler's configuration: defaults, then `TASKFLEET_*` environment variables, then
//! command-line flags. Parsed once at start into typed values; a bad value fails the start with
//! a message naming the variable.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::{NonZeroU64, NonZeroUsize};
use std::time::Duration;

use taskfleet_common::{Namespace, amqp};

/// Everything the scheduler needs to know to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// PostgreSQL URL; the database is created if missing.
    pub database_url: String,
    /// RabbitMQ URL.
    pub amqp_url: String,
    /// Redis URL.
    pub redis_url: String,
    /// Where the HTTP API listens.
    pub http_addr: SocketAddr,
    /// Prefix of every queue and Redis key.
    pub namespace: Namespace,
    /// The largest request body the API accepts, in bytes.
    pub max_body_bytes: usize,
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
    /// `--http-addr`.
    pub http_addr: Option<String>,
    /// `--database-url`.
    pub database_url: Option<String>,
    /// `--namespace`.
    pub namespace: Option<String>,
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
    /// Builds the configuration from an environment map (normally the process environment) and
    /// command-line overrides.
    pub fn load(env: &HashMap<String, String>, overrides: &Overrides) -> Result<Self, ConfigError> {
        // An empty variable counts as unset, as shells and env files often leave them.
        let get = |name: &str, default: &str| -> String {
            env.get(name)
                .filter(|value| !value.is_empty())
                .cloned()
                .unwrap_or_else(|| default.to_owned())
        };
        let http_addr = overrides
            .http_addr
            .clone()
            .unwrap_or_else(|| get("TASKFLEET_HTTP_ADDR", "127.0.0.1:8080"));
        let namespace = overrides.namespace.clone().unwrap_or_else(|| {
            get(
                "TASKFLEET_NAMESPACE",
                taskfleet_common::names::DEFAULT_NAMESPACE,
            )
        });
        Ok(Self {
            database_url: overrides.database_url.clone().unwrap_or_else(|| {
                get(
                    "TASKFLEET_DATABASE_URL",
                    "postgres://postgres@127.0.0.1:5432/taskfleet",
                )
            }),
            amqp_url: amqp::with_heartbeat(
                &get(
                    "TASKFLEET_AMQP_URL",
                    "amqp://guest:guest@127.0.0.1:5672/%2f",
                ),
                amqp::DEFAULT_HEARTBEAT_S,
            ),
            redis_url: get("TASKFLEET_REDIS_URL", "redis://127.0.0.1:6379/0"),
            http_addr: parse("TASKFLEET_HTTP_ADDR", &http_addr)?,
            namespace: Namespace::new(&namespace).map_err(|error| ConfigError {
                variable: "TASKFLEET_NAMESPACE",
                message: error.to_string(),
            })?,
            max_body_bytes: parse(
                "TASKFLEET_MAX_BODY_BYTES",
                &get("TASKFLEET_MAX_BODY_BYTES", "10485760"),
            )?,
            max_wait: Duration::from_secs(parse(
                "TASKFLEET_MAX_WAIT_S",
                &get("TASKFLEET_MAX_WAIT_S", "60"),
            )?),
            database_pool_size: parse(
                "TASKFLEET_DATABASE_POOL_SIZE",
                &get("TASKFLEET_DATABASE_POOL_SIZE", "16"),
            )?,
            relay_after: Duration::from_secs(parse(
                "TASKFLEET_RELAY_AFTER_S",
                &get("TASKFLEET_RELAY_AFTER_S", "10"),
            )?),
            max_tasks_per_message: parse(
                "TASKFLEET_MAX_TASKS_PER_MESSAGE",
                &get("TASKFLEET_MAX_TASKS_PER_MESSAGE", "64"),
            )?,
            jq_time_limit: Duration::from_millis(
                parse::<NonZeroU64>(
                    "TASKFLEET_JQ_TIME_LIMIT_MS",
                    &get("TASKFLEET_JQ_TIME_LIMIT_MS", "1000"),
                )?
                .get(),
            ),
            jq_memory_bytes: parse::<NonZeroU64>(
                "TASKFLEET_JQ_MEMORY_MB",
                &get("TASKFLEET_JQ_MEMORY_MB", "256"),
            )?
            .get()
            .saturating_mul(1024 * 1024),
            jq_sandboxes: parse(
                "TASKFLEET_JQ_SANDBOXES",
                &get(
                    "TASKFLEET_JQ_SANDBOXES",
                    &std::thread::available_parallelism()
                        .map_or(2, NonZeroUsize::get)
                        .to_string(),
                ),
            )?,
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
    fn defaults_follow_the_spec() {
        let config = Config::load(&env(&[]), &Overrides::default()).expect("defaults load");
        assert_eq!(
            config.database_url,
            "postgres://postgres@127.0.0.1:5432/taskfleet"
        );
        assert_eq!(config.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(config.namespace.as_str(), "taskfleet");
        assert_eq!(config.jq_time_limit, Duration::from_secs(1));
        assert_eq!(config.jq_memory_bytes, 256 * 1024 * 1024);
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
    fn flags_override_env_and_bad_values_are_named() {
        let config = Config::load(
            &env(&[("TASKFLEET_HTTP_ADDR", "127.0.0.1:1")]),
            &Overrides {
                http_addr: Some("127.0.0.1:2".into()),
                ..Overrides::default()
            },
        )
        .expect("loads");
        assert_eq!(config.http_addr.port(), 2);
        let error = Config::load(
            &env(&[("TASKFLEET_NAMESPACE", "a b")]),
            &Overrides::default(),
        )
        .expect_err("bad namespace");
        assert!(
            error.to_string().starts_with("TASKFLEET_NAMESPACE"),
            "{error}"
        );
    }
}
