//! The records kept in Redis for other processes to read: the lease on a running task
//! (`{ns}:lease:{task}`), a task's stored result (`{ns}:result:{task}`) and a worker's heartbeat
//! hash (`{ns}:worker:{id}`), with their field names and how long they live. Whoever writes a
//! record and whoever reads it go through these types, so the two sides cannot drift apart.
//!
//! This module only turns records into what Redis stores (a JSON string, or a hash's field list)
//! and back. It sends no command: the keys come from [`crate::names`], and the commands that
//! write and read the records stay with their callers.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::protocol::Outcome;

/// How long a worker's lease on a task lives without renewal unless the worker is configured
/// otherwise (`TASKFLEET_LEASE_TTL_S`), in seconds. A worker's heartbeat record lives as long.
pub const DEFAULT_LEASE_TTL_S: u64 = 30;

/// How long a task's stored result stays in Redis.
pub const RESULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// How long after its last heartbeat a worker is still looked up among the live workers: three
/// lease times of [`DEFAULT_LEASE_TTL_S`]. A reader cannot know the lease time a worker was
/// configured with, and a worker that stopped renewing has its record expire sooner anyway.
pub const HEARTBEAT_STALE_AFTER: Duration = Duration::from_secs(3 * DEFAULT_LEASE_TTL_S);

/// Returns how often a worker renews its leases and its heartbeat: every third of `lease_ttl`, so
/// that two renewals may fail before a lease expires, but at most every 100 ms.
pub fn renewal_period(lease_ttl: Duration) -> Duration {
    (lease_ttl / 3).max(Duration::from_millis(100))
}

/// Describes why a record read from Redis was refused.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A JSON record did not parse.
    #[error("reading the record: {0}")]
    Json(#[from] serde_json::Error),
    /// A field every writer sets is absent.
    #[error("the record has no {field} field")]
    Missing {
        /// The field's name.
        field: &'static str,
    },
    /// A field holds something its writer never writes.
    #[error("the record's {field} field is not valid: {value:?}")]
    Invalid {
        /// The field's name.
        field: &'static str,
        /// What it holds.
        value: String,
    },
}

/// The lease a worker holds on a running task (`{ns}:lease:{task}`), stored as JSON with the
/// worker's lease time (`SET ... PX`), renewed every [`renewal_period`] and deleted when the task
/// is reported. The scheduler shows a queued task with a lease as running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The worker running the task.
    pub worker_id: String,
    /// The attempt it runs.
    pub attempt: u32,
    /// When the worker started the attempt.
    pub started_at: DateTime<Utc>,
}

impl Lease {
    /// Returns the lease as it is stored.
    pub fn to_json(&self) -> String {
        // A string, a number and a timestamp always serialise.
        serde_json::to_string(self).expect("a lease always serialises")
    }

    /// Reads a stored lease.
    pub fn from_json(text: &str) -> Result<Self, RecordError> {
        Ok(serde_json::from_str(text)?)
    }
}

/// The latest outcome of a task (`{ns}:result:{task}`), stored as JSON for [`RESULT_TTL`] by the
/// worker that reported it, once the broker confirmed the completion. A worker that receives the
/// same attempt again (its acknowledgement was lost with a connection) reports this outcome
/// instead of running the task again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredResult {
    /// The attempt that ended so.
    pub attempt: u32,
    /// How it ended.
    pub outcome: Outcome,
    /// When it ended.
    pub finished_at: DateTime<Utc>,
}

impl StoredResult {
    /// Returns the result as it is stored.
    pub fn to_json(&self) -> String {
        // Every map key of an outcome is a string and no value is foreign.
        serde_json::to_string(self).expect("a result always serialises")
    }

    /// Reads a stored result.
    pub fn from_json(text: &str) -> Result<Self, RecordError> {
        Ok(serde_json::from_str(text)?)
    }
}

/// A worker's heartbeat (`{ns}:worker:{id}`), a Redis hash written in full every
/// [`renewal_period`] with the worker's lease time as its TTL, and deleted when the worker stops;
/// the worker's id is also scored by [`Self::last_heartbeat_ms`] in the set of live workers
/// (`{ns}:workers`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerHeartbeat {
    /// The host the worker runs on.
    pub host: String,
    /// The task queues it consumes.
    pub queues: Vec<String>,
    /// How many tasks it runs at once.
    pub concurrency: usize,
    /// How many tasks it runs now.
    pub running: usize,
    /// How many tasks it holds (delivered, not yet reported) in each task queue; queues where it
    /// holds none are left out. Workers written before this was recorded leave the field out,
    /// and read back as holding nothing.
    pub held: BTreeMap<String, usize>,
    /// When it wrote this, in milliseconds since the Unix epoch.
    pub last_heartbeat_ms: i64,
}

