//! The HTTP client of the scheduler's API: starting runs and reading runs and jobs, turning
//! every failure into an [`ApiError`] that names the request and the server's answer.
//!
//! It knows URLs and JSON shapes, not what commands do with them.

use std::fmt;
use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use serde_json::Value;

/// How long connecting to the scheduler may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request may take beyond any long-poll wait it asks for.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The most characters of a non-JSON error body quoted in a message.
const MAX_QUOTED_BODY: usize = 300;

/// A failed API call.
#[derive(Debug)]
pub enum ApiError {
    /// The API URL cannot be used.
    BadUrl {
        /// The URL as given.
        url: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The HTTP client could not be set up.
    Setup(reqwest::Error),
    /// The API key cannot be sent in a header.
    BadKey,
    /// The CA certificate file cannot be used.
    BadCa {
        /// The file, as given.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The request got no answer: connection refused, timed out, reset.
    Unreachable {
        /// The request's method and URL, such as `GET http://127.0.0.1:8080/v1/runs/…`.
        request: String,
        /// Why it failed.
        source: reqwest::Error,
    },
    /// The server answered with an error status.
    Status {
        /// The request's method and URL, such as `GET http://127.0.0.1:8080/v1/runs/…`.
        request: String,
        /// The answer's status.
        status: StatusCode,
        /// The API's error code, when the body was the API's error JSON.
        code: Option<String>,
        /// The API's error message, or the start of a body that was not the API's error JSON.
        message: String,
        /// The API's error details, if any.
        details: Option<Value>,
    },
    /// The server answered success with a body this client does not understand.
    BadResponse {
        /// The request's method and URL, such as `GET http://127.0.0.1:8080/v1/runs/…`.
        request: String,
        /// What is wrong with the body.
        reason: String,
    },
}

impl fmt::Display for ApiError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadUrl { url, reason } => write!(formatter, "API URL {url:?} {reason}"),
            Self::Setup(error) => write!(formatter, "setting up the HTTP client: {error}"),
            Self::BadCa { path, reason } => {
                write!(formatter, "CA certificate (--ca-cert or TASKFLEET_CA_CERT) {path}: {reason}")
            }
            Self::BadKey => formatter.write_str(
                "the API key (--api-key or TASKFLEET_API_KEY) holds characters a header cannot carry",
            ),
            Self::Unreachable { request, source } => write!(
                formatter,
                "{request}: cannot reach the scheduler: {}",
                cause_chain(source)
            ),
            Self::Status {
                request,
                status,
                code,
                message,
                details,
            } => {
                write!(formatter, "{request}: {status}: ")?;
                if let Some(code) = code {
                    write!(formatter, "{code}: ")?;
                }
                formatter.write_str(message)?;
                if let Some(details) = details {
                    write!(formatter, "\ndetails: {details}")?;
                }
                Ok(())
            }
            Self::BadResponse { request, reason } => {
                write!(formatter, "{request}: unexpected answer: {reason}")
            }
        }
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    /// Returns whether the server answered 401 Unauthorized.
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, Self::Status { status, .. } if *status == StatusCode::UNAUTHORIZED)
    }

    /// Returns whether the server answered 404 Not Found.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Status { status, .. } if *status == StatusCode::NOT_FOUND)
    }
}

/// Returns the innermost messages of an error's chain, joined: reqwest's outer message only
/// repeats the URL, while the causes say what went wrong ("Connection refused").
fn cause_chain(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return "timed out".to_owned();
    }
    let mut messages = Vec::new();
    let mut cause = std::error::Error::source(error);
    while let Some(current) = cause {
        messages.push(current.to_string());
        cause = current.source();
    }
    if messages.is_empty() {
        error.to_string()
    } else {
        messages.join(": ")
    }
}

/// Whether an id names a workflow run or a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A workflow run, under `/v1/runs`.
    Run,
    /// A job, under `/v1/tasks`.
    Job,
}

impl Kind {
    /// Returns the kind a `--job` flag selects.
    pub fn from_job_flag(job: bool) -> Self {
        if job { Self::Job } else { Self::Run }
    }

