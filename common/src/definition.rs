//! Workflow definitions as users write them (`docs/workflows.md`), and their validation.
//!
//! Parsing (serde) rejects malformed JSON and unknown fields; [`WorkflowDefinition::validate`]
//! rejects definitions that parse but cannot run, naming the offending step. Nothing here runs a
//! step or touches a service.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::jq;
use crate::names;

pub mod limits;

pub use limits::{Concurrency, RateLimit};

/// The longest `timeout_s` a step may set: 7 days. A longer attempt would outlive any lease and
/// any broker's patience, and a larger number is almost always a unit mistake.
pub const MAX_TIMEOUT_S: f64 = 7.0 * 24.0 * 3600.0;

/// The longest a step id may be.
pub const MAX_STEP_ID_LEN: usize = 64;

/// A workflow: named steps with dependencies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(example = json!({
    "name": "orders",
    "steps": [
        {"id": "lines", "dataflow": "map(.qty * .unit_price)"},
        {"id": "total", "dataflow": "add", "after": ["lines"], "input": ".steps.lines"}
    ],
    "output": "total"
})))]
#[serde(deny_unknown_fields)]
pub struct WorkflowDefinition {
    /// The workflow's name; optional in an inline definition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The steps, in any order.
    pub steps: Vec<StepDefinition>,
    /// The id of the step whose output is the run's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Seconds a run may take, from its start, at most a year: a run still unfinished then is
    /// cancelled with error type `run_timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(exclusive_minimum = 0.0, maximum = 31536000.0)
    )]
    pub timeout_s: Option<f64>,
}

/// The longest `timeout_s` a run may set: a year.
pub const MAX_RUN_TIMEOUT_S: f64 = 365.0 * 24.0 * 3600.0;

/// One step of a workflow, or a job enqueued on its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct StepDefinition {
    /// Unique in the workflow, `[A-Za-z0-9_-]{1,64}`.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9_-]{1,64}$"))]
    pub id: String,
    /// A Python function, `"module.path:function"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python: Option<String>,
    /// Python source text that defines `main(input)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python_code: Option<String>,
    /// A jq program.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataflow: Option<String>,
    /// The ids of the steps this one waits for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// A jq program over `{"input", "steps"}` that computes the step's input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// A jq program over the step's input yielding the array to fan out over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_each: Option<String>,
    /// A jq program over the step's input; false skips the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// How failed attempts are retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// The longest one attempt may run, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    /// The task queue the step is dispatched to (default `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// 0 to 9, higher first (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(maximum = 9))]
    pub priority: Option<u8>,
    /// At most this many starts per second across the fleet (per key value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// At most this many attempts at once across the fleet (per key value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
}

/// Exponential backoff with jitter between attempts of a failed step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 to 100).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 100))]
    pub max_attempts: u32,
    /// The delay before the second attempt (at most 7 days).
    #[cfg_attr(feature = "openapi", schema(maximum = 604_800_000))]
    pub initial_backoff_ms: u64,
    /// The longest delay between two attempts (at most 7 days).
    #[cfg_attr(feature = "openapi", schema(maximum = 604_800_000))]
    pub max_backoff_ms: u64,
    /// The factor by which the delay grows after each attempt (at least 1).
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub multiplier: f64,
}

/// The longest delay between two attempts a retry policy may set: 7 days, as a step's
/// timeout.
pub const MAX_BACKOFF_MS: u64 = 7 * 24 * 3600 * 1000;

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff_ms: 200,
            max_backoff_ms: 30_000,
            multiplier: 2.0,
        }
    }
}

/// What a step runs, taken from its one kind field.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StepKind {
    /// A Python function named `module.path:function`.
    Python {
        /// The module path.
        module: String,
        /// The function in that module.
        function: String,
    },
    /// Python source text defining `main(input)`.
    PythonCode {
        /// The source text.
        source: String,
    },
    /// A jq program.
    Dataflow {
        /// The program text.
        program: String,
    },
}

/// One thing wrong with a definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Problem {
    /// The step concerned, if the problem belongs to one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// What is wrong, in a lowercase sentence that names the field.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.step {
            Some(step) => write!(f, "step {step:?}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Everything wrong with a definition, in the order found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid workflow definition: {}", join(.problems))]
