//! A step's limits across the fleet: `rate_limit` (starts per second) and `concurrency`
//! (attempts at once), each for the step as a whole or per value of a key program over the
//! step's input. Their fields and checks here; the groups they count in are named by
//! [`group`], so the scheduler and the workers agree on them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::jq;

/// The highest `rate_limit.per_second` (and a queue's `rate_limit_per_s`).
pub const MAX_PER_SECOND: f64 = 100_000.0;
/// The lowest: one start a day.
pub const MIN_PER_SECOND: f64 = 1.0 / 86_400.0;
/// The largest `rate_limit.burst`.
pub const MAX_BURST: u32 = 100_000;
/// The largest `concurrency.limit`.
pub const MAX_CONCURRENCY: u32 = 100_000;
/// The longest a key's value may be, in bytes of JSON.
pub const MAX_KEY_BYTES: usize = 256;

/// `rate_limit`: at most `per_second` starts of the step per second across the fleet, per value
/// of `key` when it has one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Starts per second, more than 0 (fractions allowed: 0.5 is one start every 2 s).
    #[cfg_attr(
        feature = "openapi",
        schema(exclusive_minimum = 0.0, maximum = 100000.0)
    )]
    pub per_second: f64,
    /// How many may start at once after a quiet time (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 100000))]
    pub burst: Option<u32>,
    /// A jq program over the step's input whose value (a string, number or boolean) names the
    /// limit the start counts against: one limit per value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl RateLimit {
    /// The burst, 1 by default.
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(1)
    }
}

/// `concurrency`: at most `limit` attempts of the step at once across the fleet, per value of
/// `key` when it has one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Concurrency {
    /// Attempts at once, at least 1.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 100000))]
    pub limit: u32,
    /// A jq program over the step's input whose value (a string, number or boolean) names the
    /// limit the attempt counts against: one limit per value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Returns what is wrong with a rate of starts per second given in `field`, if anything.
pub fn check_rate(field: &str, per_second: f64) -> Option<String> {
    (!(per_second.is_finite() && (MIN_PER_SECOND..=MAX_PER_SECOND).contains(&per_second))).then(
        || {
            format!(
                "`{field}` must be a number of starts per second above 0, from {MIN_PER_SECOND:.8} \
                 (one a day) to {MAX_PER_SECOND}"
            )
        },
    )
}

/// Appends to `problem` what is wrong with a step's limits; their key programs are compiled
/// through `programs`.
pub(super) fn check(
    rate_limit: Option<&RateLimit>,
    concurrency: Option<&Concurrency>,
    programs: &jq::ProgramCache,
    problem: &mut impl FnMut(String),
) {
    if let Some(rate) = rate_limit {
        if let Some(message) = check_rate("rate_limit.per_second", rate.per_second) {
            problem(message);
        }
        if let Some(burst) = rate.burst
            && !(1..=MAX_BURST).contains(&burst)
        {
            problem(format!(
                "`rate_limit.burst` must be between 1 and {MAX_BURST}"
            ));
        }
        if let Some(key) = &rate.key
            && let Err(error) = programs.get(key)
        {
            problem(format!("`rate_limit.key`: {error}"));
        }
    }
    if let Some(concurrency) = concurrency {
        if !(1..=MAX_CONCURRENCY).contains(&concurrency.limit) {
            problem(format!(
                "`concurrency.limit` must be between 1 and {MAX_CONCURRENCY}"
            ));
        }
        if let Some(key) = &concurrency.key
            && let Err(error) = programs.get(key)
        {
            problem(format!("`concurrency.key`: {error}"));
        }
    }
}

/// Checks the value a key program yielded: a string, number or boolean of at most
/// [`MAX_KEY_BYTES`] as JSON, returned as that JSON.
pub fn key_value(field: &str, value: &Value) -> Result<String, String> {
    let kind = match value {
        Value::String(_) | Value::Number(_) | Value::Bool(_) => None,
        Value::Null => Some("null"),
        Value::Array(_) => Some("an array"),
        Value::Object(_) => Some("an object"),
    };
    if let Some(kind) = kind {
        return Err(format!(
            "`{field}` must yield a string, number or boolean, not {kind}"
        ));
    }
    let json = value.to_string();
    if json.len() > MAX_KEY_BYTES {
        return Err(format!(
            "`{field}` yielded a value of {} bytes, more than {MAX_KEY_BYTES}",
            json.len()
        ));
    }
    Ok(json)
}

/// Names the group a limit counts in: a tenant's step of one workflow (by its name; inline
/// definitions without one share by step id), and the key's value (JSON) when it has one. A JSON
/// array, so that no two groups share a name.
pub fn group(tenant: &str, workflow: Option<&str>, step: &str, key: Option<&str>) -> String {
    serde_json::json!([tenant, workflow.unwrap_or(""), step, key.unwrap_or("")]).to_string()
}

/// Names the group of a queue's own rate limit: every task of the queue, of every tenant.
pub fn queue_group(queue: &str) -> String {
    serde_json::json!(["queue", queue]).to_string()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn keys_are_scalars_of_bounded_size() {
        assert_eq!(key_value("k", &json!("acme")), Ok("\"acme\"".to_owned()));
        assert_eq!(key_value("k", &json!(42)), Ok("42".to_owned()));
        assert_eq!(key_value("k", &json!(true)), Ok("true".to_owned()));
        for (value, kind) in [
            (json!(null), "null"),
            (json!([1]), "an array"),
            (json!({"a": 1}), "an object"),
        ] {
            let error = key_value("concurrency.key", &value).expect_err("not a scalar");
            assert!(
                error.contains("`concurrency.key`") && error.contains(kind),
                "{error}"
            );
        }
        let long = json!("x".repeat(MAX_KEY_BYTES));
        assert!(key_value("k", &long).is_err());
    }

    #[test]
    fn groups_never_collide() {
        assert_ne!(
            group("a", Some("w"), "s", Some("\"k\"")),
            group("a", Some("w"), "s", Some("k"))
        );
        assert_ne!(
            group("a\",\"b", None, "s", None),
            group("a", Some("b"), "s", None)
        );
        assert_ne!(group("t", None, "s", None), queue_group("s"));
    }

    #[test]
    fn rates_are_checked() {
        assert!(check_rate("r", 0.0).is_some());
        assert!(check_rate("r", -1.0).is_some());
        assert!(check_rate("r", f64::NAN).is_some());
        assert!(check_rate("r", MAX_PER_SECOND * 2.0).is_some());
        assert!(check_rate("r", 0.5).is_none());
        assert!(check_rate("r", 1000.0).is_none());
    }
}
