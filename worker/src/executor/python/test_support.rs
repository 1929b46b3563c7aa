//! What the unit tests of the interpreter share: an interpreter thread fed calls through a
//! channel, as an executor process's is fed from its worker's socket, and the step modules on its
//! python path. Test code only: nothing outside `#[cfg(test)]` may use it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};
use taskfleet_common::StepError;
use taskfleet_common::error::INVALID_OUTPUT;

use super::{
    CallStopper, IncomingCall, PythonOutput, PythonSettings, PythonStartError, PythonTarget,
    StepContext, serve_calls,
};

/// The step module the tests call, written to a temporary directory on the python path.
pub(super) const STEPS: &str = include_str!("steps_under_test.py");

/// An interpreter thread serving the calls sent to it, as an executor process's thread serves
/// the calls it reads from its worker. Dropped, its thread ends.
pub(super) struct Interpreter {
    calls: mpsc::Sender<IncomingCall>,
    /// Stops this thread's calls.
    pub(super) stopper: CallStopper,
}

impl Interpreter {
    /// Starts another thread serving calls on the process's interpreter.
    pub(super) fn start(settings: PythonSettings) -> Result<Self, PythonStartError> {
        let (calls, incoming) = mpsc::channel();
        let stopper = serve_calls(settings, move || incoming.recv().ok())?;
        Ok(Self { calls, stopper })
    }

    /// [`Self::start`] with no settings of its own: it imports what the fixture's path holds.
    pub(super) fn start_default() -> Self {
        Self::start(PythonSettings::default()).expect("starting an interpreter thread")
    }

    /// Sends a call; returns its id and where its outcome arrives.
    pub(super) fn send(
        &self,
        target: PythonTarget,
        input: Value,
    ) -> (u64, mpsc::Receiver<PythonOutput>) {
        // Ids are unique in the process, so no two interpreter threads' calls share one.
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let (done, outcome) = mpsc::channel();
        let call = IncomingCall {
            id,
            target,
            input,
            ctx: ctx(),
            done: Box::new(move |output| {
                // A test that stopped waiting has no use for the outcome.
                let _ = done.send(output);
            }),
        };
        self.calls
            .send(call)
            .expect("the interpreter thread takes calls");
        (id, outcome)
    }

    /// Runs a call and returns its outcome.
    pub(super) fn call(&self, target: PythonTarget, input: Value) -> PythonOutput {
        let (_, outcome) = self.send(target, input);
        outcome
            .recv_timeout(Duration::from_secs(30))
            .expect("the python call finished in time")
    }
}

/// The interpreter thread most tests share, and the directory of its python path.
pub(super) struct Fixture {
    pub(super) interpreter: Interpreter,
    pub(super) dir: PathBuf,
}

/// Makes a fresh directory under the temporary directory.
pub(super) fn unique_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "taskfleet-python-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos())
            .unwrap_or_default()
    ));
    std::fs::create_dir_all(&dir).expect("creating a test directory");
    dir
}

/// Writes a file a test needs.
pub(super) fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("writing a test module");
}

/// Returns the interpreter thread shared by the tests: a process has one interpreter.
pub(super) fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = unique_dir("steps");
        let first = dir.join("first");
        let second = dir.join("second");
        std::fs::create_dir_all(&first).expect("creating a python path entry");
        std::fs::create_dir_all(&second).expect("creating a python path entry");
        write(&first.join("steps_under_test.py"), STEPS);
        write(
            &first.join("shadowed.py"),
            "def which(_):\n    return 'first'\n",
        );
        write(
            &second.join("shadowed.py"),
            "def which(_):\n    return 'second'\n",
        );
        write(
            &first.join("broken_module.py"),
            "x = 1\nraise RuntimeError('broken at import')\n",
        );
        let settings = PythonSettings {
            python_path: vec![first, second],
            virtual_env: None,
            max_log_chars: 0,
            ..PythonSettings::default()
        };
        let interpreter = Interpreter::start(settings).expect("starting the interpreter");
        Fixture { interpreter, dir }
    })
}

/// The identity of every test call.
pub(super) fn ctx() -> StepContext {
    StepContext {
        run_id: "run-1".to_owned(),
        task_id: "task-1".to_owned(),
        step_id: "price".to_owned(),
        attempt: 2,
        trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".to_owned()),
    }
}

/// A target naming a function of a module.
pub(super) fn function(module: &str, function: &str) -> PythonTarget {
    PythonTarget::Function {
        module: module.to_owned(),
        function: function.to_owned(),
    }
}

/// Runs a call on the shared interpreter thread.
pub(super) fn call(target: PythonTarget, input: Value) -> Result<Value, StepError> {
    fixture().interpreter.call(target, input).result
}

/// Runs a function of the step module on the shared interpreter thread.
pub(super) fn step(name: &str, input: Value) -> Result<Value, StepError> {
    call(function("steps_under_test", name), input)
}

/// Runs a function of the step module that returns what cannot be an output.
pub(super) fn output_error(name: &str) -> StepError {
    let error = step(name, json!(null)).expect_err("the step fails");
    assert_eq!(error.kind, INVALID_OUTPUT, "{error:?}");
    error
}
