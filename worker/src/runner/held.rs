//! The count of tasks this worker holds in each task queue, from delivery to report (running,
//! or waiting for a slot or for the other tasks of their bundle), which its heartbeat
//! publishes. It only counts: it neither limits what the worker takes nor writes to Redis.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use taskfleet_common::sync::lock;

/// Counts the tasks a worker holds in each task queue, from delivery to report (running, or
/// waiting for a slot in their bundle), for its heartbeat.
#[derive(Default)]
pub(super) struct HeldTasks(Mutex<HashMap<Arc<str>, usize>>);

impl HeldTasks {
    /// Counts one task of `queue` until the returned guard is dropped.
    pub(super) fn hold<'a>(&'a self, queue: &Arc<str>) -> HeldTask<'a> {
        *lock(&self.0).entry(queue.clone()).or_default() += 1;
        HeldTask {
            tasks: self,
            queue: queue.clone(),
        }
    }

    /// The counts now, by queue.
    pub(super) fn counts(&self) -> BTreeMap<String, usize> {
        lock(&self.0)
            .iter()
            .map(|(queue, count)| (queue.to_string(), *count))
            .collect()
    }
}

/// One task counted by [`HeldTasks`].
pub(super) struct HeldTask<'a> {
    tasks: &'a HeldTasks,
    queue: Arc<str>,
}

impl Drop for HeldTask<'_> {
    fn drop(&mut self) {
        let mut held = lock(&self.tasks.0);
        if let Some(count) = held.get_mut(&self.queue) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.queue);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_tasks_are_counted_per_queue_until_their_guards_drop() {
        let held = HeldTasks::default();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let first = held.hold(&a);
        let second = held.hold(&a);
        let other = held.hold(&b);
        let counts = |expected: &[(&str, usize)]| {
            let expected: BTreeMap<String, usize> = expected
                .iter()
                .map(|(queue, count)| ((*queue).to_owned(), *count))
                .collect();
            assert_eq!(held.counts(), expected);
        };
        counts(&[("a", 2), ("b", 1)]);
        drop((first, other));
        counts(&[("a", 1)]);
        drop(second);
        counts(&[]);
    }
}
