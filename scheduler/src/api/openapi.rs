//! The API's OpenAPI 3.1 document (`GET /v1/openapi.json`), made from the handlers'
//! annotations and the types they read and answer: the router and the document are built from
//! the same list of handlers ([`super::routes`]), so no route goes undocumented.
//!
//! The errors every route can answer (a missing key, a missing scope, a malformed request, a
//! service down) are added here by rule rather than repeated on each handler; the errors
//! particular to a route (409, 422, 429, a missing workflow) are on its handler.

use std::sync::LazyLock;

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Header, OpenApi, Ref, RefOr};

use serde_json::{Value, json};

use super::ErrorBody;

/// The name of the security scheme: an API key sent as a bearer token.
const BEARER: &str = "bearer";

/// The document, made once.
static DOCUMENT: LazyLock<String> = LazyLock::new(|| document().to_string());

/// The base of the document: what no handler says.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "taskfleet",
        description = "Runs workflows of jq and Python steps on a fleet of workers. Every `/v1` \
            route needs an API key, sent as `Authorization: Bearer <key>`; what a key may do is \
            set by its scopes, and it reaches only its tenant's runs, jobs and workflows.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    components(schemas(ErrorBody)),
    tags(
        (name = "runs", description = "Runs of workflows"),
        (name = "jobs", description = "Single steps enqueued on their own"),
        (name = "workflows", description = "Registered workflow definitions"),
        (name = "schedules", description = "Runs started on a cron expression, in a time zone"),
        (name = "fleet", description = "Counts, workers and queues"),
        (name = "admin", description = "Keys, tenants' quotas, the audit trail and the dead letters (scope `admin`)"),
        (name = "health", description = "Liveness and readiness, without a key"),
    )
)]
struct Base;

/// Returns the API's OpenAPI document.
pub fn document() -> Value {
    let mut document = serde_json::to_value(build()).unwrap_or_else(|error| {
        tracing::error!(%error, "serializing the OpenAPI document");
        json!({})
    });
    add_links(&mut document);
    document
}

/// Returns the document as utoipa makes it, with what [`Base`] adds and the errors by rule.
fn build() -> OpenApi {
    let mut document = super::routes().merge(super::health_routes()).into_openapi();
    let base = <Base as utoipa::OpenApi>::openapi();
    document.info = base.info.clone();
    document.merge(base);
    document.openapi = utoipa::openapi::OpenApiVersion::Version31;
    let components = document.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        BEARER,
        SecurityScheme::Http(
            Http::builder()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("taskfleet API key (tfk_…)")
                .build(),
        ),
    );
    for (name, response) in common_responses() {
        components
            .responses
            .insert(name.to_owned(), RefOr::T(response));
    }
    document.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
    for (path, item) in &mut document.paths.paths {
        let versioned = path.starts_with("/v1/");
        for operation in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
        ]
        .into_iter()
        .flatten()
        {
            if versioned {
                add_common_errors(operation);
            } else {
                // `/healthz` and `/readyz` need no key.
                operation.security = Some(vec![SecurityRequirement::default()]);
            }
        }
    }
    document
}

/// What an answer leads to: the operations that take the id (or name) it holds, as OpenAPI
/// links, so that a client (or a fuzzer's stateful phase) can follow a new run to its view and
/// its cancellation.
const LINKS: &[(&str, &str, &str, &str)] = &[
    // (operation, status, linked operation, parameter filled from the answer's field)
    ("createRun", "201", "getRun", "id"),
    ("createRun", "201", "cancelRun", "id"),
    ("createJob", "201", "getJob", "id"),
    ("createJob", "201", "cancelJob", "id"),
    ("registerWorkflow", "201", "getWorkflow", "name"),
    ("setSchedule", "201", "getSchedule", "name"),
    ("setSchedule", "201", "deleteSchedule", "name"),
    ("createKey", "201", "revokeKey", "id"),
];

/// Adds [`LINKS`] to the answers they start from. (They are added to the JSON form: utoipa's
/// `Link` names its fields in snake case, where OpenAPI has `operationId`.)
fn add_links(document: &mut Value) {
    let Some(paths) = document.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for item in paths.values_mut().filter_map(Value::as_object_mut) {
        for operation in item.values_mut() {
            let id = operation
                .get("operationId")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            for (_, status, target, parameter) in LINKS.iter().filter(|link| link.0 == id) {
                if let Some(response) = operation
                    .pointer_mut(&format!("/responses/{status}"))
                    .and_then(Value::as_object_mut)
                {
                    let links = response.entry("links").or_insert_with(|| json!({}));
                    links[*target] = json!({
                        "operationId": target,
                        "parameters": {*parameter: format!("$response.body#/{parameter}")},
                    });
                }
            }
        }
    }
}

/// The errors every `/v1` route may answer, by the name they have in `components/responses`.
fn common_responses() -> Vec<(&'static str, Response)> {
    let error = |description: &str| {
        ResponseBuilder::new().description(description).content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
    };
    let string_header = |description: &str| {
        let mut header = Header::new(
            utoipa::openapi::ObjectBuilder::new().schema_type(utoipa::openapi::Type::String),
        );
        header.description = Some(description.to_owned());
        header
    };
    vec![
        (
            "BadRequest",
            error("The request is malformed: the message names the field or parameter").build(),
        ),
        (
            "Unauthorized",
            error("No valid API key: missing, unknown and revoked keys get the same answer")
                .header(header::WWW_AUTHENTICATE.as_str(), string_header("`Bearer`"))
                .build(),
        ),
        (
            "Forbidden",
            error("The key lacks the scope this needs; the message names it").build(),
        ),
        (
            "NotFound",
            error("No such object, or one of another tenant's").build(),
        ),
        (
            "PayloadTooLarge",
            error("The body, or a value in it, is over its limit").build(),
        ),
        (
            "UnsupportedMediaType",
            error("The body is declared as something other than JSON").build(),
        ),
        (
            "TooManyRequests",
            error("The tenant's quota is used up for now")
                .header(
                    header::RETRY_AFTER.as_str(),
                    string_header("Seconds to wait before trying again"),
                )
                .build(),
        ),
        (
            "Internal",
            error("Something unexpected; the scheduler's log has the details").build(),
        ),
        (
            "Unavailable",
            error("A service the scheduler needs is down, or it is stopping; try again").build(),
        ),
    ]
}

