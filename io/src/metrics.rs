//! Prometheus metrics: the one recorder a process installs (the `metrics` facade, rendered in
//! Prometheus's text format by metrics-exporter-prometheus, which is what `promtool check
//! metrics` reads), and its exposition on a scrape. What each process measures, and the names,
//! are the scheduler's and the worker's own. Until a process installs its recorder, every
//! `metrics` call is a no-op: a worker without `TASKFLEET_METRICS_ADDR` measures nothing.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The buckets of every duration histogram, in seconds: 1 ms to 10 minutes.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// Renders what the process's recorder holds.
#[derive(Clone)]
pub struct Exposition(PrometheusHandle);

impl Exposition {
    /// Returns the exposition of every metric, in Prometheus's text format.
    pub fn render(&self) -> String {
        self.0.run_upkeep();
        self.0.render()
    }
}

/// Installs the process's recorder, with `histograms` (names) rendered as Prometheus histograms
/// over [`SECONDS_BUCKETS`]. Fails if a recorder is installed already.
pub fn install(histograms: &[&str]) -> Result<Exposition, String> {
    let mut builder = PrometheusBuilder::new();
    for name in histograms {
        builder = builder
            .set_buckets_for_metric(Matcher::Full((*name).to_owned()), SECONDS_BUCKETS)
            .map_err(|error| format!("the buckets of {name}: {error}"))?;
    }
    builder
        .install_recorder()
        .map(Exposition)
        .map_err(|error| format!("installing the metrics recorder: {error}"))
}

/// Whether a process keeps metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    /// Kept and served.
    On,
    /// Not kept: every count is a no-op.
    Off,
}
