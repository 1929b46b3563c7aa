//! Building request bodies from arguments: `POST /v1/runs` from `taskfleet submit`'s (telling a
//! definition file from a workflow name), `POST /v1/tasks` from `taskfleet enqueue`'s, and
//! definitions to register; reading and parsing the input.
//!
//! It reads the files and standard input the arguments name, but never talks to the API.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::args::{EnqueueArgs, InputArgs, SubmitArgs};

/// An argument, file or standard input that cannot be used.
#[derive(Debug)]
pub enum InputError {
    /// A file, or standard input, could not be read.
    Read {
        /// What was being read, as the user named it.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// Text that should be JSON is not.
    BadJson {
        /// Where the text came from, as the user named it.
        what: String,
        /// Where and why parsing failed.
        source: serde_json::Error,
    },
    /// `--version` was given together with a definition file.
    VersionWithDefinition,
    /// Standard input was named for both the definition and the input.
    StdinTwice,
    /// A step or definition is JSON, but not an object (where it came from).
    NotAnObject(String),
    /// A definition to register has no name, and none was given.
    Unnamed(String),
}

impl fmt::Display for InputError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read { what, source } => write!(formatter, "reading {what}: {source}"),
            Self::BadJson { what, source } => {
                write!(formatter, "{what} is not valid JSON: {source}")
            }
            Self::VersionWithDefinition => formatter.write_str(
                "--version only applies to a registered workflow name, not a definition",
            ),
            Self::StdinTwice => formatter.write_str(
                "standard input can hold the definition (-) or the input (--input-file -), not both",
            ),
            Self::NotAnObject(what) => write!(formatter, "{what} is not a JSON object"),
            Self::Unnamed(what) => write!(
                formatter,
                "{what} has no \"name\": add one, or give --name"
            ),
        }
    }
}

impl std::error::Error for InputError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Read { source, .. } => Some(source),
            Self::BadJson { source, .. } => Some(source),
            Self::VersionWithDefinition
            | Self::StdinTwice
            | Self::NotAnObject(_)
            | Self::Unnamed(_) => None,
        }
    }
}

/// What `submit`'s first argument names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A workflow registered with `PUT /v1/workflows/{name}`.
    Workflow(String),
    /// A file holding a workflow definition, to be run inline.
    DefinitionFile(PathBuf),
    /// A definition on standard input (`-`).
    DefinitionStdin,
}

/// Returns what `argument` names: a definition file when it is an existing file (`is_file`) or
/// ends in `.json`, otherwise a registered workflow.
pub fn classify(argument: &str, is_file: bool) -> Target {
    if argument == "-" {
        return Target::DefinitionStdin;
    }
    let looks_like_json = Path::new(argument)
        .extension()
        .is_some_and(|extension| extension.eq_ignore_ascii_case("json"));
    if is_file || looks_like_json {
        Target::DefinitionFile(PathBuf::from(argument))
    } else {
        Target::Workflow(argument.to_owned())
    }
}

/// What a run is started from, once any definition file has been read.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A registered workflow, optionally pinned to a version.
    Workflow {
        /// The workflow's name.
        name: String,
        /// The version to run; the latest when absent.
        version: Option<u32>,
    },
    /// An inline definition.
    Definition(Value),
}

/// Returns the body of `POST /v1/runs` for `submit`'s arguments, reading the files they name.
pub fn run_request(submit_args: &SubmitArgs) -> Result<Value, InputError> {
    let target = match (&submit_args.target, &submit_args.definition) {
        (Some(target), _) => classify(target, Path::new(target).is_file()),
        (None, _) => Target::DefinitionStdin,
    };
    if submit_args.version.is_some() && !matches!(target, Target::Workflow(_)) {
        return Err(InputError::VersionWithDefinition);
    }
    let source = match target {
        Target::Workflow(name) => Source::Workflow {
            name,
            version: submit_args.version,
        },
        Target::DefinitionFile(path) => Source::Definition(read_definition(&path)?),
        Target::DefinitionStdin => match &submit_args.definition {
            Some(text) => Source::Definition(parse_json(text, "--definition".to_owned())?),
            None if submit_args
                .input
                .input_file
                .as_ref()
                .is_some_and(|path| path.as_os_str() == "-") =>
            {
                return Err(InputError::StdinTwice);
            }
            None => Source::Definition(parse_json(
                &read_stdin("the definition on standard input (-)")?,
                "the definition on standard input (-)".to_owned(),
            )?),
        },
    };
    let input = read_input(&submit_args.input)?;
    let mut request = build_request(source, input, submit_args.idempotency_key.as_deref());
    if let Some(delay) = submit_args.delay {
        request["delay_s"] = Value::from(delay);
    }
    if let Some(time) = &submit_args.not_before {
        request["not_before"] = Value::String(time.clone());
    }
    Ok(request)
}