impl WorkerHeartbeat {
    /// The hash field of [`Self::host`].
    pub const HOST: &'static str = "host";
    /// The hash field of [`Self::queues`], comma-separated (queue names never hold a comma).
    pub const QUEUES: &'static str = "queues";
    /// The hash field of [`Self::concurrency`].
    pub const CONCURRENCY: &'static str = "concurrency";
    /// The hash field of [`Self::running`].
    pub const RUNNING: &'static str = "running";
    /// The hash field of [`Self::held`], a JSON object of queue to count.
    pub const HELD: &'static str = "held";
    /// The hash field of [`Self::last_heartbeat_ms`].
    pub const LAST_HEARTBEAT_MS: &'static str = "last_heartbeat_ms";

    /// Returns the hash's fields and their values, for `HSET`.
    pub fn to_fields(&self) -> [(&'static str, String); 6] {
        [
            (Self::HOST, self.host.clone()),
            (Self::QUEUES, self.queues.join(",")),
            (Self::CONCURRENCY, self.concurrency.to_string()),
            (Self::RUNNING, self.running.to_string()),
            (
                Self::HELD,
                // A map of strings to counts always serialises.
                serde_json::to_string(&self.held).expect("held counts always serialise"),
            ),
            (Self::LAST_HEARTBEAT_MS, self.last_heartbeat_ms.to_string()),
        ]
    }

    /// Reads a heartbeat from the hash's fields (as `HGETALL` returns them). Fields it does not
    /// know are ignored, so a newer worker's record still reads.
    pub fn from_fields(fields: &BTreeMap<String, String>) -> Result<Self, RecordError> {
        let field =
            |name: &'static str| fields.get(name).ok_or(RecordError::Missing { field: name });
        let number = |name: &'static str| -> Result<i64, RecordError> {
            let value = field(name)?;
            value.parse().map_err(|_| RecordError::Invalid {
                field: name,
                value: value.clone(),
            })
        };
        let count = |name: &'static str| -> Result<usize, RecordError> {
            let value = field(name)?;
            value.parse().map_err(|_| RecordError::Invalid {
                field: name,
                value: value.clone(),
            })
        };
        let held = match fields.get(Self::HELD) {
            Some(held) => serde_json::from_str(held).map_err(|_| RecordError::Invalid {
                field: Self::HELD,
                value: held.clone(),
            })?,
            None => BTreeMap::new(),
        };
        Ok(Self {
            host: field(Self::HOST)?.clone(),
            queues: field(Self::QUEUES)?
                .split(',')
                .filter(|queue| !queue.is_empty())
                .map(str::to_owned)
                .collect(),
            concurrency: count(Self::CONCURRENCY)?,
            running: count(Self::RUNNING)?,
            held,
            last_heartbeat_ms: number(Self::LAST_HEARTBEAT_MS)?,
        })
    }

    /// Returns when the worker wrote this, or `None` if the time is out of range.
    pub fn last_heartbeat(&self) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp_millis(self.last_heartbeat_ms)
    }
}

/// A stopped run's flag (`Namespace::cancelled_key`): when the run was stopped, in milliseconds
/// since the epoch. A task of the run made at or before that moment (a task id is a version 7
/// UUID, which holds the milliseconds of its making) is dropped when delivered, and stopped
/// when running; a task made after it belongs to a re-run of the run and goes on. A flag that is
/// no plausible time (the `1` of earlier versions) stops every task of the run.
pub mod stop_flag {
    use crate::ids::TaskId;

    /// The earliest value read as a time (2001): anything below stops every task.
    const EARLIEST_MS: u64 = 1_000_000_000_000;

    /// The script that sets a flag to a stop time unless it holds a later one, so that a stop
    /// announced late never lowers the flag below a later stop's. KEYS: the flag; ARGV: the stop
    /// time in milliseconds, the flag's lifetime in seconds.
    pub const SET_SCRIPT: &str = "local current = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) end
return 0";

    /// Whether a run stopped at `stopped_at_ms` (a flag's value) stops `task`.
    pub fn stops(stopped_at_ms: u64, task: TaskId) -> bool {
        if stopped_at_ms < EARLIEST_MS {
            return true;
        }
        match task.0.get_timestamp() {
            Some(made) => {
                let (seconds, nanos) = made.to_unix();
                seconds
                    .saturating_mul(1000)
                    .saturating_add(u64::from(nanos / 1_000_000))
                    <= stopped_at_ms
            }
            None => true,
        }
    }

    /// Whether a flag as read from Redis stops `task`: no flag stops nothing.
    pub fn read_stops(flag: Option<&str>, task: TaskId) -> bool {
        flag.is_some_and(|value| stops(value.trim().parse().unwrap_or(0), task))
    }

