//! What the commands print for people (`--output text`): tables of runs, jobs, workflows,
//! workers, queues and dead letters, a run's summary, the counts of the statistics. Pure formatting of the
//! API's answers; `--output json` prints those answers as they are instead.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::client::Kind;
use crate::report::describe_error;

/// The most characters of a run's output shown in its summary.
const MAX_OUTPUT_SHOWN: usize = 400;
/// The most characters of a dead letter's body shown in its row.
const MAX_BODY_SHOWN: usize = 60;

/// Returns rows as a table under `headers`: columns padded to their widest cell, two spaces
/// apart, the last one unpadded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers
        .iter()
        .map(|header| header.chars().count())
        .collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let header_row: Vec<String> = headers.iter().map(|header| (*header).to_owned()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (index, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if index + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ");
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text.trim_end().to_owned()
}

/// Returns a field of `value` as a cell: strings as they are, numbers as written, `null` or
/// absent as `-`.
fn cell(value: &Value, field: &str) -> String {
    match value.get(field) {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    }
}

/// Returns a time field (RFC 3339) as `2026-12-05 22:10:11` in UTC, or `-`.
fn time_cell(value: &Value, field: &str) -> String {
    parse_time(value, field).map_or_else(
        || cell(value, field),
        |time| time.format("%Y-%m-%d %H:%M:%S").to_string(),
    )
}

/// Returns a time field, if it holds an RFC 3339 time.
fn parse_time(value: &Value, field: &str) -> Option<DateTime<Utc>> {
    let text = value.get(field)?.as_str()?;
    Some(DateTime::parse_from_rfc3339(text).ok()?.with_timezone(&Utc))
}

/// Returns how long passed between two time fields, as `1.234 s`, or `-`.
fn duration_cell(value: &Value, from: &str, to: &str) -> String {
    match (parse_time(value, from), parse_time(value, to)) {
        (Some(from), Some(to)) => {
            let millis = (to - from).num_milliseconds().max(0);
            format!("{}.{:03} s", millis / 1000, millis % 1000)
        }
        _ => "-".to_owned(),
    }
}

/// Returns the array under `field` of an answer (empty when it has none).
fn items<'a>(answer: &'a Value, field: &str) -> &'a [Value] {
    answer
        .get(field)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// Returns a table, or a line saying there is nothing to list.
fn table_or_none(headers: &[&str], rows: &[Vec<String>], none: &str) -> String {
    if rows.is_empty() {
        format!("({none})")
    } else {
        table(headers, rows)
    }
}

/// Returns the answer of `GET /v1/runs` as a table.
pub fn runs(answer: &Value) -> String {
    let rows: Vec<Vec<String>> = items(answer, "runs")
        .iter()
        .map(|run| {
            vec![
                cell(run, "id"),
                cell(run, "status"),
                cell(run, "workflow"),
                cell(run, "version"),
                time_cell(run, "created_at"),
                duration_cell(run, "created_at", "finished_at"),
            ]
        })
        .collect();
    table_or_none(
        &[
            "ID",
            "STATUS",
            "WORKFLOW",
            "VERSION",
            "CREATED (UTC)",
            "TOOK",
        ],
        &rows,
        "no runs",
    )
}

/// Returns the answer of `GET /v1/tasks` as a table.
pub fn jobs(answer: &Value) -> String {
    let rows: Vec<Vec<String>> = items(answer, "jobs")
        .iter()
        .map(|job| {
            vec![
                cell(job, "id"),
                cell(job, "status"),
                cell(job, "step"),
                cell(job, "executor"),
                cell(job, "queue"),
                time_cell(job, "created_at"),
                duration_cell(job, "created_at", "finished_at"),
            ]
        })
        .collect();
    table_or_none(
        &[
            "ID",
            "STATUS",
            "STEP",
            "EXECUTOR",
            "QUEUE",
            "CREATED (UTC)",
            "TOOK",
        ],
        &rows,
        "no jobs",
    )
}

/// Returns the line that tells how to list the next page, when there is one.
pub fn next_page(answer: &Value, command: &str) -> Option<String> {
    let cursor = answer.get("next_cursor")?.as_str()?;
    Some(format!("more: taskfleet {command} --cursor {cursor}"))
}

/// Returns the answer of `GET /v1/workflows` as a table.
pub fn workflows(answer: &Value) -> String {
    let rows: Vec<Vec<String>> = items(answer, "workflows")
        .iter()
        .map(|workflow| {
            vec![
                cell(workflow, "name"),
                cell(workflow, "version"),
                cell(workflow, "steps"),
                time_cell(workflow, "created_at"),
            ]
        })
        .collect();
    table_or_none(
        &["NAME", "VERSION", "STEPS", "REGISTERED (UTC)"],
        &rows,
        "no workflows",
    )
}

