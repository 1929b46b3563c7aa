//! `taskfleet schedules`: listing, showing, setting, pausing, resuming and deleting schedules
//! (`/v1/schedules`), with their bodies and their text.

use serde_json::{Map, Value};

use crate::args::{SchedulesCommand, SetScheduleArgs};
use crate::body::{self, InputError};
use crate::client::Client;
use crate::text;
use crate::{CliError, Exit, Printer};

/// Runs a `taskfleet schedules` command.
pub async fn run(
    client: &Client,
    printer: Printer,
    command: Option<SchedulesCommand>,
) -> Result<Exit, CliError> {
    match command {
        None | Some(SchedulesCommand::List) => {
            let answer = client.get(&["v1", "schedules"]).await?;
            printer.print(&answer, list_text)?;
        }
        Some(SchedulesCommand::Show(name_args)) => {
            let answer = client.get(&["v1", "schedules", &name_args.name]).await?;
            printer.print(&answer, show_text)?;
        }
        Some(SchedulesCommand::Set(set_args)) => {
            let request = set_body(&set_args)?;
            let answer = client
                .put(&["v1", "schedules", &set_args.name], &request)
                .await?;
            printer.print(&answer, show_text)?;
        }
        Some(SchedulesCommand::Delete(name_args)) => {
            let answer = client.delete(&["v1", "schedules", &name_args.name]).await?;
            printer.print(&answer, |_| format!("schedule {} deleted", name_args.name))?;
        }
        Some(SchedulesCommand::Pause(name_args)) => {
            let answer = set_paused(client, &name_args.name, true).await?;
            printer.print(&answer, |_| format!("schedule {} paused", name_args.name))?;
        }
        Some(SchedulesCommand::Resume(name_args)) => {
            let answer = set_paused(client, &name_args.name, false).await?;
            printer.print(&answer, |answer| {
                let next = answer["next_fire_times"][0].as_str().unwrap_or("never");
                format!("schedule {} resumed; next fire at {next}", name_args.name)
            })?;
        }
    }
    Ok(Exit::Success)
}

/// Sets a schedule paused or not, keeping everything else it says.
async fn set_paused(client: &Client, name: &str, paused: bool) -> Result<Value, CliError> {
    let shown = client.get(&["v1", "schedules", name]).await?;
    let mut request = Map::new();
    for field in [
        "workflow",
        "version",
        "definition",
        "input",
        "cron",
        "timezone",
        "overlap",
        "catch_up",
    ] {
        if let Some(value) = shown.get(field).filter(|value| !value.is_null()) {
            request.insert(field.to_owned(), value.clone());
        }
    }
    request.insert("paused".to_owned(), Value::Bool(paused));
    Ok(client
        .put(&["v1", "schedules", name], &Value::Object(request))
        .await?)
}

/// Returns the body of `PUT /v1/schedules/{name}` that `schedules set` asks for.
fn set_body(set_args: &SetScheduleArgs) -> Result<Value, InputError> {
    let mut request = Map::new();
    if let Some(workflow) = &set_args.workflow {
        request.insert("workflow".to_owned(), Value::from(workflow.as_str()));
    }
    if let Some(version) = set_args.version {
        request.insert("version".to_owned(), Value::from(version));
    }
    if let Some(path) = &set_args.definition {
        let definition = if path.as_os_str() == "-" {
            let what = "--definition - (standard input)";
            body::parse_json(&body::read_stdin(what)?, what.to_owned())?
        } else {
            body::read_definition(path)?
        };
        request.insert("definition".to_owned(), definition);
    }
    request.insert("input".to_owned(), body::read_input(&set_args.input)?);
    request.insert("cron".to_owned(), Value::from(set_args.cron.as_str()));
    for (field, value) in [
        ("timezone", &set_args.timezone),
        ("overlap", &set_args.overlap),
        ("catch_up", &set_args.catch_up),
    ] {
        if let Some(value) = value {
            request.insert(field.to_owned(), Value::from(value.as_str()));
        }
    }
    request.insert("paused".to_owned(), Value::Bool(set_args.paused));
    Ok(Value::Object(request))
}

/// Returns what a schedule runs: its workflow (and version), or its inline definition.
fn target(schedule: &Value) -> String {
    match (schedule["workflow"].as_str(), schedule["version"].as_i64()) {
        (Some(workflow), Some(version)) => format!("{workflow} v{version}"),
        (Some(workflow), None) => workflow.to_owned(),
        (None, _) => match schedule["definition"]["name"].as_str() {
            Some(name) => format!("{name} (inline)"),
            None => "(inline)".to_owned(),
        },
    }
}

/// Returns a field as text, `-` when it is null or absent.
fn field(value: &Value, name: &str) -> String {
    match value.get(name) {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    }
}

/// Returns the answer of `GET /v1/schedules` as a table.
fn list_text(answer: &Value) -> String {
    let schedules = answer["schedules"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    if schedules.is_empty() {
        return "(no schedules)".to_owned();
    }
    let rows: Vec<Vec<String>> = schedules
        .iter()
        .map(|schedule| {
            vec![
                field(schedule, "name"),
                field(schedule, "cron"),
                field(schedule, "timezone"),
                target(schedule),
                if schedule["paused"] == Value::Bool(true) {
                    "paused".to_owned()
                } else {
                    "active".to_owned()
                },
                schedule["next_fire_times"][0]
                    .as_str()
                    .unwrap_or("-")
                    .to_owned(),
                field(schedule, "last_error"),
            ]
        })
        .collect();
    text::table(
        &[
            "NAME",
            "CRON",
            "TIMEZONE",
            "RUNS",
            "STATE",
            "NEXT FIRE",
            "LAST ERROR",
        ],
        &rows,
    )
}

/// Returns a schedule as lines of text.
fn show_text(schedule: &Value) -> String {
    let mut lines = vec![
        format!("schedule   {}", field(schedule, "name")),
        format!("runs       {}", target(schedule)),
        format!(
            "cron       {} ({})",
            field(schedule, "cron"),
            field(schedule, "timezone")
        ),
        format!(
            "policies   overlap {}, catch_up {}{}",
            field(schedule, "overlap"),
            field(schedule, "catch_up"),
            if schedule["paused"] == Value::Bool(true) {
                ", paused"
            } else {
                ""
            }
        ),
    ];
    let next: Vec<&str> = schedule["next_fire_times"]
        .as_array()
        .map(|times| times.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    lines.push(format!(
        "next       {}",
        if next.is_empty() {
            "-".to_owned()
        } else {
            next.join("\n           ")
        }
    ));
    lines.push(format!(
        "last fire  {} (run {})",
        field(schedule, "last_fired_at"),
        field(schedule, "last_run_id")
    ));
    lines.push(format!(
        "skipped    {} (last {})",
        field(schedule, "skipped_ticks"),
        field(schedule, "last_skipped_at")
    ));
    if !schedule["last_error"].is_null() {
        lines.push(format!(
            "last error {} at {}",
            field(schedule, "last_error"),
            field(schedule, "last_error_at")
        ));
    }
    lines.join("\n")
}