pub struct ValidationError {
    /// The problems, at least one.
    pub problems: Vec<Problem>,
}

fn join(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Returns whether `id` is a valid step id.
pub fn is_valid_step_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_STEP_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn is_identifier(part: &str) -> bool {
    let mut chars = part.chars();
    matches!(chars.next(), Some(c) if c.is_alphabetic() || c == '_')
        && chars.all(|c| c.is_alphanumeric() || c == '_')
}

/// Splits a `"module.path:function"` reference, or returns `None` if it is not one.
pub fn parse_python_ref(reference: &str) -> Option<(&str, &str)> {
    let (module, function) = reference.split_once(':')?;
    let module_ok = module.split('.').all(is_identifier);
    (module_ok && is_identifier(function)).then_some((module, function))
}

impl StepDefinition {
    /// Returns what the step runs, or `None` if it does not name exactly one valid kind.
    pub fn kind(&self) -> Option<StepKind> {
        match (&self.python, &self.python_code, &self.dataflow) {
            (Some(reference), None, None) => {
                parse_python_ref(reference).map(|(module, function)| StepKind::Python {
                    module: module.to_owned(),
                    function: function.to_owned(),
                })
            }
            (None, Some(source), None) => Some(StepKind::PythonCode {
                source: source.clone(),
            }),
            (None, None, Some(program)) => Some(StepKind::Dataflow {
                program: program.clone(),
            }),
            _ => None,
        }
    }

    /// Returns the task queue the step goes to.
    pub fn queue(&self) -> &str {
        self.queue.as_deref().unwrap_or(names::DEFAULT_QUEUE)
    }

    /// Returns the key programs of the step's limits (`rate_limit.key`, `concurrency.key`),
    /// which planning runs on each of its tasks' inputs.
    pub fn key_programs(&self) -> impl Iterator<Item = &String> {
        let rate = self.rate_limit.as_ref().and_then(|rate| rate.key.as_ref());
        let concurrency = self
            .concurrency
            .as_ref()
            .and_then(|limit| limit.key.as_ref());
        rate.into_iter().chain(concurrency)
    }

    /// Returns the step's priority, 0 to 9.
    pub fn priority(&self) -> u8 {
        self.priority.unwrap_or(0)
    }

    /// Appends to `problems` everything wrong with this step taken alone; its jq programs are
    /// compiled through `programs`, so the planner and the executors find them compiled.
    fn check(&self, programs: &jq::ProgramCache, problems: &mut Vec<Problem>) {
        let mut problem = |message: String| {
            problems.push(Problem {
                step: Some(self.id.clone()),
                message,
            })
        };
        if !is_valid_step_id(&self.id) {
            problem("id must be 1 to 64 characters among A-Z a-z 0-9 _ -".to_owned());
        }
        let kinds = [
            self.python.is_some(),
            self.python_code.is_some(),
            self.dataflow.is_some(),
        ];
        match kinds.iter().filter(|set| **set).count() {
            0 => problem("needs one of `python`, `python_code` or `dataflow`".to_owned()),
            1 => {}
            _ => problem(
                "has more than one of `python`, `python_code` and `dataflow`; give exactly one"
                    .to_owned(),
            ),
        }
        if let Some(reference) = &self.python
            && parse_python_ref(reference).is_none()
        {
            problem(format!(
                "`python` reference {reference:?} is not of the form \"module.path:function\""
            ));
        }
        if let Some(source) = &self.python_code
            && source.trim().is_empty()
        {
            problem("`python_code` is empty; it must define main(input)".to_owned());
        }
        let sources = [
            ("dataflow", &self.dataflow),
            ("input", &self.input),
            ("for_each", &self.for_each),
            ("when", &self.when),
        ];
        for (field, source) in sources {
            if let Some(code) = source
                && let Err(error) = programs.get(code)
            {
                problem(format!("`{field}`: {error}"));
            }
        }
        if let Some(retry) = &self.retry {
            if retry.max_attempts == 0 || retry.max_attempts > 100 {
                problem("`retry.max_attempts` must be between 1 and 100".to_owned());
            }
            if !(retry.multiplier.is_finite() && retry.multiplier >= 1.0) {
                problem("`retry.multiplier` must be a number of at least 1".to_owned());
            }
            if retry.initial_backoff_ms > MAX_BACKOFF_MS || retry.max_backoff_ms > MAX_BACKOFF_MS {
                problem(format!(
                    "`retry.initial_backoff_ms` and `retry.max_backoff_ms` must be at most \
                     {MAX_BACKOFF_MS} (7 days)"
                ));
            }
            if retry.max_backoff_ms < retry.initial_backoff_ms {
                problem("`retry.max_backoff_ms` is below `retry.initial_backoff_ms`".to_owned());
            }
        }
        if let Some(timeout) = self.timeout_s
            && !(timeout.is_finite() && timeout > 0.0 && timeout <= MAX_TIMEOUT_S)
        {
            problem(format!(
                "`timeout_s` must be a positive number of seconds, at most {MAX_TIMEOUT_S} (7 days)"
            ));
        }
        if let Some(queue) = &self.queue
            && let Err(error) = names::check_queue_name(queue)
        {
            problem(format!("`queue`: {error}"));
        }
        if let Some(priority) = self.priority
            && priority > names::MAX_PRIORITY
        {
            problem(format!(
                "`priority` must be between 0 and {}",
                names::MAX_PRIORITY
            ));
        }
        limits::check(
            self.rate_limit.as_ref(),
            self.concurrency.as_ref(),
            programs,
            &mut problem,
        );
    }
}

impl WorkflowDefinition {
    /// Whether planning its steps runs jq programs (an `input`, `for_each`, `when`, or a
    /// limit's `key`); without them planning is quick work on values.
    pub fn plans_with_programs(&self) -> bool {
        self.steps.iter().any(|step| {
            step.input.is_some()
                || step.for_each.is_some()
                || step.when.is_some()
                || step.key_programs().next().is_some()
        })
    }

    /// Whether the programs its planning runs, if any, are all quick and compiled already
    /// ([`jq::ProgramCache::is_quick`]): only `input`, `when` and limit `key` programs, no
    /// `for_each`, whose planning may make thousands of tasks. On small values such planning
    /// is quick work; without programs it always is.
    pub fn plans_with_quick_programs(&self, programs: &jq::ProgramCache) -> bool {
        self.steps.iter().all(|step| {
            step.for_each.is_none()
                && [&step.input, &step.when]
                    .into_iter()
                    .flatten()
                    .chain(step.key_programs())
                    .all(|source| programs.is_quick(source))
        })
    }

    /// Checks the whole definition: each step, the references between steps, and that the
    /// steps form a DAG. Returns every problem found. Compiling its jq programs is most of the
    /// work, so they are compiled through `programs` (and kept there).
    pub fn validate(&self, programs: &jq::ProgramCache) -> Result<(), ValidationError> {
        let mut problems = Vec::new();
        // Stored as JSON in PostgreSQL, which refuses a NUL character in any string.
        if let Ok(json) = serde_json::to_value(self)
            && let Err(error) = crate::value::check(&json)
        {
            problems.push(Problem {
                step: None,
                message: format!("the definition cannot be stored: {error}"),
            });
        }
        if let Some(name) = &self.name
            && !names::is_valid_name(name)
        {
            problems.push(Problem {
                step: None,
                message: format!(
                    "workflow name {name:?} must be 1 to 64 characters among A-Z a-z 0-9 _ - ."
                ),
            });
        }
        if self.steps.is_empty() {
            problems.push(Problem {
                step: None,
                message: "a workflow needs at least one step".to_owned(),
            });
        }
        if let Some(timeout) = self.timeout_s
            && !(timeout.is_finite() && timeout > 0.0 && timeout <= MAX_RUN_TIMEOUT_S)
        {
            problems.push(Problem {
                step: None,
                message: format!(
                    "the workflow's `timeout_s` must be a positive number of seconds, at most \
                     {MAX_RUN_TIMEOUT_S} (a year)"
                ),
            });
        }
        let mut seen = BTreeSet::new();
        for step in &self.steps {
            step.check(programs, &mut problems);
            if !seen.insert(step.id.as_str()) {
                problems.push(Problem {
                    step: Some(step.id.clone()),
                    message: "id is used by more than one step".to_owned(),
                });
            }
        }
        for step in &self.steps {
            let mut deps = BTreeSet::new();
            for dep in &step.after {
                let message = if dep == &step.id {
                    Some(format!("`after` names the step itself ({dep:?})"))
                } else if !seen.contains(dep.as_str()) {
                    Some(format!("`after` names unknown step {dep:?}"))
                } else if !deps.insert(dep.as_str()) {
                    Some(format!("`after` names {dep:?} twice"))
                } else {
                    None
                };
                if let Some(message) = message {
                    problems.push(Problem {
                        step: Some(step.id.clone()),
                        message,
                    });
                }
            }
        }
        if let Some(output) = &self.output
            && !seen.contains(output.as_str())
        {
            problems.push(Problem {
                step: None,
                message: format!("`output` names unknown step {output:?}"),
            });
        }
        if problems.is_empty()
            && let Some(cycle) = self.find_cycle()
        {
            problems.push(Problem {
                step: cycle.first().cloned(),
                message: format!("`after` forms a cycle: {}", cycle.join(" -> ")),
            });
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ValidationError { problems })
        }
    }

    /// Returns the step with the given id.
    pub fn step(&self, id: &str) -> Option<&StepDefinition> {
        self.steps.iter().find(|step| step.id == id)
    }

    /// Returns the ids of the steps no other step waits for, in definition order.
    pub fn sinks(&self) -> Vec<&str> {
        let depended: BTreeSet<&str> = self
            .steps
            .iter()
            .flat_map(|step| step.after.iter().map(String::as_str))
            .collect();
        self.steps
            .iter()
            .map(|step| step.id.as_str())
            .filter(|id| !depended.contains(id))
            .collect()
    }

    /// Returns a cycle of `after` references as a list of step ids that starts and ends with the
    /// same id, if there is one. Assumes every `after` id names a step.
    fn find_cycle(&self) -> Option<Vec<String>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            Open,
            Done,
        }
        let index: HashMap<&str, usize> = self
            .steps
            .iter()
            .enumerate()
            .map(|(i, step)| (step.id.as_str(), i))
            .collect();
        let mut marks = vec![Mark::New; self.steps.len()];
        for start in 0..self.steps.len() {
            if marks[start] != Mark::New {
                continue;
            }
            // Iterative depth-first search; `path` holds the open steps with their next dependency.
            let mut path: Vec<(usize, usize)> = vec![(start, 0)];
            marks[start] = Mark::Open;
            while let Some((node, next)) = path.last_mut() {
                let node_id = *node;
                match self.steps[node_id].after.get(*next) {
                    Some(dep) => {
                        *next += 1;
                        let Some(&dep_index) = index.get(dep.as_str()) else {
                            continue;
                        };
                        match marks[dep_index] {
                            Mark::New => {
                                marks[dep_index] = Mark::Open;
                                path.push((dep_index, 0));
                            }
                            Mark::Open => {
                                let from = path
                                    .iter()
                                    .position(|(open, _)| *open == dep_index)
                                    .unwrap_or(0);
                                let mut cycle: Vec<String> = path[from..]
                                    .iter()
                                    .map(|(open, _)| self.steps[*open].id.clone())
                                    .collect();
                                cycle.push(self.steps[dep_index].id.clone());
                                return Some(cycle);
                            }
                            Mark::Done => {}
                        }
                    }
                    None => {
                        marks[node_id] = Mark::Done;
                        path.pop();
                    }
                }
            }
        }
        None
    }

    /// Returns the run's output given the outputs of the finished steps: the `output` step's,
    /// else the single sink's, else an object keyed by the sinks' ids.
    pub fn run_output(&self, outputs: &BTreeMap<String, serde_json::Value>) -> serde_json::Value {
        let get = |id: &str| outputs.get(id).cloned().unwrap_or(serde_json::Value::Null);
        if let Some(output) = &self.output {
            return get(output);
        }
        match self.sinks().as_slice() {
            [single] => get(single),
            sinks => serde_json::Value::Object(
                sinks.iter().map(|id| ((*id).to_owned(), get(id))).collect(),
            ),
        }
    }
}

#[cfg(test)]
mod tests;
