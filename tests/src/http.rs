//! The fleet's API as tests use it: requests, submissions and waits for runs to finish.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::*;

impl TestFleet {
    /// Sends a request with an optional JSON body and returns the status and JSON answer.
    pub async fn request(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.http.request(method, format!("{}{path}", self.api));
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        self.send(request).await
    }

    /// Sends a request with a raw body.
    pub async fn request_raw(&self, method: &str, path: &str, body: Vec<u8>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let request = self
            .http
            .request(method, format!("{}{path}", self.api))
            .header("content-type", "application/json")
            .body(body);
        self.send(request).await
    }

    /// Sends a request with `authorization` as its whole `Authorization` header (none when
    /// `None`) instead of the fleet's admin key, to the API at `api`.
    pub async fn request_with_credentials(
        &self,
        api: &str,
        authorization: Option<&[u8]>,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let client = http_client()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap();
        let mut request = client.request(method, format!("{api}{path}"));
        if let Some(authorization) = authorization {
            request = request.header(
                reqwest::header::AUTHORIZATION,
                reqwest::header::HeaderValue::from_bytes(authorization).unwrap(),
            );
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        self.send(request).await
    }

    /// Sends a request as the holder of `key` to this fleet's API.
    pub async fn request_as(
        &self,
        key: &str,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let authorization = format!("Bearer {key}");
        self.request_with_credentials(
            &self.api,
            Some(authorization.as_bytes()),
            method,
            path,
            body,
        )
        .await
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        let response = request.send().await.expect("the scheduler answers");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    /// Starts a run of an inline definition and returns its id.
    pub async fn submit(&self, definition: &Value, input: &Value) -> String {
        let (status, body) = self
            .request(
                "POST",
                "/v1/runs",
                Some(&json!({"definition": definition, "input": input})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }

    /// Waits (long-polling) until the run finishes and returns it.
    pub async fn wait_run(&self, id: &str, within: Duration) -> Value {
        self.wait_path(&format!("/v1/runs/{id}"), within).await
    }

    /// Waits until the job finishes and returns it.
    pub async fn wait_job(&self, id: &str, within: Duration) -> Value {
        self.wait_path(&format!("/v1/tasks/{id}"), within).await
    }

    async fn wait_path(&self, path: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = left.as_secs_f64().min(10.0);
            let (status, body) = self
                .request("GET", &format!("{path}?wait={wait}"), None)
                .await;
            assert_eq!(status, 200, "{body}");
            let finished = matches!(
                body["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            );
            if finished {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "{path} did not finish within {within:?}: {body:#}"
            );
        }
    }

    /// Runs an inline definition to its end and returns the run.
    pub async fn run(&self, definition: &Value, input: &Value) -> Value {
        let id = self.submit(definition, input).await;
        self.wait_run(&id, Duration::from_secs(60)).await
    }
}

impl TestFleet {
    /// Returns the scheduler's `/metrics` exposition.
    pub async fn metrics_text(&self) -> String {
        let url = format!("{}/metrics", self.api);
        let response = self.http.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200, "{url}");
        response.text().await.unwrap()
    }

    /// Declares the fleet's queue `queue` (named without its namespace) on `channel`, durable
    /// and with the arguments the fleet declares it with, so that what is published to it is
    /// kept even if no process of the fleet declared it yet; returns its full name.
    pub async fn declare_queue(&self, channel: &lapin::Channel, queue: &str) -> String {
        let name = format!("{}.{queue}", self.namespace);
        let mut arguments = lapin::types::FieldTable::default();
        if queue.starts_with("tasks.") {
            arguments.insert(
                "x-max-priority".into(),
                lapin::types::AMQPValue::ShortShortUInt(9),
            );
        }
        channel
            .queue_declare(
                name.as_str().into(),
                lapin::options::QueueDeclareOptions::durable(),
                arguments,
            )
            .await
            .unwrap();
        name
    }
}