/// Adds to a `/v1` operation the errors it may answer by rule: 401, 403, 500 and 503 always;
/// 400 with a query or body; 413 and 415 with a body; 404 with a path parameter. Responses the
/// handler documents itself are kept.
fn add_common_errors(operation: &mut Operation) {
    let parameters = operation.parameters.as_deref().unwrap_or_default();
    let has_query = parameters
        .iter()
        .any(|parameter| parameter.parameter_in == ParameterIn::Query);
    let has_path = parameters
        .iter()
        .any(|parameter| parameter.parameter_in == ParameterIn::Path);
    let has_body = operation.request_body.is_some();
    let mut wanted = vec![
        ("401", "Unauthorized"),
        ("403", "Forbidden"),
        ("500", "Internal"),
        ("503", "Unavailable"),
    ];
    if has_query || has_body {
        wanted.push(("400", "BadRequest"));
    }
    if has_body {
        wanted.push(("413", "PayloadTooLarge"));
        wanted.push(("415", "UnsupportedMediaType"));
    }
    if has_path {
        wanted.push(("404", "NotFound"));
    }
    // A 429 a handler documents is the quota's, with its `Retry-After`.
    if operation.responses.responses.contains_key("429") {
        operation.responses.responses.insert(
            "429".to_owned(),
            RefOr::Ref(Ref::from_response_name("TooManyRequests")),
        );
    }
    for (status, name) in wanted {
        operation
            .responses
            .responses
            .entry(status.to_owned())
            .or_insert_with(|| RefOr::Ref(Ref::from_response_name(name)));
    }
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", operation_id = "getOpenApi", tag = "health",
    responses((status = 200, description = "The API's OpenAPI 3.1 document",
        content_type = "application/json", body = Object)))]
pub async fn openapi_json() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.as_str(),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn operations(document: &Value) -> Vec<(String, String, Value)> {
        let mut found = Vec::new();
        for (path, item) in document["paths"].as_object().expect("paths") {
            for (method, operation) in item.as_object().expect("a path item") {
                found.push((path.clone(), method.clone(), operation.clone()));
            }
        }
        found
    }

    /// Collects every `$ref` in a document.
    fn references(value: &Value, found: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("$ref", Value::String(reference)) => found.push(reference.clone()),
                        _ => references(value, found),
                    }
                }
            }
            Value::Array(values) => values.iter().for_each(|value| references(value, found)),
            _ => {}
        }
    }

    #[test]
    fn every_versioned_operation_needs_a_key_and_says_what_it_answers() {
        let document = document();
        assert_eq!(document["openapi"], "3.1.0");
        assert_eq!(
            document["components"]["securitySchemes"][BEARER]["scheme"],
            "bearer"
        );
        assert_eq!(document["security"], json!([{BEARER: []}]));
        let operations = operations(&document);
        assert!(operations.len() >= 23, "{} operations", operations.len());
        let mut ids = HashSet::new();
        for (path, method, operation) in &operations {
            let id = operation["operationId"].as_str().expect("an operationId");
            assert!(ids.insert(id.to_owned()), "operationId {id} twice");
            let responses = operation["responses"].as_object().expect("responses");
            assert!(
                responses.keys().any(|status| status.starts_with('2')),
                "{method} {path} has no success answer"
            );
            if path.starts_with("/v1/") {
                assert!(operation.get("security").is_none(), "{method} {path}");
                for status in ["401", "403", "500", "503"] {
                    assert!(responses.contains_key(status), "{method} {path}: {status}");
                }
                if path.contains('{') {
                    assert!(responses.contains_key("404"), "{method} {path}: 404");
                }
                if operation.get("requestBody").is_some() {
                    for status in ["400", "413", "415"] {
                        assert!(responses.contains_key(status), "{method} {path}: {status}");
                    }
                }
            } else {
                assert_eq!(operation["security"], json!([{}]), "{method} {path}");
            }
        }
    }

    #[test]
    fn every_reference_resolves() {
        let document = document();
        let mut found = Vec::new();
        references(&document, &mut found);
        assert!(!found.is_empty());
        for reference in found {
            let pointer = reference.strip_prefix('#').expect("a local reference");
            assert!(
                document.pointer(pointer).is_some(),
                "{reference} points nowhere"
            );
        }
    }

    #[test]
    fn links_name_operations_that_exist() {
        let document = document();
        let ids: HashSet<String> = operations(&document)
            .into_iter()
            .filter_map(|(_, _, operation)| operation["operationId"].as_str().map(str::to_owned))
            .collect();
        for (from, status, to, _) in LINKS {
            assert!(ids.contains(*from) && ids.contains(*to), "{from} -> {to}");
            let linked = operations(&document).into_iter().any(|(_, _, operation)| {
                operation["operationId"] == *from
                    && operation["responses"][*status]["links"][*to]["operationId"] == *to
            });
            assert!(linked, "{from} {status} does not link to {to}");
        }
    }
}
