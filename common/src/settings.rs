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
