//! Planning: given a run's definition, its input and what its steps have done so far, decides
//! which steps start next (with their inputs), which are skipped, and whether the run is over.
//!
//! Logic on values: no I/O, no clock. jq programs come compiled from the runner's
//! `ProgramCache` and run where the [`ProgramRunner`] decides (a sandbox process, for all but
//! quick ones).

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};
use taskfleet_common::definition::{StepDefinition, WorkflowDefinition, limits};
use taskfleet_common::error::DATAFLOW_ERROR;
use taskfleet_common::{StepError, StepStatus};

use super::programs::{ProgramFailure, ProgramRunner};

/// Why planning halted: nothing it decided may be written, and the run is planned again later
/// (its completions go back to the broker; a request is answered 503).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Halted {
    /// The scheduler is shutting down.
    #[error("planning stopped: the scheduler is shutting down")]
    ShuttingDown,
    /// No jq sandbox could run a program (one could not be started, or ended for no reason the
    /// program gives): a fault of the scheduler's host, not of the run.
    #[error("planning waits for a jq sandbox: {0}")]
    SandboxUnavailable(String),
}

/// Why a step's program gave no value.
enum Blocked {
    /// The step fails with this error.
    Fails(StepError),
    /// Planning halts.
    Halted(Halted),
}

impl From<StepError> for Blocked {
    fn from(error: StepError) -> Self {
        Self::Fails(error)
    }
}

/// What a planned step of a run has done so far.
#[derive(Debug, Clone, PartialEq)]
pub struct StepState {
    /// Pending while queued or running; otherwise how it finished.
    pub status: StepStatus,
    /// The output of a succeeded step.
    pub output: Option<Value>,
    /// The error of a failed step.
    pub error: Option<StepError>,
}

impl StepState {
    fn with_status(status: StepStatus) -> Self {
        Self {
            status,
            output: None,
            error: None,
        }
    }
}

/// A decision about one step that had no state yet.
#[derive(Debug, Clone, PartialEq)]
pub enum Planned {
    /// The step is ready: dispatch it with this input.
    Dispatch {
        /// The step.
        step_id: String,
        /// Its input.
        input: Value,
        /// The values of its limits' key programs.
        keys: Keys,
    },
    /// The step runs once per item, in parallel; an empty `items` means it succeeded at once
    /// with the output `[]`.
    FanOut {
        /// The step.
        step_id: String,
        /// The items, each the input of one task.
        items: Vec<Value>,
        /// The values of the limits' key programs for each item, in the order of `items`;
        /// empty when the step's limits have no key program.
        keys: Vec<Keys>,
    },
    /// The step does not run; its output is null.
    Skip {
        /// The step.
        step_id: String,
    },
    /// The step failed before it could be dispatched (its `input` or `when` program failed).
    Fail {
        /// The step.
        step_id: String,
        /// Why.
        error: StepError,
    },
}

/// The values a step's limit key programs (`rate_limit.key`, `concurrency.key`) yielded for
/// one task's input, as JSON; none for a limit without a key program.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Keys {
    /// `rate_limit.key`'s value.
    pub rate: Option<String>,
    /// `concurrency.key`'s value.
    pub concurrency: Option<String>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEnd {
    /// Every step succeeded or was skipped.
    Succeeded {
        /// The run's output.
        output: Value,
    },
    /// A step failed.
    Failed {
        /// The run's error: the step's error with the step's id.
        error: Value,
    },
}

/// What to do next with a run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Advance {
    /// Decisions about steps that had no state.
    pub planned: Vec<Planned>,
    /// Set when the run is over.
    pub end: Option<RunEnd>,
}

/// Runs the program `source` of a step's `field`, compiled through the runner's cache; any
/// failure is the step's `dataflow_error`.
fn run_program(
    programs: &dyn ProgramRunner,
    field: &str,
    source: &str,
    input: Value,
) -> Result<Value, Blocked> {
    let program = programs
        .cache()
        .get(source)
        .map_err(|error| StepError::new(DATAFLOW_ERROR, error.to_string()))?;
    programs
        .run(&program, input)
        .map_err(|failure| match failure {
            ProgramFailure::Failed(message) => Blocked::Fails(StepError::new(
                DATAFLOW_ERROR,
                format!("`{field}` program failed: {message}"),
            )),
            ProgramFailure::Stopped => Blocked::Halted(Halted::ShuttingDown),
            ProgramFailure::Unavailable(reason) => {
                Blocked::Halted(Halted::SandboxUnavailable(reason))
            }
        })
}

