//! The `taskfleet` binary: reads the environment, parses the command line and runs the command on
//! a current-thread runtime. Everything else lives in the library so that it can be tested.

// A command-line client's output is its interface: results go to stdout, diagnostics to stderr.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::env::VarError;
use std::process::ExitCode;

use clap::Parser;
use taskfleet_cli::{API_URL_ENV, Cli, resolve_api_url};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_exit(&error),
    };
    let env_api_url = match std::env::var(API_URL_ENV) {
        Ok(value) => Some(value),
        Err(VarError::NotPresent) => None,
        Err(VarError::NotUnicode(_)) => {
            eprintln!("taskfleet: error: {API_URL_ENV} is not valid UTF-8");
            return ExitCode::FAILURE;
        }
    };
    let api_url = resolve_api_url(cli.api_url.as_deref(), env_api_url.as_deref());
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("taskfleet: error: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(taskfleet_cli::run(cli.command, &api_url))
}

/// Prints a command-line parsing outcome (help, version or a usage error) and returns the exit
/// code: 0 for help and version, 1 for a usage error, since 2 means a timed-out wait.
fn usage_exit(error: &clap::Error) -> ExitCode {
    if let Err(print_error) = error.print() {
        eprintln!("taskfleet: error: printing usage: {print_error}");
    }
    if error.use_stderr() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