/// Returns the body of `POST /v1/runs`: the source's fields, `input` and any idempotency key.
pub fn build_request(source: Source, input: Value, idempotency_key: Option<&str>) -> Value {
    let mut body = Map::new();
    match source {
        Source::Workflow { name, version } => {
            body.insert("workflow".to_owned(), Value::String(name));
            if let Some(version) = version {
                body.insert("version".to_owned(), Value::from(version));
            }
        }
        Source::Definition(definition) => {
            body.insert("definition".to_owned(), definition);
        }
    }
    body.insert("input".to_owned(), input);
    if let Some(key) = idempotency_key {
        body.insert("idempotency_key".to_owned(), Value::String(key.to_owned()));
    }
    Value::Object(body)
}

/// Returns the body of `POST /v1/tasks` for `enqueue`'s arguments: the step's fields, with
/// the queue, input, delay and idempotency key the flags give.
pub fn job_request(enqueue_args: &EnqueueArgs) -> Result<Value, InputError> {
    let input_from_stdin = enqueue_args
        .input
        .input_file
        .as_ref()
        .is_some_and(|path| path.as_os_str() == "-");
    let mut step = if let Some(path) = &enqueue_args.file {
        let (text, what) = if path.as_os_str() == "-" {
            if input_from_stdin {
                return Err(InputError::StdinTwice);
            }
            let what = "the step on standard input (-)";
            (read_stdin(what)?, what.to_owned())
        } else {
            let what = format!("step file {}", path.display());
            (read_file(path, &what)?, what)
        };
        object(parse_json(&text, what.clone())?, what)?
    } else if let Some(text) = &enqueue_args.step {
        object(parse_json(text, "--step".to_owned())?, "--step".to_owned())?
    } else {
        let mut step = Map::new();
        if let Some(reference) = &enqueue_args.python {
            step.insert("python".to_owned(), Value::String(reference.clone()));
        }
        if let Some(program) = &enqueue_args.dataflow {
            step.insert("dataflow".to_owned(), Value::String(program.clone()));
        }
        step
    };
    if let Some(queue) = &enqueue_args.queue {
        step.insert("queue".to_owned(), Value::String(queue.clone()));
    }
    if enqueue_args.input.input.is_some() || enqueue_args.input.input_file.is_some() {
        step.insert("input".to_owned(), read_input(&enqueue_args.input)?);
    }
    if let Some(delay) = enqueue_args.delay {
        step.insert("delay_s".to_owned(), Value::from(delay));
    }
    if let Some(time) = &enqueue_args.not_before {
        step.insert("not_before".to_owned(), Value::String(time.clone()));
    }
    if let Some(key) = &enqueue_args.idempotency_key {
        step.insert("idempotency_key".to_owned(), Value::String(key.clone()));
    }
    Ok(Value::Object(step))
}

/// Returns the definition in `path` (standard input for `-`) and the name to register it under:
/// `name` if given (written into the definition), else the definition's own.
pub fn definition_to_register(
    path: &Path,
    name: Option<&str>,
) -> Result<(String, Value), InputError> {
    let what = if path.as_os_str() == "-" {
        "the definition on standard input (-)".to_owned()
    } else {
        format!("definition file {}", path.display())
    };
    let text = if path.as_os_str() == "-" {
        read_stdin(&what)?
    } else {
        read_file(path, &what)?
    };
    let mut definition = object(parse_json(&text, what.clone())?, what.clone())?;
    let name = match (name, definition.get("name").and_then(Value::as_str)) {
        (Some(name), _) | (None, Some(name)) => name.to_owned(),
        (None, None) => return Err(InputError::Unnamed(what)),
    };
    // The name given wins over the definition's own, which the API requires to match.
    definition.insert("name".to_owned(), Value::String(name.clone()));
    Ok((name, Value::Object(definition)))
}

