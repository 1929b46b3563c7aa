//! Settings read from flags and environment variables (clap's `env` support: a flag wins over
//! its variable, a variable over the default).

use taskfleet_common::names::DEFAULT_NAMESPACE;
use taskfleet_common::{Namespace, amqp};

use crate::amqp::AmqpUrl;
use crate::redis_connection::RedisUrl;
use crate::tls::CaCertificate;

/// What every process of a fleet shares: its services and its namespace.
#[derive(Debug, Clone, clap::Args)]
pub struct FleetSettings {
    /// RabbitMQ URL; `heartbeat=5` is added unless the URL has a `heartbeat`.
    #[arg(
        long,
        env = "TASKFLEET_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// Redis URL.
    #[arg(
        long,
        env = "TASKFLEET_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/0"
    )]
    pub redis_url: String,
    /// Prefix of every queue and Redis key, so fleets can share services.
    #[arg(long, env = "TASKFLEET_NAMESPACE", default_value = DEFAULT_NAMESPACE, value_parser = Namespace::new)]
    pub namespace: Namespace,
    /// CA certificate (PEM file) that `amqps://` and `rediss://` connections trust: added to
    /// the system's CA certificates for RabbitMQ, the only one trusted for Redis.
    #[arg(long, value_name = "PATH", env = CA_CERT_VARIABLE, value_parser = ca_certificate)]
    pub ca_cert: Option<CaCertificate>,
}

/// The variable naming the CA certificate of the fleet's TLS connections to its services.
pub const CA_CERT_VARIABLE: &str = "TASKFLEET_CA_CERT";

impl FleetSettings {
    /// The RabbitMQ URL to connect to: the one given, with the default heartbeat unless it
    /// names one.
    pub fn amqp_url_with_heartbeat(&self) -> String {
        amqp::with_heartbeat(&self.amqp_url, amqp::DEFAULT_HEARTBEAT_S)
    }

    /// Returns how to reach RabbitMQ: [`Self::amqp_url_with_heartbeat`] and the CA certificate.
    pub fn amqp(&self) -> AmqpUrl {
        AmqpUrl::new(self.amqp_url_with_heartbeat(), self.ca_cert.clone())
    }

    /// Returns how to reach Redis: its URL and the CA certificate.
    pub fn redis(&self) -> RedisUrl {
        RedisUrl::new(self.redis_url.clone(), self.ca_cert.clone())
    }
}

/// Reads and checks the CA certificate file named by `--ca-cert` or [`CA_CERT_VARIABLE`], so
/// that one that cannot be used stops the process at start, naming the setting and the file.
pub fn ca_certificate(path: &str) -> Result<CaCertificate, String> {
    CaCertificate::read(std::path::Path::new(path))
        .map_err(|error| format!("{CA_CERT_VARIABLE} cannot be used: {error}"))
}

/// Payload encryption, which the scheduler and every worker of a fleet share.
#[derive(Debug, Clone, clap::Args)]
pub struct EncryptionSettings {
    /// Keys that encrypt payloads (inputs, outputs, errors, logs) wherever they rest or travel:
    /// `id:base64-of-32-bytes`, comma-separated; the first encrypts, all decrypt.
    #[arg(long, value_name = "KEYS", env = "TASKFLEET_ENCRYPTION_KEYS")]
    pub encryption_keys: Option<String>,
}

impl EncryptionSettings {
    /// Turns encryption on for this process when keys are given; `Err` says what is wrong with
    /// them (never quoting a key).
    pub fn install(&self) -> Result<(), String> {
        let Some(keys) = self.encryption_keys.as_deref() else {
            return Ok(());
        };
        let keyring = taskfleet_common::seal::Keyring::parse(keys)
            .map_err(|error| format!("TASKFLEET_ENCRYPTION_KEYS: {error}"))?;
        tracing::info!(key = keyring.sealing_key_id(), "payload encryption on");
        taskfleet_common::seal::install(keyring);
        Ok(())
    }
}

/// Parses settings of type `T` from the process's arguments and environment; exits with clap's
/// message on a bad value or `--help`.
pub fn parse<T: clap::Parser>() -> T {
    let matches = taskfleet_common::settings::with_environment(T::command()).get_matches();
    T::from_arg_matches(&matches).unwrap_or_else(|error| error.exit())
}

/// Parses settings of type `T` from `args` alone (the first is the program's name), reading no
/// environment variable: for tests and tools whose outcome must not depend on the environment
/// they happen to run in.
pub fn try_parse_from_args<T: clap::Parser>(
    args: impl IntoIterator<Item = impl Into<std::ffi::OsString> + Clone>,
) -> Result<T, clap::Error> {
    let matches = T::command()
        .mut_args(|arg| arg.env(None))
        .try_get_matches_from(args)?;
    T::from_arg_matches(&matches)
}

/// Parses a duration given in whole seconds.
pub fn seconds(text: &str) -> Result<std::time::Duration, String> {
    text.parse::<u64>()
        .map(std::time::Duration::from_secs)
        .map_err(|error| format!("{text:?} is not a whole number of seconds: {error}"))
}

/// Parses a duration given in seconds, fractions allowed.
pub fn fractional_seconds(text: &str) -> Result<std::time::Duration, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|error| format!("{text:?} is not a number of seconds: {error}"))?;
    std::time::Duration::try_from_secs_f64(seconds)
        .map_err(|error| format!("{text:?} is not a duration in seconds: {error}"))
}

/// Parses a duration given in whole milliseconds, at least 1.
pub fn positive_millis(text: &str) -> Result<std::time::Duration, String> {
    match text.parse::<u64>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(millis) => Ok(std::time::Duration::from_millis(millis)),
        Err(error) => Err(format!(
            "{text:?} is not a whole number of milliseconds: {error}"
        )),
    }
}

/// Parses a size given in whole MiB, at least 1, into bytes.
pub fn positive_mib(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(mib) => Ok(mib.saturating_mul(1024 * 1024)),
        Err(error) => Err(format!("{text:?} is not a whole number of MiB: {error}")),
    }
}

/// Returns the number of cores this process may use, at least 1.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn durations_and_sizes_parse_in_their_units() {
        assert_eq!(seconds("10"), Ok(Duration::from_secs(10)));
        assert!(seconds("1.5").is_err());
        assert_eq!(fractional_seconds("0.5"), Ok(Duration::from_millis(500)));
        assert!(fractional_seconds("-1").is_err());
        assert_eq!(positive_millis("250"), Ok(Duration::from_millis(250)));
        assert!(positive_millis("0").is_err());
        assert_eq!(positive_mib("2"), Ok(2 * 1024 * 1024));
        assert!(positive_mib("0").is_err());
    }

    #[derive(Debug, clap::Parser)]
    struct Fleet {
        #[command(flatten)]
        fleet: FleetSettings,
    }

    #[test]
    fn the_ca_certificate_is_optional_and_one_that_cannot_be_read_is_named() {
        let fleet = try_parse_from_args::<Fleet>(["fleet"]).expect("defaults load");
        assert!(fleet.fleet.ca_cert.is_none());
        let error = try_parse_from_args::<Fleet>(["fleet", "--ca-cert", "/nonexistent/ca.pem"])
            .expect_err("no such file");
        let message = error.to_string();
        for named in ["--ca-cert", "TASKFLEET_CA_CERT", "/nonexistent/ca.pem"] {
            assert!(message.contains(named), "{named}: {message}");
        }
    }
}
