//! The command line: commands and flags, and the parsing of flag values into typed ones.
//!
//! It does no I/O; reading files and standard input belongs to [`crate::body`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Runs workflows on a taskfleet fleet through the scheduler's HTTP API.
#[derive(Debug, Parser)]
#[command(name = "taskfleet", version, about)]
pub struct Cli {
    /// The scheduler's base URL
    #[arg(
        long,
        global = true,
        value_name = "URL",
        env = "TASKFLEET_API_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub api_url: String,
    /// The API key sent with every request (`Authorization: Bearer`)
    #[arg(long, global = true, value_name = "KEY", env = "TASKFLEET_API_KEY")]
    pub api_key: Option<String>,
    /// A PEM file of CA certificates to trust for an https:// API URL, besides the system's
    #[arg(long, global = true, value_name = "PATH", env = "TASKFLEET_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// How results are printed: text for people, json for scripts (one JSON document on stdout)
    #[arg(
        long,
        global = true,
        value_name = "FORMAT",
        env = "TASKFLEET_OUTPUT",
        default_value = "text"
    )]
    pub output: Output,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Tables and summaries for people; a run's output as indented JSON.
    Text,
    /// The API's answers as JSON, one document per command.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Starts a run of a registered workflow or of a definition file
    ///
    /// Without --wait, prints the run's id (with --output json, {"id", "status"}). With --wait,
    /// prints the run's output as JSON when it succeeds (exit 0), or its error on stderr when it
    /// fails or is cancelled (exit 1); exit 2 when --timeout runs out first. With --wait and
    /// --output json, prints the whole run, whatever its outcome.
    Submit(SubmitArgs),
    /// Enqueues one step as a job (POST /v1/tasks)
    ///
    /// The step comes from a file, standard input (-), --step JSON, or --python / --dataflow.
    /// Prints and waits like submit.
    Enqueue(EnqueueArgs),
    /// Shows a run (or, with --job, a job): its status, steps, error and output
    Status(StatusArgs),
    /// Waits for a run (or, with --job, a job) to finish and prints its output as JSON
    ///
    /// Exits 0 when it succeeded, 1 when it failed or was cancelled, 2 when --timeout ran out.
    Wait(WaitArgs),
    /// Cancels a run (or, with --job, a job): no new step starts and running ones are stopped
    Cancel(StatusArgs),
    /// Runs a failed or cancelled run (or, with --job, a job) again from its failed, cancelled
    /// and unstarted steps; the steps that succeeded keep their outputs
    Retry(StatusArgs),
    /// Lists workflow runs, newest first
    Runs(RunsArgs),
    /// Lists jobs, newest first
    Jobs(JobsArgs),
    /// Prints what each step of a run (or, with --job, a job) printed and logged
    Logs(LogsArgs),
    /// Lists, shows and registers workflows (without a subcommand: lists them)
    Workflows(WorkflowsArgs),
    /// Lists the live workers: queues, concurrency, tasks running, last heartbeat
    Workers,
    /// Lists the task queues (tasks ready, in flight, consumers), shows or sets a queue's rate
    /// limit (without a subcommand: lists them)
    Queues(QueuesArgs),
    /// Prints the counts of runs and tasks by status
    Stats,
    /// Lists, shows, sets, pauses, resumes and deletes schedules (without a subcommand: lists
    /// them)
    Schedules(SchedulesArgs),
    /// Makes, lists and revokes API keys (an admin key's work)
    Keys(KeysArgs),
    /// Lists and sets tenants' quotas (an admin key's work)
    Tenants(TenantsArgs),
    /// Lists what keys did: keys made and revoked, cancellations, quota changes (admin)
    Audit(AuditArgs),
    /// Lists the dead letters, messages that name no task, without taking them off their queue,
    /// or purges them (admin; without a subcommand: lists them)
    DeadLetters(DeadLettersArgs),
    /// Prints a shell completion script (bash, zsh, fish, elvish, powershell)
    ///
    /// For example: taskfleet completions bash > /etc/bash_completion.d/taskfleet
    Completions(CompletionsArgs),
}

