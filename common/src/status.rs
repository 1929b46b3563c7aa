//! Statuses of runs and steps, with the lowercase names used by the API and the database.

use serde::{Deserialize, Serialize};

macro_rules! status_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
    };
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
