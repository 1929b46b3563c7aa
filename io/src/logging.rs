//! The log subscriber every taskfleet process installs: `RUST_LOG` filters (default `info`),
//! and lines are written as text or, with `--log-format json`, as one JSON object per line that
//! carries the fields of the span it was logged in and of that span's parents (a task's
//! `trace_id`, `run_id` and `task_id`, a request's `trace_id` and `route`).

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, coloured on a terminal.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, the event's fields
    /// (`message` among them), `span` (the innermost span's fields) and `spans` (every open
    /// span's, outermost first).
    Json,
}

/// The logging settings the scheduler and the worker share.
#[derive(Debug, Clone, clap::Args)]
pub struct LogSettings {
    /// How log lines are written: `text`, or `json` for one object per line with the fields
    /// of the spans it was logged in.
    #[arg(long, value_enum, env = "TASKFLEET_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

/// Installs the process's log subscriber, writing to standard output in `format`.
pub fn install(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder
            // Colours only on a terminal, not in files or the journal.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}
