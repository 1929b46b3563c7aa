//! The `taskfleet` command-line client of the scheduler's HTTP API (`docs/api.md`).
//!
//! The library owns the commands: building request bodies from arguments, talking HTTP, waiting
//! for runs to finish and printing results. Only [`parse`] reads the process's environment (the
//! variables the flags name).

// A command-line client's output is its interface: results go to stdout, diagnostics to stderr.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod args;
mod body;
mod client;
mod poll;
mod report;
mod schedules;
mod text;

use std::fmt;
use std::process::ExitCode;
use std::time::Duration;

pub use args::{Cli, Command, Output};

use args::{
    CompletionsArgs, CreateKeyArgs, DeadLettersCommand, EnqueueArgs, KeysCommand, LogsArgs,
    PageArgs, QueuesCommand, RegisterArgs, ShowWorkflowArgs, StatusArgs, SubmitArgs,
    TenantsCommand, WaitArgs, WorkflowsCommand,
};
use body::InputError;
use client::{Accepted, ApiError, Client, Kind};
use poll::{Outcome, Waited};
use serde_json::{Value, json};

/// Returns the command line as `taskfleet` reads it: each flag's environment variable in
/// `--help`, and a variable set to the empty string read as unset.
pub fn command() -> clap::Command {
    use clap::CommandFactory as _;
    taskfleet_common::settings::with_environment(Cli::command())
}

/// Parses the process's arguments and environment; `Err` is clap's help, version or usage
/// message.
pub fn parse() -> Result<Cli, clap::Error> {
    use clap::FromArgMatches as _;
    let matches = command().try_get_matches()?;
    Cli::from_arg_matches(&matches)
}

/// Runs a parsed command line and returns the process's exit code: 0 for success, 1 for a
/// failed or cancelled run and for any error, 2 when a wait timed out.
pub async fn run(cli: Cli) -> ExitCode {
    let printer = Printer { output: cli.output };
    let api_key = cli.api_key.as_deref().map(str::trim);
    let connection = Connection {
        api_url: cli.api_url.trim(),
        api_key,
        ca_cert: cli.ca_cert.as_deref(),
    };
    match dispatch(cli.command, &connection, printer).await {
        Ok(exit) => exit.into(),
        Err(error) => {
            eprintln!("taskfleet: error: {error}");
            if api_key.is_none() && matches!(&error, CliError::Api(api) if api.is_unauthorized()) {
                eprintln!("(no API key was sent: set TASKFLEET_API_KEY or pass --api-key)");
            }
            ExitCode::FAILURE
        }
    }
}

/// How a command that ran to the end wants the process to exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// The command did what was asked (and any run it waited for succeeded).
    Success,
    /// The run or job that was waited for failed or was cancelled.
    RunFailed,
    /// The wait ran out of time before the run or job finished.
    TimedOut,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        match exit {
            Exit::Success => ExitCode::SUCCESS,
            Exit::RunFailed => ExitCode::from(1),
            Exit::TimedOut => ExitCode::from(2),
        }
    }
}

/// An error that stops a command: bad local input or a failed API call.
#[derive(Debug)]
enum CliError {
    /// An argument, file or standard input could not be used.
    Input(InputError),
    /// The scheduler could not be reached or answered with an error.
    Api(ApiError),
    /// A workflow run was not found by an id that may be a job's.
    RunNotFound(ApiError),
    /// The result could not be written to stdout.
    Output(std::io::Error),
    /// A run has no step of that id (the run's id, the step's).
    NoSuchStep(String, String),
}

impl fmt::Display for CliError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Input(error) => error.fmt(formatter),
            Self::Api(error) => error.fmt(formatter),
            Self::RunNotFound(error) => {
                write!(formatter, "{error}\n(if it is a job's id, add --job)")
            }
            Self::Output(error) => write!(formatter, "writing to stdout: {error}"),
            Self::NoSuchStep(run, step) => write!(formatter, "run {run} has no step {step:?}"),
        }
    }
}

impl std::error::Error for CliError {}

impl From<InputError> for CliError {
    fn from(error: InputError) -> Self {
        Self::Input(error)
    }
}

impl From<ApiError> for CliError {
    fn from(error: ApiError) -> Self {
        Self::Api(error)
    }
}

/// Prints answers as `--output` asks: for people, or as the API's JSON.
#[derive(Debug, Clone, Copy)]
struct Printer {
    output: Output,
}

impl Printer {
    /// Prints `answer`: its text rendering, or the JSON itself.
    fn print(self, answer: &Value, render: impl FnOnce(&Value) -> String) -> Result<(), CliError> {
        match self.output {
            Output::Text => emit(&render(answer)),
            Output::Json => emit(&report::pretty(answer)),
        }
    }
}