/// Returns the answer of `GET /v1/workers` as a table.
pub fn workers(answer: &Value) -> String {
    let rows: Vec<Vec<String>> = items(answer, "workers")
        .iter()
        .map(|worker| {
            let queues = worker
                .get("queues")
                .and_then(Value::as_array)
                .map(|queues| {
                    queues
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_else(|| "-".to_owned());
            vec![
                cell(worker, "id"),
                cell(worker, "host"),
                queues,
                format!(
                    "{}/{}",
                    cell(worker, "running"),
                    cell(worker, "concurrency")
                ),
                time_cell(worker, "last_heartbeat"),
            ]
        })
        .collect();
    table_or_none(
        &["ID", "HOST", "QUEUES", "RUNNING", "LAST HEARTBEAT (UTC)"],
        &rows,
        "no live workers",
    )
}

/// Returns the answer of `GET /v1/queues` as a table.
pub fn queues(answer: &Value) -> String {
    let rows: Vec<Vec<String>> = items(answer, "queues")
        .iter()
        .map(|queue| {
            vec![
                cell(queue, "name"),
                cell(queue, "ready"),
                cell(queue, "in_flight"),
                cell(queue, "consumers"),
            ]
        })
        .collect();
    table_or_none(
        &["QUEUE", "READY", "IN FLIGHT", "CONSUMERS"],
        &rows,
        "no queues",
    )
}

/// Returns the answer of `GET /v1/keys` as a table.
pub fn keys(answer: &Value) -> String {
    let rows: Vec<Vec<String>> = items(answer, "keys")
        .iter()
        .map(|key| {
            let scopes = key
                .get("scopes")
                .and_then(Value::as_array)
                .map(|scopes| {
                    scopes
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            let state = if key.get("revoked_at").is_some_and(|at| !at.is_null()) {
                format!("revoked {}", time_cell(key, "revoked_at"))
            } else {
                "active".to_owned()
            };
            vec![
                cell(key, "id"),
                cell(key, "tenant"),
                scopes,
                state,
                time_cell(key, "last_used_at"),
                cell(key, "description"),
            ]
        })
        .collect();
    table_or_none(
        &[
            "ID",
            "TENANT",
            "SCOPES",
            "STATE",
            "LAST USED (UTC)",
            "DESCRIPTION",
        ],
        &rows,
        "no keys",
    )
}

/// Returns the answer of `GET /v1/tenants` as a table.
pub fn tenants(answer: &Value) -> String {
    let rows: Vec<Vec<String>> = items(answer, "tenants")
        .iter()
        .map(|tenant| {
            vec![
                cell(tenant, "tenant"),
                cell(tenant, "submissions_per_s"),
                cell(tenant, "runs_in_flight"),
            ]
        })
        .collect();
    table_or_none(
        &["TENANT", "SUBMISSIONS/S", "RUNS IN FLIGHT"],
        &rows,
        "no tenant has quotas",
    )
}

/// Returns a queue's settings (`GET` or `PUT /v1/queues/{name}`) as a sentence.
pub fn queue_settings(answer: &Value) -> String {
    let queue = cell(answer, "queue");
    match answer.get("rate_limit_per_s").and_then(Value::as_f64) {
        Some(rate) => format!("queue {queue}: at most {rate} starts per second across the fleet"),
        None => format!("queue {queue}: no rate limit"),
    }
}

/// Returns the answer of `GET /v1/audit` as a table.
pub fn audit(answer: &Value) -> String {
    let rows: Vec<Vec<String>> = items(answer, "events")
        .iter()
        .map(|event| {
            vec![
                time_cell(event, "at"),
                cell(event, "action"),
                cell(event, "target"),
                cell(event, "tenant"),
                cell(event, "key_id"),
            ]
        })
        .collect();
    table_or_none(
        &["AT (UTC)", "ACTION", "TARGET", "TENANT", "KEY"],
        &rows,
        "no events",
    )
}

/// Returns the answer of `GET /v1/dead-letters` as a table, under a line saying how many
/// messages the queue holds.
pub fn dead_letters(answer: &Value) -> String {
    let letters = items(answer, "messages");
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|letter| {
            let body = letter
                .get("body_prefix")
                .and_then(Value::as_str)
                .unwrap_or_default();
            vec![
                time_cell(letter, "dead_lettered_at"),
                cell(letter, "source"),
                cell(letter, "size"),
                cell(letter, "reason"),
                one_line(body, MAX_BODY_SHOWN),
            ]
        })
        .collect();
    let total = answer.get("total").and_then(Value::as_u64).unwrap_or(0);
    let noun = if total == 1 { "letter" } else { "letters" };
    let heading = if u64::try_from(letters.len()).is_ok_and(|shown| shown >= total) {
        format!("{total} dead {noun}")
    } else {
        format!(
            "{total} dead {noun}, the first {} shown (--limit shows more)",
            letters.len()
        )
    };
    let listing = table_or_none(
        &["DEAD-LETTERED (UTC)", "SOURCE", "SIZE", "REASON", "BODY"],
        &rows,
        "no dead letters",
    );
    format!("{heading}\n{listing}")
}

/// Returns the answer of `POST /v1/dead-letters:purge` as a sentence.
pub fn purged_dead_letters(answer: &Value) -> String {
    let purged = cell(answer, "purged");
    let noun = if purged == "1" { "letter" } else { "letters" };
    format!("purged {purged} dead {noun}")
}

/// Returns `text` on one line, control characters escaped, cut to its first `most`
/// characters with `…` after.
fn one_line(text: &str, most: usize) -> String {
    let escaped: String = text
        .chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    if escaped.chars().count() <= most {
        escaped
    } else {
        let start: String = escaped.chars().take(most).collect();
        format!("{start}…")
    }
}

/// Returns the answer of `GET /v1/stats`: the namespace, then runs and tasks by status.
pub fn stats(answer: &Value) -> String {
    let counts = |field: &str| {
        let counts = answer
            .get(field)
            .and_then(Value::as_object)
            .map(|counts| {
                counts
                    .iter()
                    .map(|(status, count)| format!("{status} {count}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        if counts.is_empty() {
            "none".to_owned()
        } else {
            counts
        }
    };
    format!(
        "namespace  {}\nruns       {}\ntasks      {}",
        cell(answer, "namespace"),
        counts("runs"),
        counts("tasks")
    )
}

/// Returns a run or job as people read it: a headline, its workflow and times, its error, a
/// table of its steps and the start of its output.
pub fn run(kind: Kind, run: &Value) -> String {
    let mut text = format!(
        "{} {}  {}\n",
        kind.noun(),
        cell(run, "id"),
        cell(run, "status")
    );
    if kind == Kind::Run {
        let workflow = match (
            run.get("workflow").and_then(Value::as_str),
            run.get("version"),
        ) {
            (Some(name), Some(Value::Number(version))) => format!("{name} (version {version})"),
            (Some(name), _) => format!("{name} (inline definition)"),
            (None, _) => "(inline definition)".to_owned(),
        };
        let _ = writeln!(text, "workflow   {workflow}");
    }
    let _ = writeln!(text, "created    {} UTC", time_cell(run, "created_at"));
    if run.get("finished_at").is_some_and(|time| !time.is_null()) {
        let _ = writeln!(
            text,
            "finished   {} UTC (after {})",
            time_cell(run, "finished_at"),
            duration_cell(run, "created_at", "finished_at")
        );
    }
    let error = &run["error"];
    if !error.is_null() {
        let _ = writeln!(text, "error      {}", describe_error(error));
    }
    let steps = run
        .get("steps")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let rows: Vec<Vec<String>> = steps
        .iter()
        .map(|(id, step)| {
            let items = step.get("items").map_or_else(
                || "-".to_owned(),
                |items| format!("{}/{}", cell(items, "done"), cell(items, "total")),
            );
            vec![
                id.clone(),
                cell(step, "status"),
                cell(step, "attempts"),
                items,
                duration_cell(step, "started_at", "finished_at"),
            ]
        })
        .collect();
    if !rows.is_empty() {
        let _ = writeln!(
            text,
            "\n{}",
            table(&["STEP", "STATUS", "ATTEMPTS", "ITEMS", "TOOK"], &rows)
        );
    }
    if let Some(output) = run.get("output").filter(|output| !output.is_null()) {
        let _ = writeln!(text, "\noutput     {}", shortened(&output.to_string()));
    }
    text.trim_end().to_owned()
}

/// Returns `text` cut to its first characters, saying how much was left out.
fn shortened(text: &str) -> String {
    let count = text.chars().count();
    if count <= MAX_OUTPUT_SHOWN {
        return text.to_owned();
    }
    let start: String = text.chars().take(MAX_OUTPUT_SHOWN).collect();
    format!(
        "{start}… ({} more characters; --output json shows all of it)",
        count - MAX_OUTPUT_SHOWN
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn tables_pad_columns_to_their_widest_cell() {
        let rows = vec![
            vec!["a".to_owned(), "running".to_owned(), "x".to_owned()],
            vec!["bbbb".to_owned(), "ok".to_owned(), "-".to_owned()],
        ];
        assert_eq!(
            table(&["ID", "STATUS", "LAST"], &rows),
            "ID    STATUS   LAST\na     running  x\nbbbb  ok       -"
        );
    }

    #[test]
    fn run_listings_show_times_in_utc_and_how_long_runs_took() {
        let answer = json!({"runs": [{
            "id": "r1", "status": "succeeded", "workflow": null, "version": null,
            "created_at": "2026-12-05T22:10:11.250+00:00",
            "finished_at": "2026-12-05T22:10:12.500Z",
        }], "next_cursor": "r1"});
        assert_eq!(
            runs(&answer),
            "ID  STATUS     WORKFLOW  VERSION  CREATED (UTC)        TOOK\n\
             r1  succeeded  -         -        2026-12-05 22:10:11  1.250 s"
        );
        assert_eq!(
            next_page(&answer, "runs").as_deref(),
            Some("more: taskfleet runs --cursor r1")
        );
        assert_eq!(runs(&json!({"runs": []})), "(no runs)");
        assert_eq!(next_page(&json!({"next_cursor": null}), "runs"), None);
    }

    #[test]
    fn a_run_shows_its_steps_error_and_output() {
        let run = json!({
            "id": "r1", "status": "failed", "workflow": "orders", "version": 3,
            "created_at": "2026-12-05T22:10:11Z", "finished_at": "2026-12-05T22:10:13Z",
            "error": {"step": "total", "type": "ValueError", "message": "bad"},
            "output": null,
            "steps": {
                "clean": {"status": "succeeded", "attempts": 1,
                          "started_at": "2026-12-05T22:10:11Z", "finished_at": "2026-12-05T22:10:11.004Z"},
                "fan": {"status": "running", "attempts": 1, "items": {"done": 3, "total": 10}},
            },
        });
        let text = super::run(Kind::Run, &run);
        assert!(
            text.starts_with("run r1  failed\nworkflow   orders (version 3)\n"),
            "{text}"
        );
        assert!(
            text.contains("finished   2026-12-05 22:10:13 UTC (after 2.000 s)"),
            "{text}"
        );
        assert!(
            text.contains("error      step \"total\": bad (ValueError)"),
            "{text}"
        );
        assert!(
            text.contains("clean  succeeded  1         -      0.004 s"),
            "{text}"
        );
        assert!(
            text.contains("fan    running    1         3/10   -"),
            "{text}"
        );
        assert!(!text.contains("output"), "{text}");
    }

    #[test]
    fn long_outputs_are_shortened() {
        let long = "x".repeat(MAX_OUTPUT_SHOWN + 5);
        let shown = shortened(&long);
        assert!(shown.ends_with("… (5 more characters; --output json shows all of it)"));
        assert_eq!(shortened("7.0"), "7.0");
    }

    #[test]
    fn dead_letters_show_on_one_line_each_under_their_count() {
        let answer = json!({"total": 3, "messages": [{
            "reason": "not json", "source": "ns.tasks.default",
            "dead_lettered_at": "2026-12-05T22:10:11Z", "size": 20,
            "body_prefix": "line one\nline\ttwo",
        }, {
            "reason": null, "source": null, "dead_lettered_at": null, "size": 300,
            "body_prefix": "x".repeat(256),
        }]});
        let text = dead_letters(&answer);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "3 dead letters, the first 2 shown (--limit shows more)"
        );
        assert!(
            lines[1].starts_with("DEAD-LETTERED (UTC)  SOURCE"),
            "{text}"
        );
        assert!(
            lines[2].starts_with("2026-12-05 22:10:11  ns.tasks.default  20"),
            "{text}"
        );
        assert!(lines[2].ends_with("line one\\nline\\ttwo"), "{text}");
        assert!(
            lines[3].ends_with(&format!("{}…", "x".repeat(MAX_BODY_SHOWN))),
            "{text}"
        );
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(
            dead_letters(&json!({"total": 0, "messages": []})),
            "0 dead letters\n(no dead letters)"
        );
        assert_eq!(
            purged_dead_letters(&json!({"purged": 4})),
            "purged 4 dead letters"
        );
    }

    #[test]
    fn stats_list_counts_by_status() {
        let answer = json!({"namespace": "n", "runs": {"succeeded": 2}, "tasks": {}});
        assert_eq!(
            stats(&answer),
            "namespace  n\nruns       succeeded 2\ntasks      none"
        );
    }
}
