//! Statuses of runs, steps and stored tasks, and the kinds of runs, with the lowercase names used
//! by the API and the database. Each converts from its stored text (`TryFrom<String>`, which
//! the scheduler's rows use) and back (`as_str`), so no other code spells them.

use serde::{Deserialize, Serialize};

macro_rules! status_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Returns the lowercase name used in the API and the database.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }

            /// Returns the status named `text`, if it is one.
            pub fn parse(text: &str) -> Option<Self> {
                match text {
                    $($text => Some(Self::$variant),)+
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownName;

            fn from_str(text: &str) -> Result<Self, UnknownName> {
                Self::parse(text).ok_or_else(|| UnknownName {
                    what: stringify!($name),
                    text: text.to_owned(),
                })
            }
        }

        impl TryFrom<String> for $name {
            type Error = UnknownName;

            fn try_from(text: String) -> Result<Self, UnknownName> {
                text.parse()
            }
        }
    };
}

/// Describes a name that is none of a status's (or kind's) names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a {what}")]
pub struct UnknownName {
    /// The type it was read as.
    pub what: &'static str,
    /// The text read.
    pub text: String,
}

status_enum!(
    /// Where a run (or a job) stands.
    RunStatus {
        /// Accepted; no step has been dispatched yet.
        Pending => "pending",
        /// At least one step is dispatched or running.
        Running => "running",
        /// Every step finished and the output is known.
        Succeeded => "succeeded",
        /// A step failed; the run's error names it.
        Failed => "failed",
        /// Cancelled through the API.
        Cancelled => "cancelled",
    }
);

status_enum!(
    /// Where one step of a run stands.
    StepStatus {
        /// Waiting for its dependencies, or dispatched and not yet picked up by a worker.
        Pending => "pending",
        /// A worker holds it.
        Running => "running",
        /// Finished with an output.
        Succeeded => "succeeded",
        /// Finished with an error.
        Failed => "failed",
        /// Stopped because its run was cancelled or failed elsewhere.
        Cancelled => "cancelled",
        /// Not run because its `when` program was false or all of its dependencies were skipped.
        Skipped => "skipped",
    }
);

status_enum!(
    /// Where a task row stands in the scheduler's record: one attempt of a step (or of one item
    /// of a `for_each` step) after another, until it ends.
    TaskStatus {
        /// Planned and not yet finished: waiting for its time, dispatched, or running.
        Queued => "queued",
        /// Finished with an output.
        Succeeded => "succeeded",
        /// Finished with an error (after its retries).
        Failed => "failed",
        /// Stopped before it finished: its run was cancelled or ended otherwise.
        Cancelled => "cancelled",
        /// Never run: its `when` program was false or all of its dependencies were skipped.
        Skipped => "skipped",
    }
);

status_enum!(
    /// What kind of run a run row is.
    RunKind {
        /// A run of a workflow (`/v1/runs`).
        Workflow => "workflow",
        /// A job: a run of a single step (`/v1/tasks`).
        Job => "job",
    }
);

impl TaskStatus {
    /// Returns whether no further change can happen to a task in this status.
    pub fn is_finished(self) -> bool {
        self != Self::Queued
    }

    /// Returns the status of the step this task is the row of, for planning: a queued task's
    /// step is pending.
    pub fn step_status(self) -> StepStatus {
        match self {
            Self::Queued => StepStatus::Pending,
            Self::Succeeded => StepStatus::Succeeded,
            Self::Failed => StepStatus::Failed,
            Self::Cancelled => StepStatus::Cancelled,
            Self::Skipped => StepStatus::Skipped,
        }
    }
}

impl RunStatus {
    /// Returns whether no further change can happen to a run in this status.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

impl StepStatus {
    /// Returns whether no further change can happen to a step in this status.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Cancelled | Self::Skipped
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for status in [
            TaskStatus::Queued,
            TaskStatus::Succeeded,
            TaskStatus::Failed,
            TaskStatus::Cancelled,
            TaskStatus::Skipped,
        ] {
            assert_eq!(TaskStatus::try_from(status.as_str().to_owned()), Ok(status));
        }
        assert_eq!("job".parse::<RunKind>(), Ok(RunKind::Job));
        assert_eq!(RunStatus::Running.to_string(), "running");
        assert_eq!(
            "queued"
                .parse::<RunStatus>()
                .map_err(|error| error.to_string()),
            Err("\"queued\" is not a RunStatus".to_owned())
        );
        assert_eq!(
            serde_json::to_value(TaskStatus::Cancelled).ok(),
            Some(serde_json::json!("cancelled"))
        );
    }

    #[test]
    fn a_queued_task_is_a_pending_step() {
        assert_eq!(TaskStatus::Queued.step_status(), StepStatus::Pending);
        assert!(!TaskStatus::Queued.is_finished());
        assert_eq!(TaskStatus::Skipped.step_status(), StepStatus::Skipped);
        assert!(TaskStatus::Skipped.is_finished());
    }
}