/// How to reach the API: its URL, the key to send and the CA to trust.
struct Connection<'a> {
    api_url: &'a str,
    api_key: Option<&'a str>,
    ca_cert: Option<&'a std::path::Path>,
}

/// Runs one command with a client of the API that `connection` names.
async fn dispatch(
    command: Command,
    connection: &Connection<'_>,
    printer: Printer,
) -> Result<Exit, CliError> {
    if let Command::Completions(completions_args) = command {
        return completions(&completions_args);
    }
    let client = Client::new(connection.api_url, connection.api_key, connection.ca_cert)?;
    match command {
        Command::Submit(submit_args) => submit(&client, printer, submit_args).await,
        Command::Enqueue(enqueue_args) => enqueue(&client, printer, enqueue_args).await,
        Command::Status(status_args) => status(&client, printer, status_args).await,
        Command::Wait(wait_args) => wait(&client, printer, wait_args).await,
        Command::Cancel(args) => act(&client, printer, args, "cancel").await,
        Command::Retry(args) => act(&client, printer, args, "retry").await,
        Command::Runs(runs_args) => {
            let filters = vec![
                ("status", runs_args.status),
                ("workflow", runs_args.workflow),
            ];
            let listing = (["v1", "runs"].as_slice(), "runs");
            list_page(
                &client,
                printer,
                listing,
                filters,
                runs_args.page,
                text::runs,
            )
            .await
        }
        Command::Jobs(jobs_args) => {
            let filters = vec![("status", jobs_args.status)];
            let listing = (["v1", "tasks"].as_slice(), "jobs");
            list_page(
                &client,
                printer,
                listing,
                filters,
                jobs_args.page,
                text::jobs,
            )
            .await
        }
        Command::Logs(logs_args) => logs(&client, printer, logs_args).await,
        Command::Workflows(workflows_args) => match workflows_args.command {
            None | Some(WorkflowsCommand::List) => {
                show(&client, printer, &["v1", "workflows"], text::workflows).await
            }
            Some(WorkflowsCommand::Show(show_args)) => {
                show_workflow(&client, printer, show_args).await
            }
            Some(WorkflowsCommand::Register(register_args)) => {
                register(&client, printer, register_args).await
            }
        },
        Command::Workers => show(&client, printer, &["v1", "workers"], text::workers).await,
        Command::Queues(queues_args) => match queues_args.command {
            None | Some(QueuesCommand::List) => {
                show(&client, printer, &["v1", "queues"], text::queues).await
            }
            Some(QueuesCommand::Show { queue }) => {
                show(
                    &client,
                    printer,
                    &["v1", "queues", &queue],
                    text::queue_settings,
                )
                .await
            }
            Some(QueuesCommand::Set(set_args)) => {
                let body = json!({ "rate_limit_per_s": set_args.rate_limit_per_s });
                let answer = client
                    .put(&["v1", "queues", &set_args.queue], &body)
                    .await?;
                printer.print(&answer, text::queue_settings)?;
                Ok(Exit::Success)
            }
        },
        Command::Stats => show(&client, printer, &["v1", "stats"], text::stats).await,
        Command::Tenants(tenants_args) => match tenants_args.command {
            TenantsCommand::List => show(&client, printer, &["v1", "tenants"], text::tenants).await,
            TenantsCommand::Set(set_args) => {
                let body = json!({
                    "submissions_per_s": set_args.submissions_per_s,
                    "runs_in_flight": set_args.runs_in_flight,
                });
                let answer = client
                    .put(&["v1", "tenants", &set_args.tenant], &body)
                    .await?;
                printer.print(&answer, |answer| {
                    text::tenants(&json!({ "tenants": [answer] }))
                })?;
                Ok(Exit::Success)
            }
        },
        Command::Audit(audit_args) => {
            let listing = (["v1", "audit"].as_slice(), "audit");
            list_page(
                &client,
                printer,
                listing,
                Vec::new(),
                audit_args.page,
                text::audit,
            )
            .await
        }
        Command::DeadLetters(dead_letters_args) => match dead_letters_args.command {
            None => list_dead_letters(&client, printer, dead_letters_args.list.limit).await,
            Some(DeadLettersCommand::List(list_args)) => {
                list_dead_letters(&client, printer, list_args.limit).await
            }
            Some(DeadLettersCommand::Purge) => {
                let answer = client
                    .post(&["v1", "dead-letters:purge"], &json!({}))
                    .await?;
                printer.print(&answer, text::purged_dead_letters)?;
                Ok(Exit::Success)
            }
        },
        Command::Schedules(schedules_args) => {
            schedules::run(&client, printer, schedules_args.command).await
        }
        Command::Keys(keys_args) => match keys_args.command {
            KeysCommand::Create(create_args) => create_key(&client, printer, create_args).await,
            KeysCommand::List => show(&client, printer, &["v1", "keys"], text::keys).await,
            KeysCommand::Revoke(revoke_args) => {
                let answer = client.delete(&["v1", "keys", &revoke_args.id]).await?;
                printer.print(&answer, |answer| {
                    format!(
                        "key {} revoked",
                        answer["id"].as_str().unwrap_or(&revoke_args.id)
                    )
                })?;
                Ok(Exit::Success)
            }
        },
        Command::Completions(_) => Ok(Exit::Success),
    }
}

