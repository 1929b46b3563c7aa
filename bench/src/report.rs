//! The benchmark's tables: one row per figure with taskfleet's median, Celery's and their ratio
//! (how many times better taskfleet is), and the CPU time per task of each process.

use std::fmt::Write as _;
use std::time::Duration;

/// Returns the median of `values` (the mean of the middle two for an even count).
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

/// Whether more of a figure is better (a rate) or worse (a time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Better {
    Higher,
    Lower,
}

/// One figure of the table.
#[derive(Debug, Clone)]
pub struct Row {
    what: String,
    taskfleet: f64,
    celery: Option<f64>,
    unit: &'static str,
    better: Better,
}

impl Row {
    /// A rate: higher is better.
    pub fn rate(what: String, taskfleet: f64, celery: Option<f64>, unit: &'static str) -> Self {
        Self {
            what,
            taskfleet,
            celery,
            unit,
            better: Better::Higher,
        }
    }

    /// A time: lower is better.
    pub fn time(what: String, taskfleet: f64, celery: Option<f64>, unit: &'static str) -> Self {
        Self {
            what,
            taskfleet,
            celery,
            unit,
            better: Better::Lower,
        }
    }

    /// A figure of taskfleet's own, with no Celery counterpart.
    pub fn alone(what: String, taskfleet: f64, unit: &'static str) -> Self {
        Self::time(what, taskfleet, None, unit)
    }

    /// How many times better taskfleet is than Celery.
    fn ratio(&self) -> Option<f64> {
        let celery = self.celery?;
        let ratio = match self.better {
            Better::Higher => self.taskfleet / celery,
            Better::Lower => celery / self.taskfleet,
        };
        ratio.is_finite().then_some(ratio)
    }
}

fn number(value: f64, unit: &str) -> String {
    let digits = if value.abs() >= 100.0 {
        0
    } else if value.abs() >= 10.0 {
        1
    } else {
        2
    };
    format!("{value:.digits$} {unit}")
}

/// The rows of the main table.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Row>,
}

impl Table {
    /// Adds a row.
    pub fn push(&mut self, row: Row) {
        self.rows.push(row);
    }

    /// Renders the table as Markdown.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| workload | taskfleet | Celery | taskfleet vs Celery |"
        );
        let _ = writeln!(out, "| --- | ---: | ---: | ---: |");
        for row in &self.rows {
            let celery = row
                .celery
                .map_or("—".to_owned(), |celery| number(celery, row.unit));
            let ratio = row.ratio().map_or("—".to_owned(), |ratio| {
                if ratio >= 1.0 {
                    format!("{ratio:.1}× better")
                } else {
                    format!("{:.1}× worse", 1.0 / ratio)
                }
            });
            let _ = writeln!(
                out,
                "| {} | {} | {celery} | {ratio} |",
                row.what,
                number(row.taskfleet, row.unit)
            );
        }
        out
    }
}

/// The median per-task CPU time of each process over the rounds of one workload.
pub fn median_cpu(rounds: &[Vec<(&'static str, Duration)>]) -> Vec<(&'static str, f64)> {
    let Some(first) = rounds.first() else {
        return Vec::new();
    };
    first
        .iter()
        .map(|(name, _)| {
            let mut values: Vec<f64> = rounds
                .iter()
                .filter_map(|round| round.iter().find(|(n, _)| n == name))
                .map(|(_, per_task)| per_task.as_secs_f64() * 1e6)
                .collect();
            (*name, median(&mut values))
        })
        .collect()
}

/// Renders the CPU table: µs of CPU per task of each process, for each throughput workload, and
/// Celery's worker processes for its drain.
pub fn render_cpu(rows: &[(&str, Vec<(&'static str, f64)>)], celery_worker: Option<f64>) -> String {
    let mut out = String::new();
    let Some((_, first)) = rows.first() else {
        return out;
    };
    let names: Vec<&str> = first.iter().map(|(name, _)| *name).collect();
    let _ = writeln!(
        out,
        "| CPU per task (µs), throughput workloads | {} | all |",
        names.join(" | ")
    );
    let _ = writeln!(out, "|---{}|---:|", "|---:".repeat(names.len()));
    for (label, cpu) in rows {
        let total: f64 = cpu.iter().map(|(_, us)| us).sum();
        let cells: Vec<String> = cpu.iter().map(|(_, us)| format!("{us:.1}")).collect();
        let _ = writeln!(
            out,
            "| taskfleet, no-op {label} jobs | {} | {total:.1} |",
            cells.join(" | ")
        );
    }
    if let Some(worker) = celery_worker {
        let cells: Vec<String> = names
            .iter()
            .map(|name| match *name {
                "workers" => format!("{worker:.1}"),
                _ => "—".to_owned(),
            })
            .collect();
        let _ = writeln!(
            out,
            "| Celery drain (its worker processes only) | {} | {worker:.1} |",
            cells.join(" | ")
        );
    }
    out
}

/// A line about this machine: cores and the services' versions where they can be read.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|line| line.starts_with("MemTotal:"))?;
            let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!(", {:.0} GiB", kib / 1024.0 / 1024.0))
        })
        .unwrap_or_default();
    format!("{cores} cores{memory}, everything on this one machine")
}

/// The soak of the retention workload: the tables after each wave.
pub fn render_soak(waves: &[crate::retention::Wave]) -> String {
    let mib = |bytes: i64| bytes as f64 / (1024.0 * 1024.0);
    let mut out = String::from(
        "Retention soak (5 s retention): the tables 6 s after each wave\n\n\
         | runs submitted | rows in runs | rows in tasks | runs (MiB) | tasks (MiB) |\n\
         | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for wave in waves {
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} |\n",
            wave.submitted,
            wave.rows.0,
            wave.rows.1,
            mib(wave.bytes.0),
            mib(wave.bytes.1)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn ratios_say_how_many_times_better() {
        let rate = Row::rate("r".to_owned(), 10_000.0, Some(1_000.0), "jobs/s");
        assert_eq!(rate.ratio(), Some(10.0));
        let time = Row::time("t".to_owned(), 2.0, Some(5.0), "ms");
        assert_eq!(time.ratio(), Some(2.5));
        assert_eq!(Row::alone("a".to_owned(), 1.0, "µs").ratio(), None);
    }
}