/// Computes a step's input from the run input and the outputs of its dependencies: its `input`
/// program if it has one, else the run input (no `after`), the one dependency's output, or an
/// object keyed by dependency id.
fn step_input(
    programs: &dyn ProgramRunner,
    step: &StepDefinition,
    run_input: &Value,
    states: &BTreeMap<String, StepState>,
) -> Result<Value, Blocked> {
    let output_of = |id: &str| {
        states
            .get(id)
            .and_then(|state| state.output.clone())
            .unwrap_or(Value::Null)
    };
    if let Some(program) = &step.input {
        let steps: Map<String, Value> = states
            .iter()
            .filter(|(_, state)| state.status.is_finished())
            .map(|(id, state)| (id.clone(), state.output.clone().unwrap_or(Value::Null)))
            .collect();
        let scope = json!({"input": run_input, "steps": steps});
        return run_program(programs, "input", program, scope);
    }
    Ok(match step.after.as_slice() {
        [] => run_input.clone(),
        [single] => output_of(single),
        several => Value::Object(
            several
                .iter()
                .map(|id| (id.clone(), output_of(id)))
                .collect(),
        ),
    })
}

/// Returns whether a jq value counts as true (everything but `false` and `null`).
fn truthy(value: &Value) -> bool {
    !matches!(value, Value::Bool(false) | Value::Null)
}

/// Decides what happens next in a run. `states` holds every step that has been planned; steps
/// missing from it have not started. Planning repeats until nothing changes, so that a skipped
/// step makes its dependents ready in the same call. Fails only when the runner stops
/// (the scheduler shuts down).
pub fn advance(
    programs: &dyn ProgramRunner,
    definition: &WorkflowDefinition,
    run_input: &Value,
    states: &BTreeMap<String, StepState>,
) -> Result<Advance, Halted> {
    let mut states = states.clone();
    let mut planned = Vec::new();
    loop {
        let mut changed = false;
        for step in &definition.steps {
            if states.contains_key(&step.id) {
                continue;
            }
            let deps: Vec<StepStatus> = step
                .after
                .iter()
                .map(|id| {
                    states
                        .get(id)
                        .map_or(StepStatus::Pending, |state| state.status)
                })
                .collect();
            if !deps.iter().all(|status| status.is_finished()) {
                continue;
            }
            if deps
                .iter()
                .any(|status| matches!(status, StepStatus::Failed | StepStatus::Cancelled))
            {
                // The run is failing; its remaining steps never start.
                continue;
            }
            let decision = if !deps.is_empty() && deps.iter().all(|s| *s == StepStatus::Skipped) {
                Planned::Skip {
                    step_id: step.id.clone(),
                }
            } else {
                decide(programs, step, run_input, &states)?
            };
            let state = match &decision {
                Planned::Dispatch { .. } => StepState::with_status(StepStatus::Pending),
                Planned::FanOut { items, .. } if items.is_empty() => StepState {
                    output: Some(Value::Array(Vec::new())),
                    ..StepState::with_status(StepStatus::Succeeded)
                },
                Planned::FanOut { .. } => StepState::with_status(StepStatus::Pending),
                Planned::Skip { .. } => StepState::with_status(StepStatus::Skipped),
                Planned::Fail { error, .. } => StepState {
                    error: Some(error.clone()),
                    ..StepState::with_status(StepStatus::Failed)
                },
            };
            states.insert(step.id.clone(), state);
            planned.push(decision);
            changed = true;
        }
        if !changed {
            break;
        }
    }
    let end = run_end(definition, &states);
    Ok(Advance { planned, end })
}

/// Decides what one step whose dependencies all finished does.
fn decide(
    programs: &dyn ProgramRunner,
    step: &StepDefinition,
    run_input: &Value,
    states: &BTreeMap<String, StepState>,
) -> Result<Planned, Halted> {
    match try_decide(programs, step, run_input, states) {
        Ok(planned) => Ok(planned),
        Err(Blocked::Fails(error)) => Ok(Planned::Fail {
            step_id: step.id.clone(),
            error,
        }),
        Err(Blocked::Halted(halted)) => Err(halted),
    }
}

