//! How long the tasks of each queue run on a worker, learned from the completions, so that the
//! dispatcher lets a queue's tasks share a message only as far as the message's work stays
//! short.
//!
//! A worker holds as many messages as it runs tasks at once, so a message of `k` tasks may keep
//! `k - 1` of them waiting behind the first while another worker has nothing to do. Bundles of
//! quick tasks save most of the broker's cost per task; bundles of slow ones save little and
//! spread the work badly. The cost of a message is therefore held to [`BUNDLE_WORK`] by the
//! quickest of the queue's last [`SAMPLES`] tasks. The quickest, because a task's time is taken
//! on a clock: on a worker whose cores are all busy every task takes longer than its work, and
//! bundles made smaller then would only add broker work where there is no idle worker to
//! spread to; and a first call that compiles a program or imports a module does not stand for
//! the queue either. A queue of mostly slow tasks with a few quick ones is bundled as if it
//! were quick; `TASKFLEET_MAX_TASKS_PER_MESSAGE` bounds that.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use taskfleet_common::protocol::Ran;
use taskfleet_common::sync::lock;

/// The work (by its queue's quickest recent task) that one message of several tasks holds at
/// most.
pub const BUNDLE_WORK: Duration = Duration::from_millis(1);
/// The most tasks per message for a queue none of whose tasks has been seen to run yet.
pub const UNSEEN_MOST: usize = 16;
/// The tasks of a queue whose times are kept.
pub const SAMPLES: usize = 32;

/// The recent task times of each queue, shared by the completion loop (which learns) and the
/// dispatch loop (which packs).
#[derive(Debug, Clone, Default)]
pub struct TaskCosts {
    recent_micros: Arc<Mutex<HashMap<String, VecDeque<u64>>>>,
}

impl TaskCosts {
    /// Adds the times of tasks that ran.
    pub fn learn<'a>(&self, ran: impl IntoIterator<Item = &'a Ran>) {
        let mut recent = lock(&self.recent_micros);
        for ran in ran {
            let samples = match recent.get_mut(ran.queue.as_str()) {
                Some(samples) => samples,
                None => recent.entry(ran.queue.clone()).or_default(),
            };
            if samples.len() == SAMPLES {
                samples.pop_front();
            }
            samples.push_back(ran.micros);
        }
    }

    /// The most tasks of `queue` that may share a message, at most `most`: as many as
    /// [`BUNDLE_WORK`] holds by the queue's quickest recent task, at least one;
    /// [`UNSEEN_MOST`] (or `most`, if fewer) before any of its tasks has been seen.
    pub fn per_message(&self, queue: &str, most: usize) -> usize {
        let most = most.max(1);
        let quickest = {
            let recent = lock(&self.recent_micros);
            let Some(&quickest) = recent.get(queue).and_then(|samples| samples.iter().min()) else {
                return most.min(UNSEEN_MOST);
            };
            quickest
        };
        let fits = BUNDLE_WORK.as_micros() / u128::from(quickest.max(1));
        usize::try_from(fits).unwrap_or(usize::MAX).clamp(1, most)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ran(queue: &str, micros: u64) -> Ran {
        Ran {
            queue: queue.to_owned(),
            micros,
        }
    }

    #[test]
    fn quick_tasks_share_messages_up_to_the_most_and_slow_ones_travel_alone() {
        let costs = TaskCosts::default();
        assert_eq!(costs.per_message("quick", 64), UNSEEN_MOST, "unseen queue");
        assert_eq!(costs.per_message("quick", 4), 4, "never more than the most");
        costs.learn(&[ran("quick", 10), ran("slow", 500_000), ran("mid", 125)]);
        assert_eq!(costs.per_message("quick", 64), 64);
        assert_eq!(costs.per_message("slow", 64), 1);
        assert_eq!(costs.per_message("mid", 64), 8, "1 ms of 125 µs tasks");
        assert_eq!(costs.per_message("mid", 0), 1, "at least one");
        costs.learn(&[ran("quick", 0)]);
        assert_eq!(costs.per_message("quick", 64), 64, "a task of no time");
    }

    #[test]
    fn a_queue_is_judged_by_its_quickest_recent_task_and_follows_it_when_it_changes() {
        let costs = TaskCosts::default();
        // The first call compiled its program; on a busy worker the next took longer.
        costs.learn(&[ran("q", 50_000)]);
        assert_eq!(costs.per_message("q", 64), 1);
        costs.learn(&[ran("q", 50_000), ran("q", 10), ran("q", 50_000)]);
        assert_eq!(costs.per_message("q", 64), 64, "the quickest of four");
        // The quick one is the third of the window: it leaves it with the 31st slow task.
        for learned in 1..=SAMPLES {
            costs.learn(&[ran("q", 100_000)]);
            let bundled = costs.per_message("q", 64);
            if learned < SAMPLES - 1 {
                assert_eq!(bundled, 64, "{learned} slow tasks");
            } else {
                assert_eq!(bundled, 1, "{learned} slow tasks");
            }
        }
        costs.learn(&[ran("q", 10)]);
        assert_eq!(costs.per_message("q", 64), 64, "quick again");
    }
}
