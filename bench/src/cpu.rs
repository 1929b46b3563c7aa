//! CPU time of the processes a workload involves, read from `/proc`: the fleet's own processes
//! (with their children, such as a worker's Python executors) and the services, found by name.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// A named set of processes whose CPU time is summed.
#[derive(Debug, Clone)]
pub enum Group {
    /// These processes and every process descended from them.
    Tree {
        /// The name shown in the report.
        name: &'static str,
        /// The roots.
        pids: Vec<u32>,
    },
    /// Every process whose command name (`/proc/<pid>/comm`) is one of these.
    Named {
        /// The name shown in the report.
        name: &'static str,
        /// Command names, such as `beam.smp`.
        commands: &'static [&'static str],
    },
}

impl Group {
    fn name(&self) -> &'static str {
        match self {
            Self::Tree { name, .. } | Self::Named { name, .. } => name,
        }
    }
}

/// The services every workload uses, by the command names of their processes.
pub fn services() -> Vec<Group> {
    vec![
        Group::Named {
            name: "rabbitmq",
            commands: &["beam.smp"],
        },
        Group::Named {
            name: "redis",
            commands: &["redis-server"],
        },
        Group::Named {
            name: "postgresql",
            commands: &["postgres"],
        },
    ]
}

/// One process as `/proc/<pid>/stat` shows it.
struct Process {
    parent: u32,
    command: String,
    /// User and system time, in clock ticks.
    ticks: u64,
}

fn processes() -> HashMap<u32, Process> {
    let mut found = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name is in parentheses and may itself hold spaces or parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let command = stat[open + 1..close].to_owned();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // After the name: state (0), ppid (1), ... utime (11), stime (12).
        let number = |index: usize| fields.get(index).and_then(|f| f.parse::<u64>().ok());
        let (Some(parent), Some(user), Some(system)) = (number(1), number(11), number(12)) else {
            continue;
        };
        found.insert(
            pid,
            Process {
                parent: u32::try_from(parent).unwrap_or_default(),
                command,
                ticks: user + system,
            },
        );
    }
    found
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`), 100 where it cannot be read.
fn ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// The CPU time of each group at one moment.
#[derive(Debug, Clone, Default)]
pub struct Sample(BTreeMap<&'static str, Duration>);

/// Reads the CPU time used so far by each group.
pub fn sample(groups: &[Group]) -> Sample {
    let all = processes();
    let per_second = ticks_per_second();
    let mut sample = BTreeMap::new();
    for group in groups {
        let ticks: u64 = match group {
            Group::Tree { pids, .. } => all
                .iter()
                .filter(|(pid, _)| descends_from(**pid, pids, &all))
                .map(|(_, process)| process.ticks)
                .sum(),
            Group::Named { commands, .. } => all
                .values()
                .filter(|process| commands.contains(&process.command.as_str()))
                .map(|process| process.ticks)
                .sum(),
        };
        *sample.entry(group.name()).or_default() +=
            Duration::from_secs_f64(ticks as f64 / per_second);
    }
    Sample(sample)
}

fn descends_from(pid: u32, roots: &[u32], all: &HashMap<u32, Process>) -> bool {
    let mut current = pid;
    // Bounded: a process table read while it changes could hold a loop.
    for _ in 0..64 {
        if roots.contains(&current) {
            return true;
        }
        match all.get(&current) {
            Some(process) if process.parent != 0 && process.parent != current => {
                current = process.parent;
            }
            _ => return false,
        }
    }
    false
}

impl Sample {
    /// Returns the CPU time each group used between `earlier` and this sample.
    pub fn since(&self, earlier: &Self) -> Sample {
        Sample(
            self.0
                .iter()
                .map(|(name, total)| {
                    let before = earlier.0.get(name).copied().unwrap_or_default();
                    (*name, total.saturating_sub(before))
                })
                .collect(),
        )
    }

    /// Returns each group's name and its CPU time divided by `tasks`.
    pub fn per_task(&self, tasks: usize) -> Vec<(&'static str, Duration)> {
        let tasks = u32::try_from(tasks.max(1)).unwrap_or(u32::MAX);
        self.0
            .iter()
            .map(|(name, total)| (*name, *total / tasks))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_uses_cpu_time_that_is_read() {
        let me = [Group::Tree {
            name: "me",
            pids: vec![std::process::id()],
        }];
        let before = sample(&me);
        let started = std::time::Instant::now();
        let mut spin = 0_u64;
        while started.elapsed() < Duration::from_millis(200) {
            spin = spin.wrapping_add(1);
        }
        assert!(spin > 0);
        let used = sample(&me).since(&before);
        let (_, per_task) = used.per_task(1)[0];
        assert!(per_task >= Duration::from_millis(100), "{per_task:?}");
    }
}