/// The arguments of `taskfleet schedules`.
#[derive(Debug, Args)]
pub struct SchedulesArgs {
    /// What to do with schedules.
    #[command(subcommand)]
    pub command: Option<SchedulesCommand>,
}

/// The subcommands of `taskfleet schedules`.
#[derive(Debug, Subcommand)]
pub enum SchedulesCommand {
    /// Lists the schedules with their next fire time
    List,
    /// Shows a schedule: what it runs, when, its next fire times and its last ticks
    Show(ScheduleNameArgs),
    /// Makes a schedule, or replaces what it says
    ///
    /// For example: taskfleet schedules set nightly --workflow orders --cron '0 2 * * *'
    /// --timezone Europe/Paris --overlap skip
    Set(Box<SetScheduleArgs>),
    /// Deletes a schedule (its runs stay)
    Delete(ScheduleNameArgs),
    /// Pauses a schedule: no tick fires until it is resumed
    Pause(ScheduleNameArgs),
    /// Resumes a paused schedule from its next tick to come
    Resume(ScheduleNameArgs),
}

/// A schedule's name.
#[derive(Debug, Args)]
pub struct ScheduleNameArgs {
    /// The schedule's name
    #[arg(value_name = "NAME")]
    pub name: String,
}

/// The arguments of `taskfleet schedules set`.
#[derive(Debug, Args)]
pub struct SetScheduleArgs {
    /// The schedule's name
    #[arg(value_name = "NAME")]
    pub name: String,
    /// A cron expression: 5 fields (minute hour day-of-month month day-of-week) or 6 (seconds
    /// first)
    #[arg(long, value_name = "EXPR")]
    pub cron: String,
    /// The registered workflow to run
    #[arg(long, value_name = "NAME", required_unless_present = "definition")]
    pub workflow: Option<String>,
    /// The registered workflow's version [default: its latest at each tick]
    #[arg(long, value_name = "N", requires = "workflow", value_parser = clap::value_parser!(u32).range(1..=i64::from(i32::MAX)))]
    pub version: Option<u32>,
    /// A file holding the definition to run (- for standard input)
    #[arg(long, value_name = "FILE", conflicts_with = "workflow")]
    pub definition: Option<PathBuf>,
    /// The runs' input.
    #[command(flatten)]
    pub input: InputArgs,
    /// The IANA time zone the expression is read in [default: UTC]
    #[arg(long, value_name = "TZ")]
    pub timezone: Option<String>,
    /// What a tick does while the previous run is unfinished [default: allow]
    #[arg(long, value_name = "POLICY", value_parser = ["allow", "skip"])]
    pub overlap: Option<String>,
    /// What happens to ticks missed while no scheduler ran [default: none]
    #[arg(long, value_name = "POLICY", value_parser = ["none", "last"])]
    pub catch_up: Option<String>,
    /// Makes (or leaves) the schedule paused
    #[arg(long)]
    pub paused: bool,
}

/// The arguments of `taskfleet tenants`.
#[derive(Debug, Args)]
pub struct TenantsArgs {
    /// What to do with tenants.
    #[command(subcommand)]
    pub command: TenantsCommand,
}

/// The subcommands of `taskfleet tenants`.
#[derive(Debug, Subcommand)]
pub enum TenantsCommand {
    /// Lists the tenants that have quotas
    List,
    /// Sets a tenant's quotas; a quota not given is no limit
    Set(SetQuotaArgs),
}

/// The arguments of `taskfleet tenants set`.
#[derive(Debug, Args)]
pub struct SetQuotaArgs {
    /// The tenant
    #[arg(value_name = "TENANT")]
    pub tenant: String,
    /// The most runs and jobs it may submit per second, across the fleet
    #[arg(long, value_name = "N")]
    pub submissions_per_s: Option<u32>,
    /// The most of its runs and jobs unfinished at once
    #[arg(long, value_name = "N")]
    pub runs_in_flight: Option<u32>,
}

