//! How every taskfleet program reads flags from the environment (clap's `env` support: a flag
//! wins over its variable, a variable over the default).

/// Returns `command` as this project reads settings: an argument whose environment variable is
/// set but empty reads as if the variable were unset (shells and env files often leave variables
/// empty, and an empty value is never a setting), and `--help` names each variable without
/// showing its value (URLs hold passwords).
pub fn with_environment(command: clap::Command) -> clap::Command {
    command.mut_args(|arg| {
        let empty = arg
            .get_env()
            .and_then(std::env::var_os)
            .is_some_and(|value| value.is_empty());
        let arg = arg.hide_env_values(true);
        if empty { arg.env(None) } else { arg }
    })
}

/// What a new API key is: the arguments of `taskfleet-scheduler create-key` and of
/// `taskfleet keys create`.
#[derive(Debug, Clone, clap::Args)]
pub struct NewKeyArgs {
    /// The tenant whose runs, jobs and workflows the key reaches
    #[arg(long)]
    pub tenant: String,
    /// What the key may do, comma-separated: runs:read, runs:write, workflows:write,
    /// python_code, admin
    #[arg(long, value_delimiter = ',', required = true)]
    pub scopes: Vec<String>,
    /// What the key is for
    #[arg(long)]
    pub description: Option<String>,
}
