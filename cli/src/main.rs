//! The `taskfleet` binary: parses the command line (and the environment variables its flags
//! name) and runs the command on a current-thread runtime. Everything else lives in the library
//! so that it can be tested.

// A command-line client's output is its interface: results go to stdout, diagnostics to stderr.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match taskfleet_cli::parse() {
        Ok(cli) => cli,
        Err(error) => return usage_exit(&error),
    };
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
    runtime.block_on(taskfleet_cli::run(cli))
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