/// Returns `value` as an object, or the error naming `what` it came from.
fn object(value: Value, what: String) -> Result<Map<String, Value>, InputError> {
    match value {
        Value::Object(object) => Ok(object),
        _ => Err(InputError::NotAnObject(what)),
    }
}

/// Reads the file at `path`; `what` names it in the error.
fn read_file(path: &Path, what: &str) -> Result<String, InputError> {
    std::fs::read_to_string(path).map_err(|source| InputError::Read {
        what: what.to_owned(),
        source,
    })
}

/// Returns the definition held in the file at `path`.
pub(crate) fn read_definition(path: &Path) -> Result<Value, InputError> {
    let what = format!("definition file {}", path.display());
    parse_json(&read_file(path, &what)?, what)
}

/// Returns the run input named by `--input` or `--input-file`, or `null` without either.
pub fn read_input(input_args: &InputArgs) -> Result<Value, InputError> {
    match (&input_args.input, &input_args.input_file) {
        (Some(text), _) => parse_json(text, "--input".to_owned()),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let what = "--input-file - (standard input)";
            parse_json(&read_stdin(what)?, what.to_owned())
        }
        (None, Some(path)) => {
            let what = format!("--input-file {}", path.display());
            parse_json(&read_file(path, &what)?, what)
        }
        (None, None) => Ok(Value::Null),
    }
}

/// Reads all of standard input; `what` names it in the error.
pub(crate) fn read_stdin(what: &str) -> Result<String, InputError> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|source| InputError::Read {
            what: what.to_owned(),
            source,
        })?;
    Ok(text)
}