    /// Returns the milliseconds since the epoch now: a stop's time.
    pub fn now_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_flag_stops_the_tasks_made_before_it_and_legacy_flags_stop_all() {
            let before = TaskId::new();
            std::thread::sleep(std::time::Duration::from_millis(5));
            let now = now_ms();
            std::thread::sleep(std::time::Duration::from_millis(5));
            let after = TaskId::new();
            assert!(stops(now, before));
            assert!(!stops(now, after));
            assert!(read_stops(Some("1"), after), "a flag of earlier versions");
            assert!(read_stops(Some("garbage"), after));
            assert!(!read_stops(None, before));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StepError;

    fn heartbeat() -> WorkerHeartbeat {
        WorkerHeartbeat {
            host: "box-1".into(),
            queues: vec!["default".into(), "etl.x".into()],
            concurrency: 8,
            running: 3,
            held: BTreeMap::from([("default".into(), 2), ("etl.x".into(), 5)]),
            last_heartbeat_ms: 1_764_950_400_123,
        }
    }

    fn fields(heartbeat: &WorkerHeartbeat) -> BTreeMap<String, String> {
        heartbeat
            .to_fields()
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect()
    }

    #[test]
    fn heartbeat_reads_back_as_written() {
        let written = heartbeat();
        let read = WorkerHeartbeat::from_fields(&fields(&written)).expect("reads");
        assert_eq!(read, written);
        assert_eq!(
            read.last_heartbeat().map(|at| at.timestamp_millis()),
            Some(written.last_heartbeat_ms)
        );
    }

    #[test]
    fn heartbeat_fields_keep_the_names_and_forms_readers_know() {
        let expected = [
            ("host", "box-1"),
            ("queues", "default,etl.x"),
            ("concurrency", "8"),
            ("running", "3"),
            ("held", r#"{"default":2,"etl.x":5}"#),
            ("last_heartbeat_ms", "1764950400123"),
        ];
        let written = heartbeat().to_fields();
        let written: Vec<(&str, &str)> = written
            .iter()
            .map(|(name, value)| (*name, value.as_str()))
            .collect();
        assert_eq!(written, expected);
    }

    #[test]
    fn heartbeat_of_an_older_worker_without_held_counts_holds_nothing() {
        let mut older = fields(&heartbeat());
        older.remove(WorkerHeartbeat::HELD);
        let read = WorkerHeartbeat::from_fields(&older).expect("reads");
        assert!(read.held.is_empty());
        assert_eq!(read.queues, ["default", "etl.x"]);
    }

    #[test]
    fn heartbeat_with_unknown_fields_still_reads() {
        let mut newer = fields(&heartbeat());
        newer.insert("version".into(), "7".into());
        assert_eq!(
            WorkerHeartbeat::from_fields(&newer).expect("reads"),
            heartbeat()
        );
    }

    #[test]
    fn heartbeat_without_a_field_every_worker_writes_is_refused() {
        for field in [
            "host",
            "queues",
            "concurrency",
            "running",
            "last_heartbeat_ms",
        ] {
            let mut partial = fields(&heartbeat());
            partial.remove(field);
            let error = WorkerHeartbeat::from_fields(&partial).expect_err(field);
            assert_eq!(
                error.to_string(),
                format!("the record has no {field} field")
            );
        }
        let mut garbled = fields(&heartbeat());
        garbled.insert("running".into(), "many".into());
        assert!(matches!(
            WorkerHeartbeat::from_fields(&garbled),
            Err(RecordError::Invalid {
                field: "running",
                ..
            })
        ));
    }

    #[test]
    fn heartbeat_of_a_worker_without_queues_reads_an_empty_list() {
        let mut idle = heartbeat();
        idle.queues.clear();
        idle.held.clear();
        assert_eq!(
            WorkerHeartbeat::from_fields(&fields(&idle)).expect("reads"),
            idle
        );
    }

    #[test]
    fn lease_reads_back_as_written() {
        let lease = Lease {
            worker_id: "box-1-42-abcdef01".into(),
            attempt: 2,
            started_at: Utc::now(),
        };
        let json = lease.to_json();
        assert_eq!(Lease::from_json(&json).expect("reads"), lease);
        let value: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert_eq!(value["worker_id"], "box-1-42-abcdef01");
        assert_eq!(value["attempt"], 2);
    }

    #[test]
    fn result_reads_back_as_written_and_keeps_its_field_names() {
        let result = StoredResult {
            attempt: 3,
            outcome: Outcome::Failed {
                error: StepError::new("cancelled", "stopped"),
            },
            finished_at: Utc::now(),
        };
        let json = result.to_json();
        assert_eq!(StoredResult::from_json(&json).expect("reads"), result);
        let value: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert_eq!(value["attempt"], 3);
        assert_eq!(value["outcome"]["status"], "failed");
        assert_eq!(value["outcome"]["error"]["type"], "cancelled");
        assert!(value["finished_at"].is_string());

        let succeeded = StoredResult {
            attempt: 1,
            outcome: Outcome::Succeeded {
                output: serde_json::json!({"n": [1, 2]}),
            },
            finished_at: Utc::now(),
        };
        assert_eq!(
            StoredResult::from_json(&succeeded.to_json()).expect("reads"),
            succeeded
        );
    }

    #[test]
    fn result_that_is_not_a_record_is_refused() {
        assert!(StoredResult::from_json("not json").is_err());
        assert!(StoredResult::from_json(r#"{"attempt":1}"#).is_err());
    }

    #[test]
    fn renewal_is_every_third_of_the_lease_and_at_most_every_100_ms() {
        assert_eq!(
            renewal_period(Duration::from_secs(30)),
            Duration::from_secs(10)
        );
        assert_eq!(
            renewal_period(Duration::from_millis(150)),
            Duration::from_millis(100)
        );
    }
}