/// The arguments of `taskfleet queues`.
#[derive(Debug, Args)]
pub struct QueuesArgs {
    /// What to do with queues (default: list them).
    #[command(subcommand)]
    pub command: Option<QueuesCommand>,
}

/// The subcommands of `taskfleet queues`.
#[derive(Debug, Subcommand)]
pub enum QueuesCommand {
    /// Lists the task queues: tasks ready, in flight, consumers
    List,
    /// Shows a queue's settings (an admin key's work)
    Show {
        /// The queue
        #[arg(value_name = "QUEUE")]
        queue: String,
    },
    /// Sets a queue's rate limit across the fleet; without --rate-limit-per-s, none (an admin
    /// key's work)
    Set(SetQueueArgs),
}

/// The arguments of `taskfleet queues set`.
#[derive(Debug, Args)]
pub struct SetQueueArgs {
    /// The queue
    #[arg(value_name = "QUEUE")]
    pub queue: String,
    /// The most starts per second of the queue's tasks, of every tenant, across the fleet
    /// (fractions allowed)
    #[arg(long, value_name = "N")]
    pub rate_limit_per_s: Option<f64>,
}

/// The arguments of `taskfleet audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// The page to list.
    #[command(flatten)]
    pub page: PageArgs,
}

/// The arguments of `taskfleet dead-letters`: a subcommand, or those of `list`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DeadLettersArgs {
    /// What to do with the dead letters.
    #[command(subcommand)]
    pub command: Option<DeadLettersCommand>,
    /// Listing them without a subcommand.
    #[command(flatten)]
    pub list: ListDeadLettersArgs,
}

/// The subcommands of `taskfleet dead-letters`.
#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// Lists the first messages (oldest first) with their reason, source, time, size and the
    /// start of their body, and how many there are; nothing is taken off the queue
    List(ListDeadLettersArgs),
    /// Removes every message from the dead-letters queue and prints how many there were
    Purge,
}

/// The arguments of `taskfleet dead-letters list`.
#[derive(Debug, Args)]
pub struct ListDeadLettersArgs {
    /// The most messages listed, 1 to 1000 [default: the API's: 50]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: Option<u32>,
}

/// The arguments of `taskfleet keys`.
#[derive(Debug, Args)]
pub struct KeysArgs {
    /// What to do with keys.
    #[command(subcommand)]
    pub command: KeysCommand,
}

/// The subcommands of `taskfleet keys`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Makes a key and prints it (as text, on the last line); it is shown only now
    Create(CreateKeyArgs),
    /// Lists the keys, without their secrets
    List,
    /// Revokes a key: every scheduler refuses it within a second
    Revoke(RevokeKeyArgs),
}

pub use taskfleet_common::settings::NewKeyArgs as CreateKeyArgs;

/// The arguments of `taskfleet keys revoke`.
#[derive(Debug, Args)]
pub struct RevokeKeyArgs {
    /// The key's id (from `taskfleet keys list`), not its secret
    #[arg(value_name = "KEY_ID")]
    pub id: String,
}

/// The arguments of `taskfleet completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete in
    #[arg(value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

/// Which page of a listing to list.
#[derive(Debug, Args)]
pub struct PageArgs {
    /// The most listed, 1 to 1000 [default: the API's: 50, or 100 for audit]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: Option<u32>,
    /// Where to go on from: the `next_cursor` of a previous listing
    #[arg(long, value_name = "CURSOR")]
    pub cursor: Option<String>,
}