    /// Returns the API collection holding this kind.
    fn collection(self) -> &'static str {
        match self {
            Self::Run => "runs",
            Self::Job => "tasks",
        }
    }

    /// Returns the word users know this kind by.
    pub fn noun(self) -> &'static str {
        match self {
            Self::Run => "run",
            Self::Job => "job",
        }
    }
}

/// The answer to `POST /v1/runs` and `POST /v1/tasks`.
#[derive(Debug, Clone, Deserialize)]
pub struct Accepted {
    /// The run's (or job's) id.
    pub id: String,
    /// Its status when it was accepted.
    pub status: String,
}

/// The API's error body, `{"error": {"code", "message", "details"?}}`.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
    #[serde(default)]
    details: Option<Value>,
}

/// A client of one scheduler's API.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
}

impl Client {
    /// Returns a client of the API at `api_url` (a base URL such as `http://127.0.0.1:8080`)
    /// that sends `api_key`, if any, with every request, and trusts the CA certificates in the
    /// PEM file `ca_cert`, if any, besides the system's.
    pub fn new(
        api_url: &str,
        api_key: Option<&str>,
        ca_cert: Option<&std::path::Path>,
    ) -> Result<Self, ApiError> {
        let base = parse_base_url(api_url)?;
        // The one TLS stack: rustls with ring. Installing it again does nothing.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(api_key) = api_key {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {api_key}"))
                .map_err(|_| ApiError::BadKey)?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let mut builder = reqwest::Client::builder();
        if let Some(path) = ca_cert {
            builder = builder.tls_certs_merge(read_ca(path)?);
        }
        let http = builder
            .default_headers(headers)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("taskfleet-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ApiError::Setup)?;
        Ok(Self { http, base })
    }

    /// Starts a run with `POST /v1/runs`, or a job with `POST /v1/tasks`.
    pub async fn create(&self, kind: Kind, body: &Value) -> Result<Accepted, ApiError> {
        let url = self.url(&["v1", kind.collection()]);
        let request = self
            .http
            .post(url.clone())
            .json(body)
            .timeout(REQUEST_TIMEOUT);
        let value = self.send(Method::POST, &url, request).await?;
        serde_json::from_value(value).map_err(|error| ApiError::BadResponse {
            request: request_line(&Method::POST, &url),
            reason: error.to_string(),
        })
    }

    /// Registers a definition with `PUT /v1/workflows/{name}`; returns the answer and whether
    /// it made a new version (201) rather than finding the definition unchanged (200).
    pub async fn register(
        &self,
        name: &str,
        definition: &Value,
    ) -> Result<(Value, bool), ApiError> {
        let url = self.url(&["v1", "workflows", name]);
        let request = self
            .http
            .put(url.clone())
            .json(definition)
            .timeout(REQUEST_TIMEOUT);
        let (status, value) = self.exchange(Method::PUT, &url, request).await?;
        Ok((value, status == StatusCode::CREATED))
    }

    /// Returns a run or job, checked to have a `status`; with `wait`, the server holds the
    /// answer up to that long for it to finish (it may cap the wait lower).
    pub async fn show(
        &self,
        kind: Kind,
        id: &str,
        wait: Option<Duration>,
    ) -> Result<Value, ApiError> {
        let mut url = self.url(&["v1", kind.collection(), id]);
        if let Some(wait) = wait {
            url.query_pairs_mut()
                .append_pair("wait", &wait_parameter(wait));
        }
        let request = self
            .http
            .get(url.clone())
            .timeout(REQUEST_TIMEOUT + wait.unwrap_or_default());
        let value = self.send(Method::GET, &url, request).await?;
        if value.get("status").and_then(Value::as_str).is_none() {
            return Err(ApiError::BadResponse {
                request: request_line(&Method::GET, &url),
                reason: "the answer has no \"status\"".to_owned(),
            });
        }
        Ok(value)
    }

    /// Sends `body` with `POST` to the API path made of `segments` and returns the answer.
    pub async fn post(&self, segments: &[&str], body: &Value) -> Result<Value, ApiError> {
        let url = self.url(segments);
        let request = self
            .http
            .post(url.clone())
            .json(body)
            .timeout(REQUEST_TIMEOUT);
        self.send(Method::POST, &url, request).await
    }

    /// Sends `body` with `PUT` to the API path made of `segments` and returns the answer.
    pub async fn put(&self, segments: &[&str], body: &Value) -> Result<Value, ApiError> {
        let url = self.url(segments);
        let request = self
            .http
            .put(url.clone())
            .json(body)
            .timeout(REQUEST_TIMEOUT);
        self.send(Method::PUT, &url, request).await
    }

    /// Sends `DELETE` to the API path made of `segments` and returns the answer.
    pub async fn delete(&self, segments: &[&str]) -> Result<Value, ApiError> {
        let url = self.url(segments);
        let request = self.http.delete(url.clone()).timeout(REQUEST_TIMEOUT);
        self.send(Method::DELETE, &url, request).await
    }

    /// Acts on a run or job with `POST /v1/{runs|tasks}/{id}/{action}` (`cancel`, `retry`).
    pub async fn act(&self, kind: Kind, id: &str, action: &str) -> Result<Value, ApiError> {
        let url = self.url(&["v1", kind.collection(), id, action]);
        let request = self.http.post(url.clone()).timeout(REQUEST_TIMEOUT);
        self.send(Method::POST, &url, request).await
    }

    /// Returns the answer of a `GET` of the API path made of `segments`.
    pub async fn get(&self, segments: &[&str]) -> Result<Value, ApiError> {
        let url = self.url(segments);
        let request = self.http.get(url.clone()).timeout(REQUEST_TIMEOUT);
        self.send(Method::GET, &url, request).await
    }

    /// Returns the answer of a `GET` of the API path made of `segments`, with the query pairs
    /// of `query` whose value is given.
    pub async fn get_with_query(
        &self,
        segments: &[&str],
        query: &[(&str, Option<String>)],
    ) -> Result<Value, ApiError> {
        let mut url = self.url(segments);
        for (key, value) in query {
            if let Some(value) = value {
                url.query_pairs_mut().append_pair(key, value);
            }
        }
        let request = self.http.get(url.clone()).timeout(REQUEST_TIMEOUT);
        self.send(Method::GET, &url, request).await
    }

    /// Returns `GET /v1/workflows`, or `GET /v1/workflows/{name}[?version=N]` for one.
    pub async fn workflows(
        &self,
        name: Option<&str>,
        version: Option<u32>,
    ) -> Result<Value, ApiError> {
        let mut url = match name {
            Some(name) => self.url(&["v1", "workflows", name]),
            None => self.url(&["v1", "workflows"]),
        };
        if let Some(version) = version {
            url.query_pairs_mut()
                .append_pair("version", &version.to_string());
        }
        let request = self.http.get(url.clone()).timeout(REQUEST_TIMEOUT);
        self.send(Method::GET, &url, request).await
    }

    /// Returns the URL of the API path made of `segments`, each percent-encoded.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// Sends `request` and returns its JSON body, or the error it was answered with.
    async fn send(
        &self,
        method: Method,
        url: &Url,
        request: reqwest::RequestBuilder,
    ) -> Result<Value, ApiError> {
        Ok(self.exchange(method, url, request).await?.1)
    }

    /// Sends `request` and returns its success status and JSON body, or the error it was
    /// answered with.
    async fn exchange(
        &self,
        method: Method,
        url: &Url,
        request: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, Value), ApiError> {
        let unreachable = |source| ApiError::Unreachable {
            request: request_line(&method, url),
            source,
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(unreachable)?;
        if !status.is_success() {
            let (code, message, details) = error_parts(&bytes);
            return Err(ApiError::Status {
                request: request_line(&method, url),
                status,
                code,
                message,
                details,
            });
        }
        let value = serde_json::from_slice(&bytes).map_err(|error| ApiError::BadResponse {
            request: request_line(&method, url),
            reason: format!("the body is not JSON: {error}"),
        })?;
        Ok((status, value))
    }
}

/// Returns the certificates of a PEM file of CA certificates.
fn read_ca(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, ApiError> {
    let bad = |reason: String| ApiError::BadCa {
        path: path.display().to_string(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|error| bad(format!("cannot be read: {error}")))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|error| bad(format!("is not PEM: {error}")))?;
    if certs.is_empty() {
        return Err(bad(
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_owned(),
        ));
    }
    Ok(certs)
}

/// Returns how errors name a request: its method and URL.
fn request_line(method: &Method, url: &Url) -> String {
    format!("{method} {url}")
}

/// Returns `api_url` parsed, checked to be an `http` or `https` base URL.
fn parse_base_url(api_url: &str) -> Result<Url, ApiError> {
    let bad = |reason: String| ApiError::BadUrl {
        url: api_url.to_owned(),
        reason,
    };
    let not_http = || {
        bad(format!(
            "is not an http:// or https:// URL (try \"http://{api_url}\")"
        ))
    };
    if !api_url.contains("://") {
        return Err(not_http());
    }
    let url = Url::parse(api_url).map_err(|error| bad(format!("is not a URL: {error}")))?;
    match url.scheme() {
        "http" | "https" if !url.cannot_be_a_base() => Ok(url),
        _ => Err(not_http()),
    }
}

/// Returns a wait as the API's `?wait=` value: whole seconds when it is whole.
fn wait_parameter(wait: Duration) -> String {
    if wait.subsec_nanos() == 0 {
        wait.as_secs().to_string()
    } else {
        format!("{:.3}", wait.as_secs_f64())
    }
}

/// Returns the code, message and details of an error body: the API's error JSON, or else the
/// start of whatever the body holds (a proxy's page, say).
fn error_parts(bytes: &[u8]) -> (Option<String>, String, Option<Value>) {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(body) => (
            Some(body.error.code),
            body.error.message,
            body.error.details,
        ),
        Err(_) => {
            let text = String::from_utf8_lossy(bytes);
            let text = text.trim();
            let quoted: String = text.chars().take(MAX_QUOTED_BODY).collect();
            let message = if text.is_empty() {
                "(empty body)".to_owned()
            } else if quoted.len() < text.len() {
                format!("{quoted}…")
            } else {
                quoted
            };
            (None, message, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn check_url(api_url: &str, kind: Kind, id: &str, expected: &str) {
        let client = Client::new(api_url, None, None).expect("the test URL is valid");
        assert_eq!(
            client.url(&["v1", kind.collection(), id]).as_str(),
            expected
        );
    }

    #[test]
    fn urls_are_built_under_the_base_and_escaped() {
        check_url("http://h:1", Kind::Run, "abc", "http://h:1/v1/runs/abc");
        check_url("http://h:1/", Kind::Job, "abc", "http://h:1/v1/tasks/abc");
        check_url(
            "http://h:1/fleet/",
            Kind::Run,
            "a",
            "http://h:1/fleet/v1/runs/a",
        );
        check_url(
            "http://h:1",
            Kind::Run,
            "../x?y",
            "http://h:1/v1/runs/..%2Fx%3Fy",
        );
    }

    #[test]
    fn waits_are_sent_in_seconds() {
        assert_eq!(wait_parameter(Duration::from_secs(30)), "30");
        assert_eq!(wait_parameter(Duration::from_millis(2500)), "2.500");
        assert_eq!(wait_parameter(Duration::ZERO), "0");
    }

    #[test]
    fn unusable_api_urls_are_refused() {
        assert!(Client::new("127.0.0.1:8080", None, None).is_err());
        assert!(Client::new("ftp://h/", None, None).is_err());
        assert!(Client::new("https://h/", None, None).is_ok());
        assert!(
            Client::new(
                "https://h/",
                None,
                Some(std::path::Path::new("/no/such/ca.pem"))
            )
            .is_err()
        );
        assert!(Client::new("http://h:1/", None, None).is_ok());
        assert!(Client::new("http://h:1/", Some("tfk_ok"), None).is_ok());
        assert!(Client::new("http://h:1/", Some("bad\nkey"), None).is_err());
        assert!(Client::new("", None, None).is_err());
    }

    #[test]
    fn error_bodies_are_read_from_the_api_shape_or_quoted() {
        let body = json!({"error": {"code": "not_found", "message": "no run"}}).to_string();
        assert_eq!(
            error_parts(body.as_bytes()),
            (Some("not_found".to_owned()), "no run".to_owned(), None)
        );
        assert_eq!(
            error_parts(b"  Bad Gateway\n"),
            (None, "Bad Gateway".to_owned(), None)
        );
        assert_eq!(error_parts(b""), (None, "(empty body)".to_owned(), None));
    }
}