/// `taskfleet keys create`: makes a key; as text, its secret is the last line.
async fn create_key(
    client: &Client,
    printer: Printer,
    create_args: CreateKeyArgs,
) -> Result<Exit, CliError> {
    let mut request = json!({"tenant": create_args.tenant, "scopes": create_args.scopes});
    if let Some(description) = create_args.description {
        request["description"] = Value::String(description);
    }
    let answer = client.post(&["v1", "keys"], &request).await?;
    printer.print(&answer, |answer| {
        let scopes: Vec<&str> = answer["scopes"]
            .as_array()
            .map(|scopes| scopes.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        format!(
            "API key {} for tenant {} with scopes {} (shown only now):\n{}",
            answer["id"].as_str().unwrap_or("?"),
            answer["tenant"].as_str().unwrap_or("?"),
            scopes.join(","),
            answer["key"].as_str().unwrap_or("?")
        )
    })?;
    Ok(Exit::Success)
}

/// `taskfleet dead-letters [list]`: lists the first dead letters, and how many there are.
async fn list_dead_letters(
    client: &Client,
    printer: Printer,
    limit: Option<u32>,
) -> Result<Exit, CliError> {
    let query = [("limit", limit.map(|limit| limit.to_string()))];
    let answer = client
        .get_with_query(&["v1", "dead-letters"], &query)
        .await?;
    printer.print(&answer, text::dead_letters)?;
    Ok(Exit::Success)
}

/// `taskfleet completions`: prints the completion script of a shell.
fn completions(completions_args: &CompletionsArgs) -> Result<Exit, CliError> {
    let mut script = Vec::new();
    clap_complete::generate(
        completions_args.shell,
        &mut command(),
        "taskfleet",
        &mut script,
    );
    emit(String::from_utf8_lossy(&script).trim_end())?;
    Ok(Exit::Success)
}

/// `taskfleet runs`, `jobs` and `audit`: lists a page of the API's listing at `segments`,
/// newest first, with `filters`; as text, says on stderr how to list the next page.
async fn list_page(
    client: &Client,
    printer: Printer,
    (segments, command): (&[&str], &str),
    filters: Vec<(&str, Option<String>)>,
    page: PageArgs,
    render: fn(&Value) -> String,
) -> Result<Exit, CliError> {
    let query: Vec<(&str, Option<String>)> = filters.into_iter().chain(page.query()).collect();
    let answer = client.get_with_query(segments, &query).await?;
    printer.print(&answer, render)?;
    if printer.output == Output::Text
        && let Some(line) = text::next_page(&answer, command)
    {
        eprintln!("{line}");
    }
    Ok(Exit::Success)
}

/// `taskfleet logs`: prints each step's (or one step's) logs under a line naming the step.
async fn logs(client: &Client, printer: Printer, logs_args: LogsArgs) -> Result<Exit, CliError> {
    let kind = Kind::from_job_flag(logs_args.job);
    let run = client
        .show(kind, &logs_args.id, None)
        .await
        .map_err(|error| lookup_error(kind, error))?;
    let steps = report::logged_steps(&run, logs_args.step.as_deref())
        .map_err(|step| CliError::NoSuchStep(logs_args.id.clone(), step))?;
    match printer.output {
        Output::Text => emit(&report::logs(&steps))?,
        Output::Json => emit(&report::pretty(&json!({"id": run["id"], "steps": steps})))?,
    }
    Ok(Exit::Success)
}

/// `taskfleet workers`, `queues`, `stats` and `workflows list`: prints what the API answers at
/// a path.
async fn show(
    client: &Client,
    printer: Printer,
    segments: &[&str],
    render: fn(&Value) -> String,
) -> Result<Exit, CliError> {
    let answer = client.get(segments).await?;
    printer.print(&answer, render)?;
    Ok(Exit::Success)
}

/// `taskfleet cancel` and `taskfleet retry`: does `action` to a run or job and prints the
/// answer, its status.
async fn act(
    client: &Client,
    printer: Printer,
    args: StatusArgs,
    action: &str,
) -> Result<Exit, CliError> {
    let kind = Kind::from_job_flag(args.job);
    let answer = client
        .act(kind, &args.id, action)
        .await
        .map_err(|error| lookup_error(kind, error))?;
    printer.print(&answer, |answer| {
        let status = answer["status"].as_str().unwrap_or_default();
        format!("{} {} {status}", kind.noun(), args.id)
    })?;
    Ok(Exit::Success)
}

/// `taskfleet workflows show`: prints a workflow's definition (as text, the definition alone,
/// ready to edit and register again).
async fn show_workflow(
    client: &Client,
    printer: Printer,
    show_args: ShowWorkflowArgs,
) -> Result<Exit, CliError> {
    let answer = client
        .workflows(Some(&show_args.name), show_args.version)
        .await?;
    printer.print(&answer, |answer| report::pretty(&answer["definition"]))?;
    Ok(Exit::Success)
}

/// `taskfleet workflows register`: registers a definition file under its name.
async fn register(
    client: &Client,
    printer: Printer,
    register_args: RegisterArgs,
) -> Result<Exit, CliError> {
    let (name, definition) =
        body::definition_to_register(&register_args.file, register_args.name.as_deref())?;
    let (mut answer, created) = client.register(&name, &definition).await?;
    answer["created"] = Value::Bool(created);
    printer.print(&answer, |answer| {
        let version = &answer["version"];
        if created {
            format!("registered workflow {name} version {version}")
        } else {
            format!("workflow {name} unchanged (version {version})")
        }
    })?;
    Ok(Exit::Success)
}

/// `taskfleet submit`: starts a run; with `--wait`, waits for it like `taskfleet wait`.
async fn submit(
    client: &Client,
    printer: Printer,
    submit_args: SubmitArgs,
) -> Result<Exit, CliError> {
    let request_body = body::run_request(&submit_args)?;
    let accepted = client.create(Kind::Run, &request_body).await?;
    created(
        client,
        printer,
        Kind::Run,
        &accepted,
        submit_args.wait.then_some(submit_args.timeout),
    )
    .await
}

/// `taskfleet enqueue`: enqueues a job; with `--wait`, waits for it like `taskfleet wait --job`.
async fn enqueue(
    client: &Client,
    printer: Printer,
    enqueue_args: EnqueueArgs,
) -> Result<Exit, CliError> {
    let request_body = body::job_request(&enqueue_args)?;
    let accepted = client.create(Kind::Job, &request_body).await?;
    created(
        client,
        printer,
        Kind::Job,
        &accepted,
        enqueue_args.wait.then_some(enqueue_args.timeout),
    )
    .await
}

/// Prints an accepted run or job (its id, as text), or waits for it when `wait` holds the
/// wait's time limit.
async fn created(
    client: &Client,
    printer: Printer,
    kind: Kind,
    accepted: &Accepted,
    wait: Option<Option<Duration>>,
) -> Result<Exit, CliError> {
    let Some(timeout) = wait else {
        match printer.output {
            Output::Text => emit(&accepted.id)?,
            Output::Json => emit(&report::accepted(accepted))?,
        }
        return Ok(Exit::Success);
    };
    eprintln!(
        "{} {} submitted ({})",
        kind.noun(),
        accepted.id,
        accepted.status
    );
    wait_and_report(client, printer, kind, &accepted.id, timeout).await
}

/// `taskfleet status`: shows a run or job.
async fn status(
    client: &Client,
    printer: Printer,
    status_args: StatusArgs,
) -> Result<Exit, CliError> {
    let kind = Kind::from_job_flag(status_args.job);
    let run = client
        .show(kind, &status_args.id, None)
        .await
        .map_err(|error| lookup_error(kind, error))?;
    printer.print(&run, |run| text::run(kind, run))?;
    Ok(Exit::Success)
}

/// `taskfleet wait`: waits for an existing run or job to finish.
async fn wait(client: &Client, printer: Printer, wait_args: WaitArgs) -> Result<Exit, CliError> {
    let kind = Kind::from_job_flag(wait_args.job);
    wait_and_report(client, printer, kind, &wait_args.id, wait_args.timeout).await
}

/// Waits for a run or job, then prints its output (stdout) or what went wrong (stderr); with
/// `--output json`, prints the run as last seen on stdout whatever came of it.
async fn wait_and_report(
    client: &Client,
    printer: Printer,
    kind: Kind,
    id: &str,
    timeout: Option<Duration>,
) -> Result<Exit, CliError> {
    let waited = poll::wait_until_finished(client, kind, id, timeout)
        .await
        .map_err(|error| lookup_error(kind, error))?;
    let (exit, run) = match &waited {
        Waited::Finished(Outcome::Succeeded, run) => (Exit::Success, run),
        Waited::Finished(outcome, run) => {
            eprintln!("{}", report::failure(kind, id, *outcome, run));
            (Exit::RunFailed, run)
        }
        Waited::TimedOut(run) => {
            eprintln!("{}", report::timed_out(kind, id, timeout, run));
            (Exit::TimedOut, run)
        }
    };
    match printer.output {
        Output::Json => emit(&report::pretty(run))?,
        Output::Text if exit == Exit::Success => emit(&report::pretty(&run["output"]))?,
        Output::Text => {}
    }
    Ok(exit)
}

/// Writes a result line to stdout. A reader that went away early (`taskfleet status … | head`)
/// is not an error worth reporting; any other write failure is.
fn emit(text: &str) -> Result<(), CliError> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(CliError::Output(error))
        }
        _ => Ok(()),
    }
}

