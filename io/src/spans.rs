//! Spans exported over OTLP/HTTP (protobuf) when an endpoint is configured
//! (`OTEL_EXPORTER_OTLP_ENDPOINT`, or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` for traces alone).
//!
//! A span is recorded whole, once it has ended, with ids its caller chose: a run's span is a
//! child of the request that started it and the parent of its steps' attempts, though these are
//! ended by different processes at different times, so ids and times are given rather than
//! taken from a live span. The OpenTelemetry SDK's batch processor queues, batches and sends
//! them from a thread of its own (`OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BSP_MAX_QUEUE_SIZE` and
//! `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` tune it; a full queue drops spans, never waits), and its
//! sampler (`OTEL_TRACES_SAMPLER`) decides by trace id alone, so every process of the fleet
//! keeps or drops the same traces. The SDK's own warnings (a collector that refuses spans, a
//! full queue) are logged. Without an endpoint nothing is installed, and [`sampled`] answers
//! false at once.

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{SpanContext, SpanKind, Status, TraceFlags, TraceState};
use opentelemetry::{InstrumentationScope, trace as otel};
pub use opentelemetry::{KeyValue, Value};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, SamplingDecision, ShouldSample, SpanData, SpanEvents, SpanLinks,
    SpanProcessor as _,
};
use taskfleet_common::trace::{SpanId, TraceId};

/// How long a process waits at its end for the spans it queued to be sent.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Where spans go, shared by the scheduler and the worker.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SpanSettings {
    /// The OTLP/HTTP collector spans are sent to (`http://collector:4318`; spans go to its
    /// `/v1/traces`). Unset: no span is exported. The exporter and the SDK also read their
    /// headers, timeout, sampler and batching variables (`docs/operations.md`).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_parser = endpoint)]
    pub otlp_endpoint: Option<String>,
    /// The full URL spans are posted to, in place of `{otlp_endpoint}/v1/traces`.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", value_parser = endpoint)]
    pub otlp_traces_endpoint: Option<String>,
}

impl SpanSettings {
    /// The URL spans are posted to, if any.
    fn traces_url(&self) -> Option<String> {
        self.otlp_traces_endpoint.clone().or_else(|| {
            let base = self.otlp_endpoint.as_deref()?;
            Some(format!("{}/v1/traces", base.trim_end_matches('/')))
        })
    }
}

/// Reads an endpoint: an `http` or `https` URL with a host.
fn endpoint(text: &str) -> Result<String, String> {
    let url = url::Url::parse(text).map_err(|error| format!("not a URL: {error}"))?;
    match (url.scheme(), url.host_str()) {
        ("http" | "https", Some(host)) if !host.is_empty() => Ok(text.to_owned()),
        _ => Err("an http:// or https:// URL with a host is needed".to_owned()),
    }
}

/// The process's exporter, once installed.
struct Exporter {
    processor: BatchSpanProcessor,
    sampler: Box<dyn ShouldSample>,
    scope: InstrumentationScope,
}

static EXPORTER: OnceLock<Exporter> = OnceLock::new();

/// Sends what is queued when the process ends; see [`Flush::finish`].
#[must_use = "spans still queued are lost unless the guard is finished"]
pub struct Flush(());

impl Flush {
    /// Sends the spans still queued (waiting at most a few seconds) and stops the exporter's
    /// thread. It blocks: call it off the async threads, or after the runtime ends.
    pub fn finish(self) {
        if let Some(exporter) = EXPORTER.get()
            && let Err(error) = exporter.processor.shutdown_with_timeout(FLUSH_TIMEOUT)
        {
            tracing::warn!(%error, "sending the last spans failed");
        }
    }
}

/// Describes why the exporter could not start.
#[derive(Debug, thiserror::Error)]
#[error("exporting spans over OTLP: {0}")]
pub struct SpanExportError(String);

