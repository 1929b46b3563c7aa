//! The `taskfleet` command-line client of the scheduler's HTTP API (`docs/api.md`).
//!
//! The library owns the commands: building request bodies from arguments, talking HTTP, waiting
//! for runs to finish and printing results. It never reads the process environment; `main` does
//! that and passes the API URL in.

// A command-line client's output is its interface: results go to stdout, diagnostics to stderr.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod args;
mod body;
mod client;
mod poll;
mod report;

use std::fmt;
use std::process::ExitCode;
use std::time::Duration;

pub use args::{Cli, Command};

use args::{LogsArgs, RunsArgs, StatusArgs, SubmitArgs, WaitArgs, WorkflowsArgs};
use body::InputError;
use client::{ApiError, Client, Kind};
use poll::{Outcome, Waited};

/// The environment variable naming the scheduler's base URL.
pub const API_URL_ENV: &str = "TASKFLEET_API_URL";

/// The scheduler's base URL when neither `--api-url` nor the environment names one.
pub const DEFAULT_API_URL: &str = "http://127.0.0.1:8080";

/// Returns the API URL to use: the flag, else a non-empty environment value, else the default.
pub fn resolve_api_url(flag: Option<&str>, env: Option<&str>) -> String {
    flag.or(env.filter(|value| !value.trim().is_empty()))
        .unwrap_or(DEFAULT_API_URL)
        .trim()
        .to_owned()
}

/// Runs one command against the API at `api_url` and returns the process's exit code: 0 for
/// success, 1 for a failed or cancelled run and for any error, 2 when a wait timed out.
pub async fn run(command: Command, api_url: &str) -> ExitCode {
    match dispatch(command, api_url).await {
        Ok(exit) => exit.into(),
        Err(error) => {
            eprintln!("taskfleet: error: {error}");
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

/// Runs one command with a client of the API at `api_url`.
async fn dispatch(command: Command, api_url: &str) -> Result<Exit, CliError> {
    let client = Client::new(api_url)?;
    match command {
        Command::Submit(submit_args) => submit(&client, submit_args).await,
        Command::Status(status_args) => status(&client, status_args).await,
        Command::Wait(wait_args) => wait(&client, wait_args).await,
        Command::Cancel(cancel_args) => cancel(&client, cancel_args).await,
        Command::Workflows(workflows_args) => workflows(&client, workflows_args).await,
        Command::Workers => show(&client, &["v1", "workers"]).await,
        Command::Queues => show(&client, &["v1", "queues"]).await,
        Command::Stats => show(&client, &["v1", "stats"]).await,
        Command::Runs(runs_args) => runs(&client, runs_args).await,
        Command::Logs(logs_args) => logs(&client, logs_args).await,
    }
}

/// `taskfleet runs`: lists workflow runs, newest first.
async fn runs(client: &Client, runs_args: RunsArgs) -> Result<Exit, CliError> {
    let answer = client
        .get_with_query(
            &["v1", "runs"],
            &[
                ("status", runs_args.status),
                ("workflow", runs_args.workflow),
                ("limit", runs_args.limit.map(|limit| limit.to_string())),
                ("cursor", runs_args.cursor),
            ],
        )
        .await?;
    emit(&report::pretty(&answer))?;
    Ok(Exit::Success)
}

/// `taskfleet logs`: prints each step's (or one step's) logs under a line naming the step.
async fn logs(client: &Client, logs_args: LogsArgs) -> Result<Exit, CliError> {
    let kind = Kind::from_job_flag(logs_args.job);
    let run = client
        .show(kind, &logs_args.id, None)
        .await
        .map_err(|error| lookup_error(kind, error))?;
    let text = report::logs(&run, logs_args.step.as_deref())
        .map_err(|step| CliError::NoSuchStep(logs_args.id.clone(), step))?;
    emit(&text)?;
    Ok(Exit::Success)
}

/// `taskfleet workers` and `taskfleet queues`: prints what the API answers at a path.
async fn show(client: &Client, segments: &[&str]) -> Result<Exit, CliError> {
    let answer = client.get(segments).await?;
    emit(&report::pretty(&answer))?;
    Ok(Exit::Success)
}

/// `taskfleet cancel`: cancels a run or job and prints the answer.
async fn cancel(client: &Client, cancel_args: StatusArgs) -> Result<Exit, CliError> {
    let kind = Kind::from_job_flag(cancel_args.job);
    let answer = client
        .cancel(kind, &cancel_args.id)
        .await
        .map_err(|error| lookup_error(kind, error))?;
    emit(&report::pretty(&answer))?;
    Ok(Exit::Success)
}

/// `taskfleet workflows`: lists workflows, or shows one.
async fn workflows(client: &Client, workflows_args: WorkflowsArgs) -> Result<Exit, CliError> {
    let answer = client
        .workflows(workflows_args.name.as_deref(), workflows_args.version)
        .await?;
    emit(&report::pretty(&answer))?;
    Ok(Exit::Success)
}

/// `taskfleet submit`: starts a run; with `--wait`, waits for it like `taskfleet wait`.
async fn submit(client: &Client, submit_args: SubmitArgs) -> Result<Exit, CliError> {
    let request_body = body::run_request(&submit_args)?;
    let accepted = client.submit(&request_body).await?;
    if !submit_args.wait {
        emit(&report::accepted(&accepted))?;
        return Ok(Exit::Success);
    }
    eprintln!("run {} submitted ({})", accepted.id, accepted.status);
    wait_and_report(client, Kind::Run, &accepted.id, submit_args.timeout).await
}

/// `taskfleet status`: prints a run or job as pretty JSON.
async fn status(client: &Client, status_args: StatusArgs) -> Result<Exit, CliError> {
    let kind = Kind::from_job_flag(status_args.job);
    let run = client
        .show(kind, &status_args.id, None)
        .await
        .map_err(|error| lookup_error(kind, error))?;
    emit(&report::pretty(&run))?;
    Ok(Exit::Success)
}

/// `taskfleet wait`: waits for an existing run or job to finish.
async fn wait(client: &Client, wait_args: WaitArgs) -> Result<Exit, CliError> {
    let kind = Kind::from_job_flag(wait_args.job);
    wait_and_report(client, kind, &wait_args.id, wait_args.timeout).await
}

/// Waits for a run or job, then prints its output (stdout) or what went wrong (stderr).
async fn wait_and_report(
    client: &Client,
    kind: Kind,
    id: &str,
    timeout: Option<Duration>,
) -> Result<Exit, CliError> {
    let waited = poll::wait_until_finished(client, kind, id, timeout)
        .await
        .map_err(|error| lookup_error(kind, error))?;
    match waited {
        Waited::Finished(Outcome::Succeeded, run) => {
            emit(&report::pretty(&run["output"]))?;
            Ok(Exit::Success)
        }
        Waited::Finished(outcome, run) => {
            eprintln!("{}", report::failure(kind, id, outcome, &run));
            Ok(Exit::RunFailed)
        }
        Waited::TimedOut(run) => {
            eprintln!("{}", report::timed_out(kind, id, timeout, &run));
            Ok(Exit::TimedOut)
        }
    }
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

    fn check(flag: Option<&str>, env: Option<&str>, expected: &str) {
        assert_eq!(resolve_api_url(flag, env), expected, "{flag:?} {env:?}");
    }

    #[test]
    fn api_url_prefers_flag_then_env_then_default() {
        check(Some("http://a:1"), Some("http://b:2"), "http://a:1");
        check(None, Some("http://b:2"), "http://b:2");
        check(None, Some("  "), DEFAULT_API_URL);
        check(None, None, DEFAULT_API_URL);
    }
}