/// Returns the error of looking a run or job up, with a hint when a run id was not found,
/// since jobs and runs have ids of the same form.
fn lookup_error(kind: Kind, error: ApiError) -> CliError {
    if kind == Kind::Run && error.is_not_found() {
        CliError::RunNotFound(error)
    } else {
        CliError::Api(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_args(args: &[&str]) -> Result<Cli, clap::Error> {
        use clap::FromArgMatches as _;
        let matches = command()
            .mut_args(|arg| arg.env(None))
            .try_get_matches_from(args)?;
        Cli::from_arg_matches(&matches)
    }

    #[test]
    fn api_url_and_output_have_defaults_and_flags_anywhere() {
        let cli = parse_args(&["taskfleet", "stats"]).expect("the command line parses");
        assert_eq!(cli.api_url, "http://127.0.0.1:8080");
        assert_eq!(cli.output, Output::Text);
        let cli = parse_args(&[
            "taskfleet",
            "runs",
            "--output",
            "json",
            "--api-url",
            "http://h:1",
        ])
        .expect("the command line parses");
        assert_eq!(cli.api_url, "http://h:1");
        assert_eq!(cli.output, Output::Json);
        assert!(parse_args(&["taskfleet", "stats", "--output", "yaml"]).is_err());
    }

    #[test]
    fn help_names_the_environment_variables() {
        let help = command().render_long_help().to_string();
        assert!(help.contains("TASKFLEET_API_URL"), "{help}");
        assert!(help.contains("TASKFLEET_OUTPUT"), "{help}");
    }

    #[test]
    fn enqueue_needs_exactly_one_step() {
        assert!(parse_args(&["taskfleet", "enqueue"]).is_err());
        assert!(
            parse_args(&["taskfleet", "enqueue", "--python", "m:f", "--dataflow", "."]).is_err()
        );
        assert!(parse_args(&["taskfleet", "enqueue", "step.json", "--step", "{}"]).is_err());
        assert!(parse_args(&["taskfleet", "enqueue", "--dataflow", ".", "--queue", "q"]).is_ok());
    }

    #[test]
    fn dead_letters_lists_without_a_subcommand() {
        let cli = parse_args(&["taskfleet", "dead-letters", "--limit", "5"])
            .expect("the command line parses");
        assert!(matches!(
            cli.command,
            Command::DeadLetters(args) if args.command.is_none() && args.list.limit == Some(5)
        ));
        let cli = parse_args(&["taskfleet", "dead-letters", "list", "--limit", "7"])
            .expect("the command line parses");
        assert!(matches!(
            cli.command,
            Command::DeadLetters(args)
                if matches!(&args.command, Some(DeadLettersCommand::List(list)) if list.limit == Some(7))
        ));
        assert!(parse_args(&["taskfleet", "dead-letters", "purge"]).is_ok());
        assert!(parse_args(&["taskfleet", "dead-letters", "purge", "--limit", "5"]).is_err());
        assert!(parse_args(&["taskfleet", "dead-letters", "--limit", "0"]).is_err());
    }

    #[test]
    fn workflows_lists_without_a_subcommand() {
        let cli = parse_args(&["taskfleet", "workflows"]).expect("the command line parses");
        assert!(matches!(cli.command, Command::Workflows(args) if args.command.is_none()));
        assert!(parse_args(&["taskfleet", "workflows", "register"]).is_err());
        assert!(parse_args(&["taskfleet", "workflows", "show", "w", "--version", "2"]).is_ok());
    }
}