impl PageArgs {
    /// Returns the listing's query pairs of the page.
    pub fn query(self) -> [(&'static str, Option<String>); 2] {
        [
            ("limit", self.limit.map(|limit| limit.to_string())),
            ("cursor", self.cursor),
        ]
    }
}

/// The arguments of `taskfleet jobs`.
#[derive(Debug, Args)]
pub struct JobsArgs {
    /// Only jobs in this status (pending, running, succeeded, failed, cancelled)
    #[arg(long, value_name = "STATUS")]
    pub status: Option<String>,
    /// The page to list.
    #[command(flatten)]
    pub page: PageArgs,
}

/// The arguments of `taskfleet enqueue`.
#[derive(Debug, Args)]
#[command(group(
    clap::ArgGroup::new("the_step")
        .required(true)
        .args(["file", "step", "python", "dataflow"])
))]
pub struct EnqueueArgs {
    /// A file holding the step as JSON ({"python": ...} or {"dataflow": ...} with any of a
    /// step's fields), or - to read it from standard input
    #[arg(value_name = "STEP_FILE", conflicts_with_all = ["step", "python", "dataflow"])]
    pub file: Option<PathBuf>,
    /// The step itself, as JSON text
    #[arg(long, value_name = "JSON", conflicts_with_all = ["python", "dataflow"])]
    pub step: Option<String>,
    /// A Python function to run, module.path:function
    #[arg(long, value_name = "REF", conflicts_with = "dataflow")]
    pub python: Option<String>,
    /// A jq program to run
    #[arg(long, value_name = "PROGRAM")]
    pub dataflow: Option<String>,
    /// The queue to send it to [default: the step's, else default]
    #[arg(long, value_name = "QUEUE")]
    pub queue: Option<String>,
    /// The job's input.
    #[command(flatten)]
    pub input: InputArgs,
    /// Seconds before the job is dispatched
    #[arg(long, value_name = "SECONDS", conflicts_with = "not_before")]
    pub delay: Option<f64>,
    /// The time (RFC 3339, such as 2026-12-24T18:00:00Z) before which the job is not dispatched
    #[arg(long, value_name = "TIME")]
    pub not_before: Option<String>,
    /// A key that makes the enqueueing idempotent: repeating it returns the existing job
    #[arg(long, value_name = "K")]
    pub idempotency_key: Option<String>,
    /// Waits for the job to finish and prints its output
    #[arg(long)]
    pub wait: bool,
    /// With --wait, gives up after this many seconds (exit 2) [default: no limit]
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds, requires = "wait")]
    pub timeout: Option<Duration>,
}

/// The arguments of `taskfleet workflows`.
#[derive(Debug, Args)]
pub struct WorkflowsArgs {
    /// What to do with workflows.
    #[command(subcommand)]
    pub command: Option<WorkflowsCommand>,
}

/// The subcommands of `taskfleet workflows`.
#[derive(Debug, Subcommand)]
pub enum WorkflowsCommand {
    /// Lists the registered workflows (the latest version of each)
    List,
    /// Shows a workflow's definition (its latest version, or --version N)
    Show(ShowWorkflowArgs),
    /// Registers a definition file as a new version of a workflow (unchanged if identical)
    Register(RegisterArgs),
}

/// The arguments of `taskfleet workflows show`.
#[derive(Debug, Args)]
pub struct ShowWorkflowArgs {
    /// The workflow's name
    #[arg(value_name = "NAME")]
    pub name: String,
    /// The version to show [default: the latest]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=i64::from(i32::MAX)))]
    pub version: Option<u32>,
}

/// The arguments of `taskfleet workflows register`.
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// A file holding the definition as JSON, or - to read it from standard input
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// The name to register it under, replacing the definition's own [default: its "name"]
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
}

/// The arguments of `taskfleet runs`.
#[derive(Debug, Args)]
pub struct RunsArgs {
    /// Only runs in this status (pending, running, succeeded, failed, cancelled)
    #[arg(long, value_name = "STATUS")]
    pub status: Option<String>,
    /// Only runs of this workflow
    #[arg(long, value_name = "NAME")]
    pub workflow: Option<String>,
    /// The page to list.
    #[command(flatten)]
    pub page: PageArgs,
}

/// The arguments of `taskfleet logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The run's (or job's) id
    #[arg(value_name = "RUN_ID")]
    pub id: String,
    /// Only this step's logs
    #[arg(long, value_name = "STEP")]
    pub step: Option<String>,
    /// The id is a job's (POST /v1/tasks), not a workflow run's
    #[arg(long)]
    pub job: bool,
}

