//! Names of every queue, exchange and Redis key, derived from the fleet's namespace, so that
//! several fleets (and test runs) can share one broker and one Redis without seeing each other.

use crate::ids::{RunId, TaskId};

/// The default namespace, used when `TASKFLEET_NAMESPACE` is not set.
pub const DEFAULT_NAMESPACE: &str = "taskfleet";
/// The default task queue of a step that names none.
pub const DEFAULT_QUEUE: &str = "default";
/// The highest step priority; task queues are declared with this `x-max-priority`.
pub const MAX_PRIORITY: u8 = 9;

/// A validated namespace: the prefix of every queue, exchange and key of one fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace(String);

/// Describes why a namespace or queue name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {name:?} is invalid: use 1 to 64 characters among A-Z a-z 0-9 _ - .")]
pub struct NameError {
    what: &'static str,
    name: String,
}

/// Returns whether `name` is 1 to 64 characters among `A-Z a-z 0-9 _ - .`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Checks a queue name as a step may give it.
pub fn check_queue_name(queue: &str) -> Result<(), NameError> {
    if is_valid_name(queue) {
        Ok(())
    } else {
        Err(NameError {
            what: "queue name",
            name: queue.to_owned(),
        })
    }
}

impl Namespace {
    /// Returns the namespace `name`, or an error naming what is wrong with it.
    pub fn new(name: &str) -> Result<Self, NameError> {
        if is_valid_name(name) {
            Ok(Self(name.to_owned()))
        } else {
            Err(NameError {
                what: "namespace",
                name: name.to_owned(),
            })
        }
    }

    /// Returns the namespace itself.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Returns the RabbitMQ queue that holds the tasks of the named task queue.
    pub fn task_queue(&self, queue: &str) -> String {
        format!("{}.tasks.{queue}", self.0)
    }

    /// Returns the task queue whose RabbitMQ queue is `broker_queue` (the inverse of
    /// [`Self::task_queue`]), or `None` if it is not a task queue of this namespace.
    pub fn task_queue_name<'a>(&self, broker_queue: &'a str) -> Option<&'a str> {
        broker_queue
            .strip_prefix(self.0.as_str())?
            .strip_prefix(".tasks.")
            .filter(|queue| !queue.is_empty())
    }

    /// Returns the RabbitMQ queue on which workers report completions to the schedulers.
    pub fn completions_queue(&self) -> String {
        format!("{}.completions", self.0)
    }

    /// Returns the RabbitMQ queue where messages nobody can read are kept for an operator: a
    /// task or completion that names no task, which no retry could ever handle.
    pub fn dead_letters_queue(&self) -> String {
        format!("{}.dead-letters", self.0)
    }

    /// Returns the Redis key of a task's latest result.
    pub fn result_key(&self, task_id: TaskId) -> String {
        format!("{}:result:{task_id}", self.0)
    }

    /// Returns the Redis key of the lease a worker holds on a running task.
    pub fn lease_key(&self, task_id: TaskId) -> String {
        format!("{}:lease:{task_id}", self.0)
    }

    /// Returns the Redis key of a worker's heartbeat record.
    pub fn worker_key(&self, worker_id: &str) -> String {
        format!("{}:worker:{worker_id}", self.0)
    }

    /// Returns the Redis sorted set of live workers, scored by last heartbeat (unix ms).
    pub fn workers_key(&self) -> String {
        format!("{}:workers", self.0)
    }

    /// Returns the Redis key that marks a run as cancelled, so workers drop its tasks when
    /// they are delivered.
    pub fn cancelled_key(&self, run_id: RunId) -> String {
        format!("{}:cancelled:{run_id}", self.0)
    }

    /// Returns the Redis pub/sub channel on which cancelled run ids are announced to workers,
    /// which stop the run's running tasks.
    pub fn cancel_channel(&self) -> String {
        format!("{}:cancel", self.0)
    }

    /// Returns the Redis pub/sub channel on which finished run ids are announced.
    pub fn run_finished_channel(&self) -> String {
        format!("{}:run-finished", self.0)
    }

    /// Returns the Redis key holding the state of a rate limit's group
    /// (`crate::definition::limits::group` or `queue_group`): its reservations of starts.
    pub fn rate_key(&self, group: &str) -> String {
        format!("{}:rate:{group}", self.0)
    }

    /// The Redis counter of a tenant's submissions in one second (Unix time).
    pub fn submissions_key(&self, tenant: &str, second: u64) -> String {
        format!("{}:submissions:{tenant}:{second}", self.0)
    }
}

impl Default for Namespace {
    fn default() -> Self {
        Self(DEFAULT_NAMESPACE.to_owned())
    }
}

impl std::fmt::Display for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, valid: bool) {
        assert_eq!(Namespace::new(name).is_ok(), valid, "{name:?}");
    }

    #[test]
    fn namespace_names() {
        check("taskfleet", true);
        check("t-1_a.b", true);
        check("", false);
        check("a b", false);
        check("a:b", false);
        check(&"x".repeat(65), false);
    }

    #[test]
    fn names_carry_the_namespace() {
        let ns = Namespace::new("ns1").expect("valid namespace");
        assert_eq!(ns.task_queue("default"), "ns1.tasks.default");
        assert_eq!(ns.task_queue_name(&ns.task_queue("etl.x")), Some("etl.x"));
        assert_eq!(ns.task_queue_name("ns2.tasks.default"), None);
        assert_eq!(ns.task_queue_name("ns1.completions"), None);
        assert_eq!(ns.task_queue_name("ns1.tasks."), None);
        assert_eq!(ns.completions_queue(), "ns1.completions");
        assert!(ns.result_key(TaskId::new()).starts_with("ns1:result:"));
        assert_eq!(ns.rate_key(r#"["queue","q"]"#), r#"ns1:rate:["queue","q"]"#);
    }
}