/// Installs the process's span exporter when `settings` name an endpoint; `service` is the
/// `service.name` of its spans unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` set
/// one. Returns what flushes it at the end, or `None` when nothing is exported.
pub fn install(
    settings: &SpanSettings,
    service: &'static str,
) -> Result<Option<Flush>, SpanExportError> {
    let Some(url) = settings.traces_url() else {
        return Ok(None);
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .build()
        .map_err(|error| SpanExportError(error.to_string()))?;
    // The environment's resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`), named after
    // the program when it names no service.
    let mut resource = Resource::builder();
    let from_environment = Resource::builder().build();
    if from_environment
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_none_or(|name| name.as_str().starts_with("unknown_service"))
    {
        resource = resource.with_service_name(service);
    }
    let mut processor = BatchSpanProcessor::builder(exporter).build();
    processor.set_resource(&resource.build());
    let installed = Exporter {
        processor,
        sampler: opentelemetry_sdk::trace::Config::default().sampler,
        scope: InstrumentationScope::builder(service)
            .with_version(env!("CARGO_PKG_VERSION"))
            .build(),
    };
    EXPORTER
        .set(installed)
        .map_err(|_| SpanExportError("installed twice".to_owned()))?;
    Ok(Some(Flush(())))
}

/// Whether spans are exported: callers skip building them when not.
pub fn enabled() -> bool {
    EXPORTER.get().is_some()
}

/// The kind of a span, as OpenTelemetry names them.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// Serves a request.
    Server,
    /// Handles a message taken from a queue.
    Consumer,
    /// Work inside a process.
    Internal,
}

/// One ended span.
#[derive(Debug, Clone)]
pub struct Span {
    /// Its name (a low-cardinality one: a route template, not a path).
    pub name: Cow<'static, str>,
    /// Its kind.
    pub kind: Kind,
    /// Its trace.
    pub trace_id: TraceId,
    /// Its own id.
    pub span_id: SpanId,
    /// Its parent, and whether that parent is another process's.
    pub parent: Option<(SpanId, bool)>,
    /// When it started.
    pub start: SystemTime,
    /// When it ended.
    pub end: SystemTime,
    /// Its attributes.
    pub attributes: Vec<KeyValue>,
    /// Why it failed, if it did: a description that holds no payload (an error type, a status),
    /// for spans leave the process unencrypted.
    pub error: Option<String>,
}

/// Whether spans of trace `trace_id` are exported: spans are exported and the sampler keeps
/// the trace. Callers ask before building spans. The decision depends on the trace id alone (no
/// parent context is given to the sampler, so a `parentbased_*` sampler acts as its root
/// sampler), so that every process keeps or drops the same traces.
pub fn sampled(trace_id: TraceId) -> bool {
    EXPORTER.get().is_some_and(|exporter| {
        let sampling = exporter.sampler.should_sample(
            None,
            otel::TraceId::from_bytes(trace_id.to_bytes()),
            "",
            &SpanKind::Internal,
            &[],
            &[],
        );
        sampling.decision == SamplingDecision::RecordAndSample
    })
}

/// Queues `span` for export when spans are exported (its trace is taken as sampled: see
/// [`sampled`]). A full queue drops it.
pub fn export(span: Span) {
    let Some(exporter) = EXPORTER.get() else {
        return;
    };
    let trace_id = otel::TraceId::from_bytes(span.trace_id.to_bytes());
    let kind = match span.kind {
        Kind::Server => SpanKind::Server,
        Kind::Consumer => SpanKind::Consumer,
        Kind::Internal => SpanKind::Internal,
    };
    let (parent_span_id, parent_span_is_remote) = match span.parent {
        Some((parent, remote)) => (otel::SpanId::from_bytes(parent.to_bytes()), remote),
        None => (otel::SpanId::INVALID, false),
    };
    let status = match span.error {
        Some(message) => Status::error(message),
        None => Status::Unset,
    };
    exporter.processor.on_end(SpanData {
        span_context: SpanContext::new(
            trace_id,
            otel::SpanId::from_bytes(span.span_id.to_bytes()),
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        ),
        parent_span_id,
        parent_span_is_remote,
        span_kind: kind,
        name: span.name,
        start_time: span.start,
        end_time: span.end,
        attributes: span.attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status,
        instrumentation_scope: exporter.scope.clone(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_http_urls_with_a_host() {
        assert!(endpoint("http://collector:4318").is_ok());
        assert!(endpoint("https://collector.example/otlp").is_ok());
        for bad in [
            "collector:4318",
            "ftp://collector",
            "http://",
            "not a url",
            "",
        ] {
            assert!(endpoint(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_traces_url_is_the_endpoint_s_v1_traces_unless_given_whole() {
        let mut settings = SpanSettings {
            otlp_endpoint: Some("http://collector:4318/".to_owned()),
            otlp_traces_endpoint: None,
        };
        assert_eq!(
            settings.traces_url().as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        settings.otlp_traces_endpoint = Some("http://other:9/traces".to_owned());
        assert_eq!(
            settings.traces_url().as_deref(),
            Some("http://other:9/traces")
        );
        assert_eq!(SpanSettings::default().traces_url(), None);
    }
}