/// The arguments of `taskfleet submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// A registered workflow's name, a definition file (an existing file, or any name ending
    /// in .json), or - to read the definition from standard input
    #[arg(
        value_name = "WORKFLOW_OR_FILE",
        required_unless_present = "definition",
        conflicts_with = "definition"
    )]
    pub target: Option<String>,
    /// The definition itself, as JSON text
    #[arg(long, value_name = "JSON")]
    pub definition: Option<String>,
    /// The run's input.
    #[command(flatten)]
    pub input: InputArgs,
    /// The version of the registered workflow to run [default: the latest]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=i64::from(i32::MAX)))]
    pub version: Option<u32>,
    /// A key that makes the submission idempotent: repeating it returns the existing run
    #[arg(long, value_name = "K")]
    pub idempotency_key: Option<String>,
    /// Seconds before the run's first steps are dispatched
    #[arg(long, value_name = "SECONDS", conflicts_with = "not_before")]
    pub delay: Option<f64>,
    /// The time (RFC 3339, such as 2026-12-24T18:00:00Z) before which the run's first steps
    /// are not dispatched
    #[arg(long, value_name = "TIME")]
    pub not_before: Option<String>,
    /// Waits for the run to finish and prints its output
    #[arg(long)]
    pub wait: bool,
    /// With --wait, gives up after this many seconds (exit 2) [default: no limit]
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds, requires = "wait")]
    pub timeout: Option<Duration>,
}

/// Where a run's or job's input comes from; without either flag the input is `null`.
#[derive(Debug, Args)]
pub struct InputArgs {
    /// The input as JSON text
    #[arg(long, value_name = "JSON", conflicts_with = "input_file")]
    pub input: Option<String>,
    /// A file holding the input as JSON; - reads standard input
    #[arg(long, value_name = "PATH")]
    pub input_file: Option<PathBuf>,
}

/// The arguments of `taskfleet status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The run's (or job's) id
    #[arg(value_name = "RUN_ID")]
    pub id: String,
    /// The id is a job's (POST /v1/tasks), not a workflow run's
    #[arg(long)]
    pub job: bool,
}

/// The arguments of `taskfleet wait`.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// The run's (or job's) id
    #[arg(value_name = "RUN_ID")]
    pub id: String,
    /// The id is a job's (POST /v1/tasks), not a workflow run's
    #[arg(long)]
    pub job: bool,
    /// Gives up after this many seconds (exit 2) [default: no limit]
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub timeout: Option<Duration>,
}

/// Parses a number of seconds (fractions allowed, 0 or more) into a duration.
fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(seconds.is_finite() && seconds >= 0.0) {
        return Err(format!("{text:?} is not a number of seconds, 0 or more"));
    }
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{text:?} seconds is too long"))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn check(text: &str, expected: Option<Duration>) {
        assert_eq!(parse_seconds(text).ok(), expected, "{text:?}");
    }

    #[test]
    fn seconds_parse_as_non_negative_durations() {
        check("0", Some(Duration::ZERO));
        check("30", Some(Duration::from_secs(30)));
        check("1.5", Some(Duration::from_millis(1500)));
        check("-1", None);
        check("NaN", None);
        check("inf", None);
        check("1e300", None);
        check("soon", None);
    }

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn submit_version_does_not_clash_with_the_program_version() {
        let cli = Cli::try_parse_from(["taskfleet", "submit", "orders", "--version", "3"]);
        let Ok(Cli {
            command: Command::Submit(submit_args),
            ..
        }) = cli
        else {
            panic!("submit should parse: {cli:?}");
        };
        assert_eq!(submit_args.version, Some(3));
    }

    #[test]
    fn input_flags_conflict_and_timeout_needs_wait() {
        assert!(
            Cli::try_parse_from([
                "taskfleet",
                "submit",
                "w",
                "--input",
                "1",
                "--input-file",
                "-"
            ])
            .is_err()
        );
        assert!(Cli::try_parse_from(["taskfleet", "submit", "w", "--timeout", "5"]).is_err());
        assert!(Cli::try_parse_from(["taskfleet", "submit", "w", "--version", "0"]).is_err());
    }
}