/// Parses `text` as JSON; `what` names where it came from in the error.
pub fn parse_json(text: &str, what: String) -> Result<Value, InputError> {
    serde_json::from_str(text).map_err(|source| InputError::BadJson { what, source })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn check_classify(argument: &str, is_file: bool, expected: Target) {
        assert_eq!(classify(argument, is_file), expected, "{argument:?}");
    }

    #[test]
    fn existing_files_and_json_names_are_definitions() {
        let file = |path: &str| Target::DefinitionFile(PathBuf::from(path));
        let workflow = |name: &str| Target::Workflow(name.to_owned());
        check_classify("orders", false, workflow("orders"));
        check_classify("orders", true, file("orders"));
        check_classify("examples/orders.json", false, file("examples/orders.json"));
        check_classify("ORDERS.JSON", false, file("ORDERS.JSON"));
        check_classify("orders.json5", false, workflow("orders.json5"));
        check_classify("json", false, workflow("json"));
    }

    fn check_request(source: Source, input: Value, key: Option<&str>, expected: Value) {
        assert_eq!(build_request(source, input, key), expected);
    }

    #[test]
    fn requests_name_the_workflow_or_inline_the_definition() {
        let workflow = |version| Source::Workflow {
            name: "orders".to_owned(),
            version,
        };
        check_request(
            workflow(None),
            Value::Null,
            None,
            json!({"workflow": "orders", "input": null}),
        );
        check_request(
            workflow(Some(2)),
            json!([1, 2]),
            Some("k-1"),
            json!({"workflow": "orders", "version": 2, "input": [1, 2], "idempotency_key": "k-1"}),
        );
        check_request(
            Source::Definition(json!({"steps": []})),
            json!({"a": 1}),
            None,
            json!({"definition": {"steps": []}, "input": {"a": 1}}),
        );
    }

    fn check_input(input: Option<&str>, expected: Option<Value>) {
        let input_args = InputArgs {
            input: input.map(str::to_owned),
            input_file: None,
        };
        assert_eq!(read_input(&input_args).ok(), expected, "{input:?}");
    }

    #[test]
    fn inline_input_parses_as_json() {
        check_input(None, Some(Value::Null));
        check_input(Some("{\"qty\": 3}"), Some(json!({"qty": 3})));
        check_input(Some(" [1, 2] "), Some(json!([1, 2])));
        check_input(Some("\"text\""), Some(json!("text")));
        check_input(Some("text"), None);
        check_input(Some(""), None);
        check_input(Some("{\"a\": 1"), None);
    }

    #[test]
    fn bad_inline_input_names_the_flag() {
        let input_args = InputArgs {
            input: Some("{qty: 3}".to_owned()),
            input_file: None,
        };
        let message = read_input(&input_args)
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default();
        assert!(
            message.starts_with("--input is not valid JSON: "),
            "{message}"
        );
    }

    #[test]
    fn missing_input_file_names_the_flag_and_path() {
        let input_args = InputArgs {
            input: None,
            input_file: Some(PathBuf::from("/nonexistent/input.json")),
        };
        let message = read_input(&input_args)
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default();
        assert!(
            message.starts_with("reading --input-file /nonexistent/input.json: "),
            "{message}"
        );
    }

    fn submit_args(target: &str, version: Option<u32>) -> SubmitArgs {
        SubmitArgs {
            target: Some(target.to_owned()),
            definition: None,
            input: InputArgs {
                input: Some("1".to_owned()),
                input_file: None,
            },
            version,
            idempotency_key: None,
            delay: None,
            not_before: None,
            wait: false,
            timeout: None,
        }
    }

    #[test]
    fn a_delay_or_a_time_goes_into_the_body() {
        let delayed = SubmitArgs {
            delay: Some(2.5),
            ..submit_args("orders", None)
        };
        let body = run_request(&delayed).expect("a body");
        assert_eq!(body["delay_s"], 2.5);
        assert_eq!(body["workflow"], "orders");
        let later = SubmitArgs {
            not_before: Some("2026-12-24T18:00:00Z".to_owned()),
            ..submit_args("orders", None)
        };
        let body = run_request(&later).expect("a body");
        assert_eq!(body["not_before"], "2026-12-24T18:00:00Z");
        assert!(body.get("delay_s").is_none());
    }

    #[test]
    fn an_inline_definition_is_sent_as_given_and_stdin_serves_one_purpose() {
        let inline = SubmitArgs {
            target: None,
            definition: Some(r#"{"steps": [{"id": "a", "dataflow": "."}]}"#.to_owned()),
            ..submit_args("unused", None)
        };
        let body = run_request(&inline).expect("a body");
        assert_eq!(body["definition"]["steps"][0]["id"], "a");
        assert_eq!(body["input"], 1);
        let bad = SubmitArgs {
            definition: Some("{steps".to_owned()),
            ..inline
        };
        let message = run_request(&bad).err().map(|error| error.to_string());
        assert!(
            message.is_some_and(|message| message.starts_with("--definition is not valid JSON")),
        );
        let twice = SubmitArgs {
            input: InputArgs {
                input: None,
                input_file: Some(PathBuf::from("-")),
            },
            ..submit_args("-", None)
        };
        assert!(matches!(run_request(&twice), Err(InputError::StdinTwice)));
        assert_eq!(classify("-", false), Target::DefinitionStdin);
    }

    #[test]
    fn version_is_refused_with_a_definition_file() {
        let result = run_request(&submit_args("/nonexistent/orders.json", Some(1)));
        assert!(matches!(result, Err(InputError::VersionWithDefinition)));
    }

    #[test]
    fn missing_definition_file_is_reported_not_sent_as_a_name() {
        let result = run_request(&submit_args("/nonexistent/orders.json", None));
        assert!(matches!(result, Err(InputError::Read { .. })), "{result:?}");
    }

    #[test]
    fn definition_file_is_read_and_inlined() {
        let path = std::env::temp_dir().join(format!(
            "taskfleet-cli-definition-{}.json",
            std::process::id()
        ));
        std::fs::write(&path, r#"{"steps": [{"id": "a", "dataflow": "."}]}"#)
            .expect("the temporary directory is writable");
        let result = run_request(&submit_args(&path.to_string_lossy(), None));
        let _ = std::fs::remove_file(&path);
        assert_eq!(
            result.ok(),
            Some(json!({"definition": {"steps": [{"id": "a", "dataflow": "."}]}, "input": 1}))
        );
    }
}
