//! Each request's W3C trace, its span and its line in the access log.
//!
//! [`observe_request`] reads a request's `traceparent` header (or starts a new trace when it
//! has none, or one that does not read: the specification's rule, never an error), hands the
//! trace to handlers as a [`RequestTrace`] extension, runs the request in a span that carries
//! its `trace_id`, then writes the access log line, counts the request in the metrics and
//! exports its span (when spans are exported). A run submitted keeps its request's trace id,
//! and its own span is a child of the request's.

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use serde::Deserialize;
use taskfleet_common::TraceId;
use taskfleet_common::trace::{SpanId, TraceParent};
use taskfleet_io::spans;
use tracing::Instrument as _;
use utoipa::IntoParams;

/// The target of the access log's lines.
pub const ACCESS_LOG: &str = "taskfleet_scheduler::access";

/// The W3C trace of one request.
#[derive(Debug, Clone, Copy)]
pub struct RequestTrace {
    /// The request's trace: its `traceparent`'s, or a new one.
    pub trace_id: TraceId,
    /// The caller's `traceparent`, when it sent one that reads.
    pub parent: Option<TraceParent>,
    /// The request's own span, when its trace's spans are exported.
    pub span_id: Option<SpanId>,
}

impl RequestTrace {
    /// Returns the trace of a request with these headers: the one `traceparent` header's when
    /// it reads, else a new trace. Several `traceparent` headers are as good as none.
    pub fn of(headers: &axum::http::HeaderMap) -> Self {
        let mut values = headers.get_all("traceparent").iter();
        let parent = match (values.next(), values.next()) {
            (Some(value), None) => value.to_str().ok().and_then(TraceParent::parse),
            _ => None,
        };
        let trace_id = parent.map_or_else(TraceId::random, |parent| parent.trace_id);
        Self {
            trace_id,
            parent,
            span_id: spans::sampled(trace_id).then(SpanId::random),
        }
    }
}

/// The `traceparent` header of the requests that start runs, as the OpenAPI document shows it.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(
    dead_code,
    reason = "only described in the OpenAPI document; read by RequestTrace"
)]
pub struct TraceHeader {
    /// A W3C Trace Context `traceparent` (`00-{trace id}-{parent id}-{flags}`, lowercase hex):
    /// the run joins its trace. Without one, or with one that does not read, the run starts a
    /// new trace (as the specification asks: such a header is ignored, never refused). The
    /// run's view shows its `trace_id`.
    #[param(value_type = String, required = false)]
    traceparent: Option<String>,
}

/// Finds a request's trace, runs it in a span that carries the trace id, then logs it to the
/// access log and counts it and its time in the metrics, by its route's template
/// (`/v1/runs/{id}`, not the path; `unmatched` for a path no route has).
pub async fn observe_request(
    route: Option<MatchedPath>,
    mut request: Request,
    next: Next,
) -> Response {
    let started = std::time::Instant::now();
    let start = std::time::SystemTime::now();
    let trace = RequestTrace::of(request.headers());
    request.extensions_mut().insert(trace);
    let method = request.method().clone();
    let route = route.as_ref().map_or("unmatched", |route| route.as_str());
    let span = tracing::info_span!("request", trace_id = %trace.trace_id, %method, route);
    let response = next.run(request).instrument(span).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    crate::metrics::http_request(route, status, elapsed.as_secs_f64());
    tracing::info!(
        target: ACCESS_LOG,
        %method,
        route,
        status,
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        trace_id = %trace.trace_id,
        "request"
    );
    // Probes and scrapes are not traced.
    if let Some(span_id) = trace.span_id
        && !matches!(route, "/healthz" | "/readyz" | "/metrics")
    {
        export_span(&trace, span_id, &method, route, status, start, elapsed);
    }
    response
}

/// Exports the span of a request that answered `status` after `elapsed`.
fn export_span(
    trace: &RequestTrace,
    span_id: SpanId,
    method: &axum::http::Method,
    route: &str,
    status: u16,
    start: std::time::SystemTime,
    elapsed: std::time::Duration,
) {
    use axum::http::Method;
    // A method of the caller's own invention is not repeated (the semantic conventions' rule).
    let method = match *method {
        Method::GET
        | Method::POST
        | Method::PUT
        | Method::DELETE
        | Method::PATCH
        | Method::HEAD
        | Method::OPTIONS => method.as_str(),
        _ => "_OTHER",
    };
    spans::export(spans::Span {
        name: format!("{method} {route}").into(),
        kind: spans::Kind::Server,
        trace_id: trace.trace_id,
        span_id,
        parent: trace.parent.map(|parent| (parent.parent_id, true)),
        start,
        end: start + elapsed,
        attributes: vec![
            spans::KeyValue::new("http.request.method", method.to_owned()),
            spans::KeyValue::new("http.route", route.to_owned()),
            spans::KeyValue::new("http.response.status_code", i64::from(status)),
        ],
        error: (status >= 500).then(|| format!("answered {status}")),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(values: &[&str], expected: Option<&str>) {
        let mut headers = axum::http::HeaderMap::new();
        for value in values {
            headers.append("traceparent", value.parse().expect("a header value"));
        }
        let trace = RequestTrace::of(&headers);
        match expected {
            Some(trace_id) => assert_eq!(trace.trace_id.to_string(), trace_id, "{values:?}"),
            None => assert!(trace.parent.is_none(), "{values:?}"),
        }
    }

    #[test]
    fn a_request_joins_the_trace_of_its_one_valid_traceparent() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        check(&[header], Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        check(&[], None);
        check(
            &["00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"],
            None,
        );
        check(&[header, header], None);
    }
}