fn try_decide(
    programs: &dyn ProgramRunner,
    step: &StepDefinition,
    run_input: &Value,
    states: &BTreeMap<String, StepState>,
) -> Result<Planned, Blocked> {
    let input = step_input(programs, step, run_input, states)?;
    if let Err(error) = taskfleet_common::value::check(&input) {
        return Err(Blocked::Fails(StepError::new(
            DATAFLOW_ERROR,
            format!("the step's input cannot be sent: {error}"),
        )));
    }
    if let Err(too_large) = taskfleet_common::value::check_size(&input, programs.max_value_bytes())
    {
        return Err(Blocked::Fails(StepError::new(
            DATAFLOW_ERROR,
            format!("the step's input is {too_large}"),
        )));
    }
    if let Some(when) = &step.when {
        let verdict = run_program(programs, "when", when, input.clone())?;
        if !truthy(&verdict) {
            return Ok(Planned::Skip {
                step_id: step.id.clone(),
            });
        }
    }
    let Some(for_each) = &step.for_each else {
        let keys = keys(programs, step, &input)?;
        return Ok(Planned::Dispatch {
            step_id: step.id.clone(),
            input,
            keys,
        });
    };
    let items = items(
        run_program(programs, "for_each", for_each, input)?,
        programs.max_value_bytes(),
    )?;
    let keys = if step.key_programs().next().is_some() {
        items
            .iter()
            .map(|item| keys(programs, step, item))
            .collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    Ok(Planned::FanOut {
        step_id: step.id.clone(),
        items,
        keys,
    })
}

/// Runs the step's limit key programs on one task's input; a program that fails, or yields
/// anything but a string, number or boolean, fails the step.
fn keys(
    programs: &dyn ProgramRunner,
    step: &StepDefinition,
    input: &Value,
) -> Result<Keys, Blocked> {
    let key = |field: &str, source: Option<&String>| -> Result<Option<String>, Blocked> {
        let Some(source) = source else {
            return Ok(None);
        };
        let value = run_program(programs, field, source, input.clone())?;
        limits::key_value(field, &value)
            .map(Some)
            .map_err(|message| Blocked::Fails(StepError::new(DATAFLOW_ERROR, message)))
    };
    Ok(Keys {
        rate: key(
            "rate_limit.key",
            step.rate_limit.as_ref().and_then(|rate| rate.key.as_ref()),
        )?,
        concurrency: key(
            "concurrency.key",
            step.concurrency
                .as_ref()
                .and_then(|limit| limit.key.as_ref()),
        )?,
    })
}

/// The most items one `for_each` step may fan out to.
pub const MAX_ITEMS: usize = 100_000;

/// Returns the items a `for_each` program yielded: an array of at most [`MAX_ITEMS`] values
/// that can each be sent.
fn items(value: Value, max_value_bytes: usize) -> Result<Vec<Value>, StepError> {
    let Value::Array(items) = value else {
        return Err(StepError::new(
            DATAFLOW_ERROR,
            format!("`for_each` must yield an array, not {}", json_type(&value)),
        ));
    };
    if items.len() > MAX_ITEMS {
        return Err(StepError::new(
            DATAFLOW_ERROR,
            format!(
                "`for_each` yielded {} items, more than the limit of {MAX_ITEMS}",
                items.len()
            ),
        ));
    }
    for (index, item) in items.iter().enumerate() {
        if let Err(error) = taskfleet_common::value::check(item) {
            return Err(StepError::new(
                DATAFLOW_ERROR,
                format!("`for_each` item {index} cannot be sent: {error}"),
            ));
        }
        if let Err(too_large) = taskfleet_common::value::check_size(item, max_value_bytes) {
            return Err(StepError::new(
                DATAFLOW_ERROR,
                format!("`for_each` item {index} is {too_large}"),
            ));
        }
    }
    Ok(items)
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Returns how the run ended, if it has: failed as soon as a step failed, succeeded once every
/// step succeeded or was skipped.
fn run_end(
    definition: &WorkflowDefinition,
    states: &BTreeMap<String, StepState>,
) -> Option<RunEnd> {
    let failed = definition.steps.iter().find_map(|step| {
        let state = states.get(&step.id)?;
        (state.status == StepStatus::Failed).then_some((step, state))
    });
    if let Some((step, state)) = failed {
        let error = state
            .error
            .clone()
            .unwrap_or_else(|| StepError::new("unknown", "step failed"));
        return Some(RunEnd::Failed {
            error: run_error(&step.id, &error),
        });
    }
    let all_done = definition.steps.iter().all(|step| {
        states.get(&step.id).is_some_and(|state| {
            matches!(state.status, StepStatus::Succeeded | StepStatus::Skipped)
        })
    });
    all_done.then(|| {
        let outputs = states
            .iter()
            .map(|(id, state)| (id.clone(), state.output.clone().unwrap_or(Value::Null)))
            .collect();
        RunEnd::Succeeded {
            output: definition.run_output(&outputs),
        }
    })
}

/// Returns the run error for a failed step: the step's error, with the step named.
pub fn run_error(step_id: &str, error: &StepError) -> Value {
    let mut value = json!({
        "step": step_id,
        "type": error.kind,
        "message": format!("step {step_id:?} failed: {}", error.message),
    });
    if let Some(traceback) = &error.traceback {
        value["traceback"] = Value::String(traceback.clone());
    }
    value
}

#[cfg(test)]
mod tests {
    use taskfleet_common::jq::ProgramCache;

    use super::*;

    fn definition(value: Value) -> WorkflowDefinition {
        let definition: WorkflowDefinition = serde_json::from_value(value).expect("parses");
        definition
            .validate(&ProgramCache::default())
            .expect("valid");
        definition
    }

    fn done(output: Value) -> StepState {
        StepState {
            output: Some(output),
            ..StepState::with_status(StepStatus::Succeeded)
        }
    }

    fn check(
        def: &WorkflowDefinition,
        input: Value,
        states: &[(&str, StepState)],
        expected_planned: Vec<Planned>,
        expected_end: Option<RunEnd>,
    ) {
        let states = states
            .iter()
            .map(|(id, state)| ((*id).to_owned(), state.clone()))
            .collect();
        let advance = advance(&ProgramCache::default(), def, &input, &states).expect("planned");
        assert_eq!(advance.planned, expected_planned);
        assert_eq!(advance.end, expected_end);
    }

    fn dispatch(step: &str, input: Value) -> Planned {
        Planned::Dispatch {
            step_id: step.into(),
            input,
            keys: Keys::default(),
        }
    }

    #[test]
    fn chain_runs_step_by_step() {
        let def = definition(json!({"steps": [
            {"id": "a", "dataflow": "."},
            {"id": "b", "dataflow": ".", "after": ["a"]}]}));
        check(&def, json!(1), &[], vec![dispatch("a", json!(1))], None);
        check(
            &def,
            json!(1),
            &[("a", done(json!(2)))],
            vec![dispatch("b", json!(2))],
            None,
        );
        check(
            &def,
            json!(1),
            &[("a", done(json!(2))), ("b", done(json!(3)))],
            vec![],
            Some(RunEnd::Succeeded { output: json!(3) }),
        );
    }

    #[test]
    fn several_dependencies_give_an_object_and_input_programs_see_everything() {
        let def = definition(json!({"steps": [
            {"id": "a", "dataflow": "."},
            {"id": "b", "dataflow": "."},
            {"id": "c", "dataflow": ".", "after": ["a", "b"]},
            {"id": "d", "dataflow": ".", "after": ["a", "b"], "input": "{x: .input, s: .steps.a}"}]}));
        check(
            &def,
            json!("in"),
            &[("a", done(json!(1))), ("b", done(json!(2)))],
            vec![
                dispatch("c", json!({"a": 1, "b": 2})),
                dispatch("d", json!({"x": "in", "s": 1})),
            ],
            None,
        );
    }

    #[test]
    fn when_false_skips_and_skips_propagate() {
        let def = definition(json!({"steps": [
            {"id": "a", "dataflow": ".", "when": ". > 5"},
            {"id": "b", "dataflow": ".", "after": ["a"]}]}));
        check(
            &def,
            json!(1),
            &[],
            vec![
                Planned::Skip {
                    step_id: "a".into(),
                },
                Planned::Skip {
                    step_id: "b".into(),
                },
            ],
            Some(RunEnd::Succeeded {
                output: Value::Null,
            }),
        );
    }

    #[test]
    fn a_failed_input_program_fails_the_run_naming_the_step() {
        let def = definition(json!({"steps": [
            {"id": "a", "dataflow": ".", "input": "error(\"nope\")"}]}));
        let states = BTreeMap::new();
        let advance = advance(&ProgramCache::default(), &def, &json!(1), &states).expect("planned");
        let Some(RunEnd::Failed { error }) = advance.end else {
            panic!("run should fail: {advance:?}");
        };
        assert_eq!(error["step"], "a");
        assert_eq!(error["type"], DATAFLOW_ERROR);
        assert!(
            error["message"]
                .as_str()
                .is_some_and(|m| m.contains("nope"))
        );
    }

    #[test]
    fn a_failed_step_fails_the_run_and_stops_planning() {
        let def = definition(json!({"steps": [
            {"id": "a", "dataflow": "."},
            {"id": "b", "dataflow": "."},
            {"id": "c", "dataflow": ".", "after": ["a", "b"]}]}));
        let failed = StepState {
            error: Some(StepError::new("ValueError", "bad")),
            ..StepState::with_status(StepStatus::Failed)
        };
        let advance = advance(
            &ProgramCache::default(),
            &def,
            &json!(1),
            &[("a".to_owned(), failed), ("b".to_owned(), done(json!(1)))].into(),
        )
        .expect("planned");
        assert!(advance.planned.is_empty());
        assert!(matches!(advance.end, Some(RunEnd::Failed { .. })));
    }
}
