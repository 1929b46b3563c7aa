//! Runs Python steps in an interpreter embedded with pyo3; this is the only module of the project
//! where pyo3 appears.
//!
//! One dedicated OS thread, named `python`, owns the interpreter for the life of the process and
//! serves the calls that [`serve_calls`]'s source hands it (in an executor process, read from the
//! worker's socket); [`CallStopper`] gives calls up, so no other thread ever waits for the GIL to
//! run a step. Values cross between Rust and Python by direct conversion, never as JSON text. The
//! module does not decide retries, timeouts or statuses: it returns the step's output or a
//! [`StepError`] describing why the attempt failed.

use std::collections::HashMap;
use std::ffi::CStr;
use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use pyo3::exceptions::{PyBaseException, PyImportError};
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyDict, PyFloat, PyInt, PyList, PyModule, PyString, PyTraceback, PyTuple, PyType,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};
use taskfleet_common::StepError;
use taskfleet_common::error::{CANCELLED, IMPORT_ERROR, INVALID_OUTPUT};

/// The deepest nesting of lists and dicts converted in either direction; deeper values are
/// rejected rather than risking the interpreter thread's stack (a list containing itself is
/// infinitely deep).
const MAX_DEPTH: usize = 256;
/// Stack of the interpreter thread: Python code and the recursive converters run on it.
const THREAD_STACK_SIZE: usize = 16 * 1024 * 1024;
/// How many `python_code` sources stay compiled before the cache of them is emptied.
const MAX_CACHED_CODE: usize = 256;
/// Source of the bundled `taskfleet.context` module, used when the package is not installed.
const CONTEXT_SOURCE: &CStr =
    pyo3::ffi::c_str!(include_str!("../../../python/taskfleet/context.py"));
/// Source of the bundled `taskfleet/__init__.py`, used when the package is not installed.
const PACKAGE_SOURCE: &CStr =
    pyo3::ffi::c_str!(include_str!("../../../python/taskfleet/__init__.py"));
/// Moves the entries `site.addsitedir` added for a virtualenv in front of the interpreter's own
/// site-packages, so the virtualenv's packages win, as they would in the virtualenv's own Python.
const ADD_VIRTUALENV: &CStr = cr#"
import site, sys
before = set(sys.path)
site.addsitedir(site_packages)
added = [p for p in sys.path if p not in before]
rest = [p for p in sys.path if p in before]
# The user site counts too: a virtualenv's own Python does not see it at all.
base = set(site.getsitepackages()) | {site.getusersitepackages()}
at = next((i for i, p in enumerate(rest) if p in base), len(rest))
sys.path[:] = rest[:at] + added + rest[at:]
"#;

/// Captures what a step prints or logs: `sys.stdout` and `sys.stderr` point at a capped buffer
/// for the duration of one call, and a handler on the root logger, installed once, writes to the
/// same buffer. The `taskfleet.step` loggers (the `ctx.logger` of every step) record from INFO;
/// other loggers keep their levels. Between calls the buffer passes what it gets (a log record
/// of a thread a step left running) to the process's standard error.
const CAPTURE_SOURCE: &CStr = cr#"
import io, logging, sys

class Capture(io.TextIOBase):
    def __init__(self):
        self.active = False
        self.reset(0)
    def reset(self, limit):
        self.parts, self.size, self.limit, self.truncated = [], 0, limit, False
    def writable(self):
        return True
    def write(self, text):
        text = text if isinstance(text, str) else str(text)
        if not self.active:
            if sys.__stderr__ is not None:
                sys.__stderr__.write(text)
            return len(text)
        room = self.limit - self.size
        piece = text[:max(room, 0)]
        if len(piece) < len(text):
            self.truncated = True
        if piece:
            self.parts.append(piece)
            self.size += len(piece)
        return len(text)
    def value(self):
        text = "".join(self.parts)
        if self.truncated:
            text += "\n[logs truncated at %d characters]\n" % self.limit
        self.parts = []
        return text

CAPTURE = Capture()
HANDLER = logging.StreamHandler(CAPTURE)
HANDLER.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
ROOT = logging.getLogger()
logging.getLogger("taskfleet.step").setLevel(logging.INFO)

def start(limit):
    # A step may have removed the root logger's handlers.
    if HANDLER not in ROOT.handlers:
        ROOT.addHandler(HANDLER)
    CAPTURE.reset(limit)
    CAPTURE.active = True
    saved = (sys.stdout, sys.stderr)
    sys.stdout = sys.stderr = CAPTURE
    return saved

def finish(saved):
    sys.stdout, sys.stderr = saved
    CAPTURE.active = False
    return CAPTURE.value()
"#;

/// The default cap on the captured output of one call, in characters.
pub const DEFAULT_MAX_LOG_CHARS: usize = 64 * 1024;

/// What a call came to: the step's output or error, and what it printed or logged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PythonOutput {
    /// The output, or why the step failed.
    pub result: Result<Value, StepError>,
    /// What the step printed or logged, capped; empty if nothing.
    pub logs: String,
}

/// Settings of the embedded interpreter.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PythonSettings {
    /// The most characters of a call's output kept as its logs (0: the default).
    pub max_log_chars: usize,
    /// Directories prepended to `sys.path`, the first one searched first.
    pub python_path: Vec<PathBuf>,
    /// A virtualenv whose `lib/pythonX.Y/site-packages` is added, for the running X.Y.
    pub virtual_env: Option<PathBuf>,
}

/// Describes what a Python step calls.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PythonTarget {
    /// A function in an importable module (`"module.path:function"` in a definition).
    Function {
        /// The dotted module path passed to the import system.
        module: String,
        /// The function's name in the module; dots reach nested attributes (`Class.method`).
        function: String,
    },
    /// Source text that defines `main(input)` (a `python_code` step).
    Code {
        /// The Python source.
        source: String,
    },
}

/// Identity of the attempt, handed to steps that take a `ctx` parameter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepContext {
    /// The run (or standalone task) the step belongs to.
    pub run_id: String,
    /// The task being executed.
    pub task_id: String,
    /// The step's id in the workflow definition.
    pub step_id: String,
    /// The attempt number, 1 for the first try.
    pub attempt: u32,
}

/// Describes why the interpreter could not be started.
#[derive(Debug, thiserror::Error)]
pub enum PythonStartError {
    /// The interpreter thread could not be created.
    #[error("spawning the python interpreter thread")]
    Spawn(#[source] std::io::Error),
    /// The interpreter thread ended before reporting whether it started.
    #[error("the python interpreter thread stopped while starting")]
    ThreadStopped,
    /// The virtualenv has no site-packages directory for the running Python version.
    #[error(
        "virtualenv {virtual_env} has no site-packages for python {version}: {site_packages} is not a directory"
    )]
    MissingSitePackages {
        /// The virtualenv from the settings.
        virtual_env: PathBuf,
        /// The running interpreter's `X.Y`.
        version: String,
        /// The directory that was expected.
        site_packages: PathBuf,
    },
    /// A Python operation needed to set up the interpreter raised an exception.
    #[error("{operation}: {message}")]
    Python {
        /// What was being done, such as `adding the virtualenv to sys.path`.
        operation: &'static str,
        /// The Python exception, as `Class: message`.
        message: String,
    },
}

/// State shared by the [`CallStopper`] and the interpreter thread, used to interrupt abandoned
/// calls.
#[derive(Default)]
struct InterruptState {
    /// The job the interpreter thread is running, or 0. Written only while that thread holds the
    /// GIL, so a reader holding the GIL sees a value that cannot change under it.
    running: AtomicU64,
    /// The last job an interrupt was delivered to, so the thread can clear one that arrived late.
    interrupted: AtomicU64,
    /// The last job given up by [`CallStopper::stop`]: skipped if it has not started.
    abandoned: AtomicU64,
    /// `threading.get_ident()` of the interpreter thread.
    thread_ident: OnceLock<u64>,
    /// The exception class raised inside an interrupted step.
    cancelled_type: OnceLock<Py<PyType>>,
}

/// A call handed to the interpreter thread by the source given to [`serve_calls`].
pub struct IncomingCall {
    /// Identifies the call for [`CallStopper::stop`]; not 0.
    pub id: u64,
    /// What to call.
    pub target: PythonTarget,
    /// The step's input.
    pub input: Value,
    /// The attempt's identity.
    pub ctx: StepContext,
    /// Called with the outcome on the interpreter thread, without the GIL, exactly once.
    pub done: Box<dyn FnOnce(PythonOutput) + Send>,
}

/// Stops calls of [`serve_calls`].
#[derive(Clone)]
pub struct CallStopper(Arc<InterruptState>);

impl CallStopper {
    /// Gives up call `id`: if it has not started it is skipped (its outcome is a `cancelled`
    /// error), and if it is running the step is interrupted by an exception raised in its
    /// Python code. Either way its `done` is still called when it ends.
    pub fn stop(&self, id: u64) {
        abandon(&self.0, id);
    }
}

/// Starts the interpreter on its own OS thread, named `python`, which owns it for the life of the
/// process, applies the settings and serves the calls `next` returns, one at a time, until it
/// returns `None`. `next` runs on the interpreter thread without the GIL, so it may block (reading
/// a socket, say) while threads that steps started run on. Blocks until the interpreter is ready.
///
/// Each `python_path` entry is prepended to `sys.path` in the given order (the first is searched
/// first). A virtualenv adds `<venv>/lib/pythonX.Y/site-packages` for the running `X.Y` through
/// `site.addsitedir` (so `.pth` files work), placed before the interpreter's own site-packages; a
/// missing directory is an error naming it. A process has one interpreter: a second call starts
/// a second thread serving calls on it, and its settings extend the same `sys.path`.
pub fn serve_calls(
    settings: PythonSettings,
    next: impl FnMut() -> Option<IncomingCall> + Send + 'static,
) -> Result<CallStopper, PythonStartError> {
    // Initialised here, not on the interpreter thread: Python takes the initialising thread for
    // its main thread, and only the main thread may install signal handlers, so a step calling
    // `signal.signal` cannot take SIGTERM away from the process's own shutdown.
    Python::initialize();
    let state = Arc::new(InterruptState::default());
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let thread_state = Arc::clone(&state);
    std::thread::Builder::new()
        .name("python".to_owned())
        .stack_size(THREAD_STACK_SIZE)
        .spawn(move || interpreter_thread(&settings, next, &thread_state, &ready_tx))
        .map_err(PythonStartError::Spawn)?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(CallStopper(state)),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(PythonStartError::ThreadStopped),
    }
}

/// Marks `job` abandoned and interrupts it if it is running.
fn abandon(state: &Arc<InterruptState>, job: u64) {
    // Publishing the abandonment first pairs with the interpreter thread, which publishes
    // `running` before checking it: with a fence on each side, either that thread skips the job
    // or this one sees it running.
    state.abandoned.store(job, Ordering::SeqCst);
    std::sync::atomic::fence(Ordering::SeqCst);
    if state.running.load(Ordering::SeqCst) != job {
        return;
    }
    let state = Arc::clone(state);
    // Taking the GIL can take as long as the running step holds it, so the interrupt is
    // delivered from a short-lived thread instead of the caller.
    let spawned = std::thread::Builder::new()
        .name("python-interrupt".to_owned())
        .spawn(move || interrupt(&state, job));
    if let Err(error) = spawned {
        tracing::warn!(%error, "spawning a thread to interrupt an abandoned python step");
    }
}

/// Makes this process ignore SIGINT and SIGTERM. Call it on the thread that started the first
/// executor (Python's main thread, the only one that may set signal handlers). Executor
/// processes use it: the worker they serve decides when they stop, by closing their connection.
pub fn ignore_termination_signals() -> Result<(), PythonStartError> {
    const IGNORE: &CStr = cr#"
import signal
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
"#;
    Python::attach(|py| {
        py.run(IGNORE, None, None)
            .map_err(|error| start_error(py, "ignoring SIGINT and SIGTERM", &error))
    })
}

/// Raises the cancellation exception in the interpreter thread if it is still running `job`.
fn interrupt(state: &InterruptState, job: u64) {
    Python::attach(|py| {
        // Holding the GIL, the interpreter thread can neither start nor finish a job.
        if state.running.load(Ordering::SeqCst) != job {
            return;
        }
        let (Some(ident), Some(cancelled)) = (state.thread_ident.get(), state.cancelled_type.get())
        else {
            return;
        };
        // Preparing the call runs Python code, during which the interpreter thread may take the
        // GIL and move on to another job; the second check, with no Python code between it and
        // the call, makes sure the exception only ever reaches the job it was meant for.
        let raise = prepare_async_exc(py, *ident, Some(cancelled.bind(py).as_any())).and_then(
            |(function, args)| {
                if state.running.load(Ordering::SeqCst) != job {
                    return Ok(false);
                }
                function.call1(args).map(|_| true)
            },
        );
        match raise {
            Ok(true) => state.interrupted.store(job, Ordering::SeqCst),
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(error = %describe(py, &error), "interrupting a python step")
            }
        }
    });
}

/// Sets (or with `None` clears) the exception pending for a Python thread.
///
/// `PyThreadState_SetAsyncExc` is reached through ctypes because the workspace forbids unsafe
/// code; ctypes passes Python's `None` as a NULL pointer, which clears the pending exception.
fn set_async_exc(py: Python<'_>, ident: u64, exception: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
    let (function, args) = prepare_async_exc(py, ident, exception)?;
    function.call1(args)?;
    Ok(())
}

/// Returns `PyThreadState_SetAsyncExc` and its arguments, ready to call.
#[allow(clippy::type_complexity, reason = "a function and its argument tuple")]
fn prepare_async_exc<'py>(
    py: Python<'py>,
    ident: u64,
    exception: Option<&Bound<'py, PyAny>>,
) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyAny>, Bound<'py, PyAny>))> {
    let ctypes = py.import("ctypes")?;
    let ident = ctypes.getattr("c_ulong")?.call1((ident,))?;
    let exception = match exception {
        Some(exception) => ctypes.getattr("py_object")?.call1((exception,))?,
        None => py.None().into_bound(py),
    };
    let function = ctypes
        .getattr("pythonapi")?
        .getattr("PyThreadState_SetAsyncExc")?;
    Ok((function, (ident, exception)))
}

/// Body of the interpreter thread: sets up the runtime, reports readiness, then serves the calls
/// `next` returns until it returns `None`.
fn interpreter_thread(
    settings: &PythonSettings,
    mut next: impl FnMut() -> Option<IncomingCall> + Send,
    state: &InterruptState,
    ready: &std::sync::mpsc::SyncSender<Result<(), PythonStartError>>,
) {
    Python::attach(|py| {
        let mut runtime = match Runtime::start(py, settings, state) {
            Ok(runtime) => runtime,
            Err(error) => {
                // `serve_calls` is waiting for this reply; if it is gone there is nobody to tell.
                let _ = ready.send(Err(error));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        // The GIL is released while waiting so other Python threads (started by steps) run.
        while let Some(job) = py.detach(&mut next) {
            state.running.store(job.id, Ordering::SeqCst);
            std::sync::atomic::fence(Ordering::SeqCst);
            if state.abandoned.load(Ordering::SeqCst) == job.id {
                // The caller gave up before the job started.
                state.running.store(0, Ordering::SeqCst);
                let error = StepError::new(CANCELLED, "the step was given up before it started");
                (job.done)(PythonOutput {
                    result: Err(error),
                    logs: String::new(),
                });
                continue;
            }
            let capture = runtime.start_capture(py);
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                runtime.run(py, &job.target, &job.input, &job.ctx)
            }))
            .unwrap_or_else(|panic| Err(panicked(&*panic)));
            let logs = runtime.finish_capture(py, capture);
            let outcome = PythonOutput { result, logs };
            if state.interrupted.load(Ordering::SeqCst) == job.id {
                // An interrupt that arrived after the step's last bytecode is still pending and
                // would hit the next job.
                if let Some(ident) = state.thread_ident.get()
                    && let Err(error) = set_async_exc(py, *ident, None)
                {
                    tracing::warn!(error = %describe(py, &error), "clearing a python interrupt");
                }
            }
            state.running.store(0, Ordering::SeqCst);
            py.detach(|| (job.done)(outcome));
        }
    });
}

/// The error of a job whose Rust side panicked.
fn panicked(panic: &(dyn std::any::Any + Send)) -> StepError {
    let detail = panic
        .downcast_ref::<&str>()
        .map(|text| (*text).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    StepError::new(
        "RuntimeError",
        format!("the python executor panicked: {detail}"),
    )
}

/// How a callable wants its `ctx`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CtxPassing {
    /// It has no parameter named `ctx`.
    Omitted,
    /// It has a `ctx` parameter that can be passed by keyword.
    Keyword,
    /// Its `ctx` parameter is positional-only, so it goes second.
    Positional,
    /// Its first parameter is `ctx`, so it goes first and the input second.
    First,
}

/// A resolved step callable.
struct Loaded {
    callable: Py<PyAny>,
    ctx: CtxPassing,
}

/// A compiled `python_code` module, remembered so it can be forgotten when the cache is emptied.
struct CodeModule {
    module_name: String,
    file_name: String,
}

/// Everything the interpreter thread keeps between jobs.
struct Runtime {
    /// `taskfleet.Context`, from the installed package or the bundled copy.
    context_type: Py<PyAny>,
    /// The module of [`CAPTURE_SOURCE`].
    capture: Py<PyModule>,
    /// The cap on a call's captured output, in characters.
    max_log_chars: usize,
    /// Callables resolved successfully; failures are not cached so a fixed module loads.
    loaded: HashMap<PythonTarget, Loaded>,
    code_modules: Vec<CodeModule>,
}

impl Runtime {
    /// Applies the settings and prepares what every job needs.
    fn start(
        py: Python<'_>,
        settings: &PythonSettings,
        state: &InterruptState,
    ) -> Result<Self, PythonStartError> {
        let site_packages = match &settings.virtual_env {
            Some(virtual_env) => Some(virtualenv_site_packages(py, virtual_env)?),
            None => None,
        };
        if let Some(site_packages) = site_packages {
            let globals = PyDict::new(py);
            globals
                .set_item("site_packages", site_packages.as_os_str())
                .and_then(|()| py.run(ADD_VIRTUALENV, Some(&globals), None))
                .map_err(|error| start_error(py, "adding the virtualenv to sys.path", &error))?;
        }
        prepend_python_path(py, &settings.python_path)
            .map_err(|error| start_error(py, "prepending the python path to sys.path", &error))?;

        let ident: u64 = py
            .import("threading")
            .and_then(|threading| threading.call_method0("get_ident"))
            .and_then(|ident| ident.extract())
            .map_err(|error| start_error(py, "reading the interpreter thread's id", &error))?;
        let _ = state.thread_ident.set(ident);
        let context_type = context_type(py)
            .map_err(|error| start_error(py, "loading taskfleet.Context", &error))?;
        let cancelled = step_cancelled_type(py, context_type.bind(py))
            .map_err(|error| start_error(py, "creating the cancellation exception", &error))?;
        let _ = state.cancelled_type.set(cancelled);
        let capture = PyModule::from_code(
            py,
            CAPTURE_SOURCE,
            c"taskfleet_capture.py",
            c"_taskfleet_capture",
        )
        .map_err(|error| start_error(py, "loading the output capture", &error))?
        .unbind();
        let max_log_chars = if settings.max_log_chars == 0 {
            DEFAULT_MAX_LOG_CHARS
        } else {
            settings.max_log_chars
        };
        Ok(Self {
            context_type,
            capture,
            max_log_chars,
            loaded: HashMap::new(),
            code_modules: Vec::new(),
        })
    }

    /// Points the step's output at a capture; `None` (logged) if that failed, and the step
    /// then runs uncaptured.
    fn start_capture<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
        match self
            .capture
            .bind(py)
            .call_method1("start", (self.max_log_chars,))
        {
            Ok(state) => Some(state),
            Err(error) => {
                tracing::warn!(error = %describe(py, &error), "capturing a python step's output");
                None
            }
        }
    }

    /// Restores the output and returns what the step printed or logged.
    fn finish_capture(&self, py: Python<'_>, state: Option<Bound<'_, PyAny>>) -> String {
        let Some(state) = state else {
            return String::new();
        };
        match self
            .capture
            .bind(py)
            .call_method1("finish", (state,))
            .and_then(|logs| logs.extract::<String>())
        {
            Ok(logs) => logs,
            Err(error) => {
                tracing::warn!(error = %describe(py, &error), "reading a python step's output");
                String::new()
            }
        }
    }

    /// Runs one step call: resolves the callable, converts the input, calls, settles a
    /// coroutine and converts the output.
    fn run(
        &mut self,
        py: Python<'_>,
        target: &PythonTarget,
        input: &Value,
        ctx: &StepContext,
    ) -> Result<Value, StepError> {
        let (callable, ctx_passing) = self.load(py, target)?;
        let callable = callable.bind(py);
        let argument = to_python(py, input, 0)?;
        let returned = match ctx_passing {
            CtxPassing::Omitted => callable.call1((argument,)),
            CtxPassing::Keyword => {
                let kwargs = PyDict::new(py);
                kwargs
                    .set_item("ctx", self.context(py, ctx)?)
                    .map_err(|error| exception_error(py, &error))?;
                callable.call((argument,), Some(&kwargs))
            }
            CtxPassing::Positional => callable.call1((argument, self.context(py, ctx)?)),
            CtxPassing::First => callable.call1((self.context(py, ctx)?, argument)),
        }
        .map_err(|error| exception_error(py, &error))?;
        let output = settle(py, returned)?;
        from_python(&output, &mut Vec::new())
    }

    /// Builds the `ctx` object for one attempt.
    fn context<'py>(
        &self,
        py: Python<'py>,
        ctx: &StepContext,
    ) -> Result<Bound<'py, PyAny>, StepError> {
        let kwargs = PyDict::new(py);
        let built = kwargs
            .set_item("run_id", &ctx.run_id)
            .and_then(|()| kwargs.set_item("task_id", &ctx.task_id))
            .and_then(|()| kwargs.set_item("step_id", &ctx.step_id))
            .and_then(|()| kwargs.set_item("attempt", ctx.attempt))
            .and_then(|()| self.context_type.bind(py).call((), Some(&kwargs)));
        built.map_err(|error| exception_error(py, &error))
    }

    /// Returns the callable for a target, resolving and caching it on first use.
    fn load(
        &mut self,
        py: Python<'_>,
        target: &PythonTarget,
    ) -> Result<(Py<PyAny>, CtxPassing), StepError> {
        if let Some(loaded) = self.loaded.get(target) {
            return Ok((loaded.callable.clone_ref(py), loaded.ctx));
        }
        let callable = match target {
            PythonTarget::Function { module, function } => load_function(py, module, function)?,
            PythonTarget::Code { source } => self.load_code(py, source)?,
        };
        let ctx = ctx_passing(py, &callable);
        let loaded = Loaded {
            callable: callable.clone().unbind(),
            ctx,
        };
        self.loaded.insert(target.clone(), loaded);
        Ok((callable.unbind(), ctx))
    }

    /// Compiles `python_code` source into a fresh module and returns its `main`.
    fn load_code<'py>(
        &mut self,
        py: Python<'py>,
        source: &str,
    ) -> Result<Bound<'py, PyAny>, StepError> {
        if self.code_modules.len() >= MAX_CACHED_CODE {
            self.forget_code(py);
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        source.hash(&mut hasher);
        let digest = format!("{:016x}", hasher.finish());
        let code_module = CodeModule {
            module_name: format!("taskfleet_code_{digest}"),
            file_name: format!("<python_code {digest}>"),
        };
        // The module stays registered in sys.modules and linecache only while it is cached.
        match compile_code(py, source, &code_module) {
            Ok(main) => {
                self.code_modules.push(code_module);
                Ok(main)
            }
            Err(error) => {
                forget_code_module(py, &code_module);
                Err(error)
            }
        }
    }

    /// Drops every cached `python_code` module.
    fn forget_code(&mut self, py: Python<'_>) {
        self.loaded
            .retain(|target, _| matches!(target, PythonTarget::Function { .. }));
        for code_module in self.code_modules.drain(..) {
            forget_code_module(py, &code_module);
        }
    }
}

/// Returns `<venv>/lib/pythonX.Y/site-packages` for the running interpreter, which must exist.
fn virtualenv_site_packages(
    py: Python<'_>,
    virtual_env: &Path,
) -> Result<PathBuf, PythonStartError> {
    let virtual_env = std::path::absolute(virtual_env).unwrap_or_else(|_| virtual_env.to_owned());
    let info = py.version_info();
    let version = format!("{}.{}", info.major, info.minor);
    let site_packages = virtual_env
        .join("lib")
        .join(format!("python{version}"))
        .join("site-packages");
    if site_packages.is_dir() {
        Ok(site_packages)
    } else {
        Err(PythonStartError::MissingSitePackages {
            virtual_env,
            version,
            site_packages,
        })
    }
}

/// Prepends the directories to `sys.path`, keeping their order, as absolute paths so a later
/// change of working directory does not change what is imported.
fn prepend_python_path(py: Python<'_>, python_path: &[PathBuf]) -> PyResult<()> {
    let sys_path = py.import("sys")?.getattr("path")?;
    for dir in python_path.iter().rev() {
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.clone());
        sys_path.call_method1("insert", (0, dir.as_os_str()))?;
    }
    Ok(())
}

/// Returns `taskfleet.Context`: from the installed package if it imports, otherwise from the
/// copy of its source bundled into the worker, registered as the `taskfleet` package so step
/// modules can import it too.
fn context_type(py: Python<'_>) -> PyResult<Py<PyAny>> {
    match py
        .import("taskfleet")
        .and_then(|package| package.getattr("Context"))
    {
        Ok(context_type) => return Ok(context_type.unbind()),
        Err(error) => tracing::debug!(
            error = %describe(py, &error),
            "taskfleet package not importable; using the bundled copy"
        ),
    }
    let modules = py.import("sys")?.getattr("modules")?;
    let taken = modules.contains("taskfleet")? || modules.contains("taskfleet.context")?;
    if taken {
        // Something else owns the name; keep the bundled copy out of its way.
        let context = PyModule::from_code(
            py,
            CONTEXT_SOURCE,
            c"taskfleet/context.py",
            c"_taskfleet_context",
        )?;
        return Ok(context.getattr("Context")?.unbind());
    }
    let context = PyModule::from_code(
        py,
        CONTEXT_SOURCE,
        c"taskfleet/context.py",
        c"taskfleet.context",
    )?;
    let package = PyModule::from_code(py, PACKAGE_SOURCE, c"taskfleet/__init__.py", c"taskfleet")?;
    package.setattr("context", &context)?;
    // A `__path__` makes it a package, so `import taskfleet.context` finds the registered module.
    package.setattr("__path__", PyList::empty(py))?;
    Ok(context.getattr("Context")?.unbind())
}

/// `StepCancelled` from the module that defines `Context`, so steps can catch it as
/// `taskfleet.StepCancelled`; an installed package too old to have it gets one made here.
fn step_cancelled_type(py: Python<'_>, context_type: &Bound<'_, PyAny>) -> PyResult<Py<PyType>> {
    let module: String = context_type.getattr("__module__")?.extract()?;
    if let Ok(class) = py
        .import(module.as_str())
        .and_then(|module| module.getattr("StepCancelled"))
        && let Ok(class) = class.cast_into::<PyType>()
        && class.is_subclass_of::<PyBaseException>()?
    {
        return Ok(class.unbind());
    }
    PyErr::new_type(
        py,
        c"taskfleet.StepCancelled",
        Some(
            c"Raised inside a step that must stop (its timeout passed, or its run was cancelled).",
        ),
        Some(&py.get_type::<PyBaseException>()),
        None,
    )
}

/// Imports a module and returns the named function.
fn load_function<'py>(
    py: Python<'py>,
    module: &str,
    function: &str,
) -> Result<Bound<'py, PyAny>, StepError> {
    // A module added or fixed since the last attempt must be found: the import system caches
    // directory listings.
    if let Err(error) = py
        .import("importlib")
        .and_then(|importlib| importlib.call_method0("invalidate_caches"))
    {
        tracing::warn!(error = %describe(py, &error), "invalidating python import caches");
    }
    let imported = py.import(module).map_err(|error| {
        let mut step_error = exception_error(py, &error);
        let class = step_error.kind;
        step_error.kind = IMPORT_ERROR.to_owned();
        step_error.message = if error.is_instance_of::<PyImportError>(py) {
            format!(
                "cannot import module '{module}': {class}: {}; sys.path searched: {}",
                step_error.message,
                sys_path(py)
            )
        } else {
            format!(
                "cannot import module '{module}': {class}: {}",
                step_error.message
            )
        };
        step_error
    })?;
    let mut attribute = imported.into_any();
    for name in function.split('.') {
        attribute = match attribute.getattr_opt(name) {
            Ok(Some(found)) => found,
            Ok(None) => {
                return Err(StepError::new(
                    IMPORT_ERROR,
                    format!(
                        "module '{module}' has no function '{function}'{}",
                        module_file(py, module)
                    ),
                ));
            }
            Err(error) => {
                let step_error = exception_error(py, &error);
                return Err(StepError {
                    kind: IMPORT_ERROR.to_owned(),
                    message: format!(
                        "reading '{function}' from module '{module}': {}: {}",
                        step_error.kind, step_error.message
                    ),
                    traceback: step_error.traceback,
                });
            }
        };
    }
    if attribute.is_callable() {
        Ok(attribute)
    } else {
        Err(StepError::new(
            IMPORT_ERROR,
            format!(
                "'{module}:{function}' is not callable: it is a {}",
                type_name(&attribute)
            ),
        ))
    }
}

/// Returns ` (<file>)` for an imported module with a file, for messages.
fn module_file(py: Python<'_>, module: &str) -> String {
    py.import(module)
        .and_then(|module| module.getattr("__file__"))
        .and_then(|file| file.extract::<String>())
        .map(|file| format!(" ({file})"))
        .unwrap_or_default()
}

/// Returns `sys.path` as Python shows it, for messages.
fn sys_path(py: Python<'_>) -> String {
    py.import("sys")
        .and_then(|sys| sys.getattr("path"))
        .and_then(|path| path.repr())
        .map(|repr| repr.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "<unavailable>".to_owned())
}

/// Compiles and executes `python_code` source as a new module and returns its `main`.
///
/// The source is put into `linecache` under the module's file name so tracebacks show its lines.
fn compile_code<'py>(
    py: Python<'py>,
    source: &str,
    code_module: &CodeModule,
) -> Result<Bound<'py, PyAny>, StepError> {
    let load_error = |what: &str, error: &PyErr| {
        let step_error = exception_error(py, error);
        StepError {
            kind: IMPORT_ERROR.to_owned(),
            message: format!(
                "python_code {what}: {}: {}",
                step_error.kind, step_error.message
            ),
            traceback: step_error.traceback,
        }
    };
    let file_name = code_module.file_name.as_str();
    let setup = || -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyModule>)> {
        let lines = PyString::new(py, source).call_method1("splitlines", (true,))?;
        let entry = (source.len(), py.None(), lines, file_name);
        py.import("linecache")?
            .getattr("cache")?
            .set_item(file_name, entry)?;
        let builtins = py.import("builtins")?;
        let compiled = builtins.call_method1("compile", (source, file_name, "exec"));
        let module = PyModule::new(py, &code_module.module_name)?;
        Ok((compiled?, module))
    };
    let (compiled, module) = setup().map_err(|error| load_error("does not compile", &error))?;
    let executed = py
        .import("sys")
        .and_then(|sys| sys.getattr("modules"))
        .and_then(|modules| modules.set_item(&code_module.module_name, &module))
        .and_then(|()| py.import("builtins"))
        .and_then(|builtins| builtins.call_method1("exec", (compiled, module.dict())));
    executed.map_err(|error| load_error("failed while being executed", &error))?;
    match module.getattr_opt("main") {
        Ok(Some(main)) if main.is_callable() => Ok(main),
        Ok(_) => Err(StepError::new(
            IMPORT_ERROR,
            "python_code does not define a function main(input)",
        )),
        Err(error) => Err(load_error("has an unreadable main", &error)),
    }
}

/// Removes a `python_code` module from `sys.modules` and `linecache`.
fn forget_code_module(py: Python<'_>, code_module: &CodeModule) {
    let removed = py
        .import("sys")
        .and_then(|sys| sys.getattr("modules"))
        .and_then(|modules| modules.call_method1("pop", (&code_module.module_name, py.None())))
        .and_then(|_| py.import("linecache"))
        .and_then(|linecache| linecache.getattr("cache"))
        .and_then(|cache| cache.call_method1("pop", (&code_module.file_name, py.None())));
    if let Err(error) = removed {
        tracing::warn!(error = %describe(py, &error), "forgetting a python_code module");
    }
}

/// Decides how a callable takes `ctx`, from `inspect.signature`; a callable without a readable
/// signature gets none.
fn ctx_passing(py: Python<'_>, callable: &Bound<'_, PyAny>) -> CtxPassing {
    let parameters = py
        .import("inspect")
        .and_then(|inspect| inspect.call_method1("signature", (callable,)))
        .and_then(|signature| signature.getattr("parameters"));
    let first_is_ctx = parameters
        .as_ref()
        .ok()
        .and_then(|parameters| parameters.try_iter().ok()?.next()?.ok())
        .and_then(|name| name.extract::<String>().ok())
        .is_some_and(|name| name == "ctx");
    if first_is_ctx {
        return CtxPassing::First;
    }
    let kind = parameters
        .and_then(|parameters| parameters.call_method1("get", ("ctx",)))
        .and_then(|parameter| {
            if parameter.is_none() {
                Ok(None)
            } else {
                parameter
                    .getattr("kind")?
                    .getattr("name")?
                    .extract::<String>()
                    .map(Some)
            }
        });
    match kind.ok().flatten().as_deref() {
        Some("POSITIONAL_OR_KEYWORD" | "KEYWORD_ONLY") => CtxPassing::Keyword,
        Some("POSITIONAL_ONLY") => CtxPassing::Positional,
        _ => CtxPassing::Omitted,
    }
}

/// Runs a returned coroutine to completion and rejects generators.
fn settle<'py>(
    py: Python<'py>,
    returned: Bound<'py, PyAny>,
) -> Result<Bound<'py, PyAny>, StepError> {
    // What a step returns is nearly always a plain value, which is neither.
    if is_plain(&returned) {
        return Ok(returned);
    }
    let inspect = py
        .import("inspect")
        .map_err(|error| exception_error(py, &error))?;
    let is = |predicate: &str| {
        inspect
            .call_method1(predicate, (&returned,))
            .and_then(|answer| answer.is_truthy())
            .map_err(|error| exception_error(py, &error))
    };
    if is("iscoroutine")? {
        return py
            .import("asyncio")
            .and_then(|asyncio| asyncio.call_method1("run", (&returned,)))
            .map_err(|error| {
                skip_leading_frames(py, &error, "asyncio");
                exception_error(py, &error)
            });
    }
    if is("isgenerator")? || is("isasyncgen")? {
        return Err(StepError::new(
            INVALID_OUTPUT,
            "step returned a generator; return a list instead",
        ));
    }
    Ok(returned)
}

/// Whether `value` is `None` or of a built-in type of JSON's values (or a subclass of one):
/// no coroutine or generator.
fn is_plain(value: &Bound<'_, PyAny>) -> bool {
    value.is_none()
        || value.is_instance_of::<PyDict>()
        || value.is_instance_of::<PyList>()
        || value.is_instance_of::<PyString>()
        || value.is_instance_of::<PyInt>()
        || value.is_instance_of::<PyFloat>()
        || value.is_instance_of::<PyTuple>()
}

/// Drops the frames of `package` (the event loop that ran a coroutine step) from the start of an
/// exception's traceback, so it starts at the step's own code. Keeps the traceback whole when
/// every frame belongs to the package.
fn skip_leading_frames(py: Python<'_>, error: &PyErr, package: &str) {
    let inner = format!("{package}.");
    let mut frame = error.traceback(py);
    while let Some(current) = frame {
        let module = current
            .getattr("tb_frame")
            .and_then(|frame| frame.getattr("f_globals"))
            .and_then(|globals| globals.get_item("__name__"))
            .and_then(|name| name.extract::<String>())
            .unwrap_or_default();
        if module != package && !module.starts_with(&inner) {
            error.set_traceback(py, Some(current));
            return;
        }
        frame = current
            .getattr("tb_next")
            .ok()
            .and_then(|next| next.cast_into::<PyTraceback>().ok());
    }
}

/// Describes a Python exception as a step error: its class name, `str(exc)` and the formatted
/// traceback.
fn exception_error(py: Python<'_>, error: &PyErr) -> StepError {
    let kind = error
        .get_type(py)
        .name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "Exception".to_owned());
    let message = error
        .value(py)
        .str()
        .map(|text| text.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "<str() of the exception failed>".to_owned());
    let traceback = py
        .import("traceback")
        .and_then(|traceback| {
            traceback.call_method1(
                "format_exception",
                (error.get_type(py), error.value(py), error.traceback(py)),
            )
        })
        .and_then(|lines| PyString::new(py, "").call_method1("join", (lines,)))
        .and_then(|text| text.extract::<String>())
        .ok();
    StepError {
        kind,
        message,
        traceback,
    }
}

/// Formats an exception as `Class: message` for logs and start errors.
fn describe(py: Python<'_>, error: &PyErr) -> String {
    let step_error = exception_error(py, error);
    format!("{}: {}", step_error.kind, step_error.message)
}

/// Turns an exception raised while starting into a start error.
fn start_error(py: Python<'_>, operation: &'static str, error: &PyErr) -> PythonStartError {
    PythonStartError::Python {
        operation,
        message: describe(py, error),
    }
}

/// Converts a JSON value into the plain Python value a step receives.
fn to_python<'py>(
    py: Python<'py>,
    value: &Value,
    depth: usize,
) -> Result<Bound<'py, PyAny>, StepError> {
    if depth > MAX_DEPTH {
        return Err(StepError::new(
            "RecursionError",
            format!("step input is nested deeper than {MAX_DEPTH} levels"),
        ));
    }
    let converted = match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(flag) => PyBool::new(py, *flag).to_owned().into_any(),
        Value::Number(number) => {
            if let Some(integer) = number.as_i64() {
                PyInt::new(py, integer).into_any()
            } else if let Some(integer) = number.as_u64() {
                PyInt::new(py, integer).into_any()
            } else {
                // Without serde_json's arbitrary_precision every other number is an f64.
                PyFloat::new(py, number.as_f64().unwrap_or(f64::NAN)).into_any()
            }
        }
        Value::String(text) => PyString::new(py, text).into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(to_python(py, item, depth + 1)?)
                    .map_err(|error| exception_error(py, &error))?;
            }
            list.into_any()
        }
        Value::Object(fields) => {
            let dict = PyDict::new(py);
            for (key, field) in fields {
                dict.set_item(key, to_python(py, field, depth + 1)?)
                    .map_err(|error| exception_error(py, &error))?;
            }
            dict.into_any()
        }
    };
    Ok(converted)
}

/// One step of the path to a value inside a step's output, for error messages.
enum Segment {
    Key(String),
    Index(usize),
}

/// Renders a path as `$`, `$.key`, `$.list[3]` or `$["odd key"]`.
fn render_path(path: &[Segment]) -> String {
    let mut rendered = String::from("$");
    for segment in path {
        match segment {
            Segment::Key(key) => {
                let plain = key
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_alphabetic() || c == '_')
                    && key.chars().all(|c| c.is_alphanumeric() || c == '_');
                if plain {
                    rendered.push('.');
                    rendered.push_str(key);
                } else {
                    rendered.push('[');
                    rendered.push_str(&Value::String(key.clone()).to_string());
                    rendered.push(']');
                }
            }
            Segment::Index(index) => rendered.push_str(&format!("[{index}]")),
        }
    }
    rendered
}

/// The error of an output that JSON cannot express.
fn inexpressible(what: &str, path: &[Segment]) -> StepError {
    StepError::new(
        INVALID_OUTPUT,
        format!(
            "step returned a value JSON cannot express: {what} at {}",
            render_path(path)
        ),
    )
}

/// Returns a type's name as Python code would write it: `set`, `datetime.datetime`.
fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .fully_qualified_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "<unknown type>".to_owned())
}

/// Converts a step's returned value into JSON, naming the type and the place of anything JSON
/// cannot express. Tuples become arrays; dict keys must be strings.
fn from_python(value: &Bound<'_, PyAny>, path: &mut Vec<Segment>) -> Result<Value, StepError> {
    if path.len() > MAX_DEPTH {
        return Err(StepError::new(
            INVALID_OUTPUT,
            format!(
                "step returned a value nested deeper than {MAX_DEPTH} levels at {} (does it contain itself?)",
                render_path(path)
            ),
        ));
    }
    if value.is_none() {
        return Ok(Value::Null);
    }
    // bool is a subclass of int, so it is recognised first.
    if let Ok(flag) = value.cast::<PyBool>() {
        return Ok(Value::Bool(flag.is_true()));
    }
    if value.is_instance_of::<PyInt>() {
        if let Ok(integer) = value.extract::<i64>() {
            return Ok(Value::from(integer));
        }
        if let Ok(integer) = value.extract::<u64>() {
            return Ok(Value::from(integer));
        }
        let bits = value
            .call_method0("bit_length")
            .and_then(|bits| bits.extract::<u64>())
            .map(|bits| format!(" ({bits} bits)"))
            .unwrap_or_default();
        return Err(inexpressible(
            &format!("int outside the 64-bit range{bits}"),
            path,
        ));
    }
    if let Ok(float) = value.cast::<PyFloat>() {
        let float = float.value();
        return Number::from_f64(float).map(Value::Number).ok_or_else(|| {
            let shown = if float.is_nan() {
                "nan"
            } else if float > 0.0 {
                "inf"
            } else {
                "-inf"
            };
            inexpressible(&format!("float {shown}"), path)
        });
    }
    if let Ok(text) = value.cast::<PyString>() {
        return text
            .to_str()
            .map(|text| Value::String(text.to_owned()))
            .map_err(|_| inexpressible("str with unpaired surrogates", path));
    }
    if let Ok(dict) = value.cast::<PyDict>() {
        let mut fields = Map::new();
        for (key, field) in dict.iter() {
            let Ok(key) = key.cast::<PyString>() else {
                return Err(inexpressible(
                    &format!("dict key of type {}", type_name(&key)),
                    path,
                ));
            };
            let Ok(key) = key.to_str() else {
                return Err(inexpressible("dict key with unpaired surrogates", path));
            };
            path.push(Segment::Key(key.to_owned()));
            let field = from_python(&field, path)?;
            path.pop();
            fields.insert(key.to_owned(), field);
        }
        return Ok(Value::Object(fields));
    }
    if let Ok(list) = value.cast::<PyList>() {
        return from_sequence(list.iter(), path);
    }
    if let Ok(tuple) = value.cast::<PyTuple>() {
        return from_sequence(tuple.iter(), path);
    }
    Err(inexpressible(&type_name(value), path))
}

/// Converts the items of a list or tuple into a JSON array.
fn from_sequence<'py>(
    items: impl Iterator<Item = Bound<'py, PyAny>>,
    path: &mut Vec<Segment>,
) -> Result<Value, StepError> {
    let mut converted = Vec::new();
    for (index, item) in items.enumerate() {
        path.push(Segment::Index(index));
        converted.push(from_python(&item, path)?);
        path.pop();
    }
    Ok(Value::Array(converted))
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    use serde_json::{Value, json};
    use taskfleet_common::StepError;
    use taskfleet_common::error::{CANCELLED, IMPORT_ERROR, INVALID_OUTPUT};

    use super::{
        CallStopper, IncomingCall, PythonOutput, PythonSettings, PythonStartError, PythonTarget,
        StepContext, serve_calls,
    };

    /// The step module the tests call, written to a temporary directory on the python path.
    const STEPS: &str = r#"
import asyncio
import datetime


def transform(data):
    return {"doubled": [n * 2 for n in data["numbers"]], "name": data["name"].upper()}


def echo(value):
    return value


def describe_ctx(data, ctx):
    ctx.logger.info("describing %s", data)
    return {
        "type": type(ctx).__module__ + "." + type(ctx).__name__,
        "run_id": ctx.run_id,
        "task_id": ctx.task_id,
        "step_id": ctx.step_id,
        "attempt": ctx.attempt,
        "logger": ctx.logger.name,
    }


def keyword_only_ctx(data, *, ctx):
    return ctx.attempt


def positional_only_ctx(data, ctx, /):
    return ctx.step_id


def no_ctx(data, context=None):
    return context


def fail(data):
    raise ValueError("bad value: " + str(data))


class PricingError(Exception):
    pass


def fail_custom(data):
    raise PricingError("no price")


def fail_key(data):
    return data["missing"]


def returns_datetime(data):
    return {"when": datetime.datetime(2024, 1, 1)}


def returns_set(data):
    return {"items": [1, {2, 3}]}


def returns_big_int(data):
    return {"n": 2 ** 64}


def returns_nan(data):
    return [float("nan")]


def returns_int_keys(data):
    return {"counts": {1: "one"}}


def returns_tuple(data):
    return (1, [2, (3, "x")])


def returns_cycle(data):
    items = []
    items.append(items)
    return items


def returns_generator(data):
    yield data


async def async_step(data):
    await asyncio.sleep(0.01)
    return data + 1


async def async_fail(data):
    await asyncio.sleep(0)
    raise KeyError("gone")


def spin(data):
    while True:
        pass


class Pricer:
    @staticmethod
    def price(order):
        return order["qty"] * 2


not_callable = 42
"#;

    /// An interpreter thread serving the calls sent to it, as an executor process's serves the
    /// calls it reads from its worker. Dropped, its thread ends.
    struct Interpreter {
        calls: mpsc::Sender<IncomingCall>,
        stopper: CallStopper,
    }

    impl Interpreter {
        fn start(settings: PythonSettings) -> Result<Self, PythonStartError> {
            let (calls, incoming) = mpsc::channel();
            let stopper = serve_calls(settings, move || incoming.recv().ok())?;
            Ok(Self { calls, stopper })
        }

        /// Sends a call; returns its id and where its outcome arrives.
        fn send(&self, target: PythonTarget, input: Value) -> (u64, mpsc::Receiver<PythonOutput>) {
            // Ids are unique in the process, so no two interpreters' calls share one.
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

        fn call(&self, target: PythonTarget, input: Value) -> PythonOutput {
            let (_, outcome) = self.send(target, input);
            outcome
                .recv_timeout(Duration::from_secs(30))
                .expect("the python call finished in time")
        }
    }

    struct Fixture {
        interpreter: Interpreter,
        dir: PathBuf,
    }

    fn unique_dir(name: &str) -> PathBuf {
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

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).expect("writing a test module");
    }

    /// Returns the interpreter thread shared by the tests: a process has one interpreter.
    fn fixture() -> &'static Fixture {
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
            };
            let interpreter = Interpreter::start(settings).expect("starting the interpreter");
            Fixture { interpreter, dir }
        })
    }

    fn ctx() -> StepContext {
        StepContext {
            run_id: "run-1".to_owned(),
            task_id: "task-1".to_owned(),
            step_id: "price".to_owned(),
            attempt: 2,
        }
    }

    fn function(module: &str, function: &str) -> PythonTarget {
        PythonTarget::Function {
            module: module.to_owned(),
            function: function.to_owned(),
        }
    }

    fn call(target: PythonTarget, input: Value) -> Result<Value, StepError> {
        fixture().interpreter.call(target, input).result
    }

    #[test]
    fn printed_and_logged_output_is_captured_per_call() {
        let target = PythonTarget::Code {
            source: "import logging, sys\n\ndef main(input, ctx):\n    print('hello', input)\n    ctx.logger.info('working on %s', input)\n    logging.getLogger('quiet').info('not captured below WARNING')\n    logging.getLogger('loud').warning('careful')\n    print('oops', file=sys.stderr)\n    return input\n".to_owned(),
        };
        let output = fixture().interpreter.call(target, json!(7));
        assert_eq!(output.result, Ok(json!(7)));
        let logs = output.logs;
        assert!(logs.contains("hello 7\n"), "{logs:?}");
        assert!(
            logs.contains("INFO taskfleet.step.price: working on 7"),
            "{logs:?}"
        );
        assert!(logs.contains("WARNING loud: careful"), "{logs:?}");
        assert!(logs.contains("oops"), "{logs:?}");
        assert!(!logs.contains("not captured"), "{logs:?}");
        // The next call starts with nothing, and output is capped.
        let chatty = PythonTarget::Code {
            source: "def main(input):\n    print('x' * 200000)\n".to_owned(),
        };
        let output = fixture().interpreter.call(chatty, json!(null));
        assert!(
            output.logs.len() < super::DEFAULT_MAX_LOG_CHARS + 100,
            "{}",
            output.logs.len()
        );
        assert!(
            output
                .logs
                .ends_with("[logs truncated at 65536 characters]\n")
        );
        assert!(!output.logs.contains("hello"));
    }

    fn step(name: &str, input: Value) -> Result<Value, StepError> {
        call(function("steps_under_test", name), input)
    }

    fn output_error(name: &str) -> StepError {
        let error = step(name, json!(null)).expect_err("the step fails");
        assert_eq!(error.kind, INVALID_OUTPUT, "{error:?}");
        error
    }

    #[test]
    fn function_returns_transformed_input() {
        let output = step("transform", json!({"numbers": [1, 2, 3], "name": "ada"}));
        assert_eq!(output, Ok(json!({"doubled": [2, 4, 6], "name": "ADA"})));
    }

    #[test]
    fn values_round_trip_unchanged() {
        let input = json!({
            "text": "héllo ✓ 😀 \u{0} \"quoted\"",
            "ints": [0, -1, 42, i64::MIN, i64::MAX, u64::MAX],
            "floats": [1.5, -0.25, 1e300, 2.0],
            "flags": [true, false],
            "nothing": null,
            "nested": {"list": [[], {}, [{"deep": [1, {"deeper": null}]}]], "": "empty key"},
        });
        assert_eq!(step("echo", input.clone()), Ok(input));
        for scalar in [json!(null), json!(true), json!(7), json!(0.5), json!("x")] {
            assert_eq!(step("echo", scalar.clone()), Ok(scalar));
        }
    }

    #[test]
    fn booleans_stay_booleans() {
        let output = call(
            PythonTarget::Code {
                source: "def main(input):\n    return [type(v).__name__ for v in input]\n"
                    .to_owned(),
            },
            json!([true, 1, 1.0, "1", null, [], {}]),
        );
        assert_eq!(
            output,
            Ok(json!([
                "bool", "int", "float", "str", "NoneType", "list", "dict"
            ]))
        );
    }

    #[test]
    fn ctx_parameter_receives_the_attempt_identity() {
        let output = step("describe_ctx", json!({"id": 1}));
        assert_eq!(
            output,
            Ok(json!({
                "type": "taskfleet.context.Context",
                "run_id": "run-1",
                "task_id": "task-1",
                "step_id": "price",
                "attempt": 2,
                "logger": "taskfleet.step.price",
            }))
        );
        assert_eq!(step("keyword_only_ctx", json!(null)), Ok(json!(2)));
        assert_eq!(step("positional_only_ctx", json!(null)), Ok(json!("price")));
        assert_eq!(step("no_ctx", json!(null)), Ok(json!(null)));
    }

    #[test]
    fn raised_exception_gives_class_message_and_traceback() {
        let error = step("fail", json!(3)).expect_err("the step raises");
        assert_eq!(error.kind, "ValueError");
        assert_eq!(error.message, "bad value: 3");
        let line = STEPS
            .lines()
            .position(|line| line.contains("raise ValueError"))
            .expect("the fixture raises ValueError")
            + 1;
        let traceback = error.traceback.expect("a traceback");
        assert!(
            traceback.contains(&format!("steps_under_test.py\", line {line}, in fail")),
            "{traceback}"
        );
        assert!(
            traceback.contains("ValueError: bad value: 3"),
            "{traceback}"
        );

        let error = step("fail_custom", json!(null)).expect_err("the step raises");
        assert_eq!(
            (error.kind.as_str(), error.message.as_str()),
            ("PricingError", "no price")
        );
        let error = step("fail_key", json!({})).expect_err("the step raises");
        assert_eq!(
            (error.kind.as_str(), error.message.as_str()),
            ("KeyError", "'missing'")
        );
    }

    #[test]
    fn missing_module_names_the_module_and_the_search_path() {
        let error = call(function("no_such_module_here", "run"), json!(null))
            .expect_err("the import fails");
        assert_eq!(error.kind, IMPORT_ERROR);
        assert!(
            error.message.contains("'no_such_module_here'"),
            "{}",
            error.message
        );
        assert!(
            error.message.contains("ModuleNotFoundError"),
            "{}",
            error.message
        );
        let first = fixture().dir.join("first");
        assert!(
            error.message.contains(first.to_string_lossy().as_ref()),
            "{}",
            error.message
        );
    }

    #[test]
    fn module_raising_at_import_reports_its_exception() {
        let error =
            call(function("broken_module", "run"), json!(null)).expect_err("the import fails");
        assert_eq!(error.kind, IMPORT_ERROR);
        assert!(
            error
                .message
                .contains("'broken_module': RuntimeError: broken at import"),
            "{}",
            error.message
        );
        let traceback = error.traceback.expect("a traceback");
        assert!(
            traceback.contains("broken_module.py\", line 2"),
            "{traceback}"
        );
    }

    #[test]
    fn missing_function_names_module_and_function() {
        let error = step("nope", json!(null)).expect_err("the lookup fails");
        assert_eq!(error.kind, IMPORT_ERROR);
        assert!(
            error
                .message
                .starts_with("module 'steps_under_test' has no function 'nope'"),
            "{}",
            error.message
        );
        let error = step("not_callable", json!(null)).expect_err("the lookup fails");
        assert_eq!(error.kind, IMPORT_ERROR);
        assert!(
            error.message.contains("is not callable: it is a int"),
            "{}",
            error.message
        );
    }

    #[test]
    fn nested_attribute_is_callable() {
        assert_eq!(step("Pricer.price", json!({"qty": 4})), Ok(json!(8)));
    }

    #[test]
    fn module_fixed_after_a_failure_loads() {
        let dir = fixture().dir.join("first");
        let error = call(function("appears_later", "run"), json!(null));
        assert_eq!(
            error.map_err(|error| error.kind),
            Err(IMPORT_ERROR.to_owned())
        );
        write(
            &dir.join("appears_later.py"),
            "def run(_):\n    return 'here'\n",
        );
        assert_eq!(
            call(function("appears_later", "run"), json!(null)),
            Ok(json!("here"))
        );
    }

    #[test]
    fn first_python_path_entry_wins() {
        assert_eq!(
            call(function("shadowed", "which"), json!(null)),
            Ok(json!("first"))
        );
    }

    #[test]
    fn inexpressible_output_names_type_and_place() {
        let cases = [
            ("returns_datetime", "datetime.datetime at $.when"),
            ("returns_set", "set at $.items[1]"),
            (
                "returns_big_int",
                "int outside the 64-bit range (65 bits) at $.n",
            ),
            ("returns_nan", "float nan at $[0]"),
            ("returns_int_keys", "dict key of type int at $.counts"),
        ];
        for (name, expected) in cases {
            let error = output_error(name);
            assert_eq!(
                error.message,
                format!("step returned a value JSON cannot express: {expected}"),
                "{name}"
            );
        }
        let error = output_error("returns_generator");
        assert_eq!(
            error.message,
            "step returned a generator; return a list instead"
        );
        let error = output_error("returns_cycle");
        assert!(
            error.message.contains("nested deeper than"),
            "{}",
            error.message
        );
    }

    #[test]
    fn tuples_become_arrays() {
        assert_eq!(
            step("returns_tuple", json!(null)),
            Ok(json!([1, [2, [3, "x"]]]))
        );
    }

    #[test]
    fn python_code_defines_main() {
        let source = "import math\n\ndef main(input, ctx):\n    return {'root': math.sqrt(input), 'step': ctx.step_id}\n";
        let target = PythonTarget::Code {
            source: source.to_owned(),
        };
        assert_eq!(
            call(target.clone(), json!(16)),
            Ok(json!({"root": 4.0, "step": "price"}))
        );
        assert_eq!(
            call(target, json!(9)),
            Ok(json!({"root": 3.0, "step": "price"}))
        );
    }

    #[test]
    fn python_code_errors_are_clear() {
        let code = |source: &str| PythonTarget::Code {
            source: source.to_owned(),
        };
        let error = call(code("def helper(input):\n    return input\n"), json!(1))
            .expect_err("there is no main");
        assert_eq!(error.kind, IMPORT_ERROR);
        assert_eq!(
            error.message,
            "python_code does not define a function main(input)"
        );

        let error = call(code("def main(input)\n    return input\n"), json!(1))
            .expect_err("the source does not compile");
        assert_eq!(error.kind, IMPORT_ERROR);
        assert!(
            error
                .message
                .starts_with("python_code does not compile: SyntaxError"),
            "{}",
            error.message
        );

        let error = call(code("def main(input):\n    return 1 / input\n"), json!(0))
            .expect_err("the step raises");
        assert_eq!(error.kind, "ZeroDivisionError");
        let traceback = error.traceback.expect("a traceback");
        assert!(traceback.contains("line 2, in main"), "{traceback}");
        assert!(traceback.contains("return 1 / input"), "{traceback}");
    }

    #[test]
    fn async_steps_are_awaited() {
        assert_eq!(step("async_step", json!(41)), Ok(json!(42)));
        let error = step("async_fail", json!(null)).expect_err("the step raises");
        assert_eq!(
            (error.kind.as_str(), error.message.as_str()),
            ("KeyError", "'gone'")
        );
        // The traceback starts at the step, not in the event loop that ran it.
        let traceback = error.traceback.expect("a traceback");
        let first_frame = traceback.lines().nth(1).unwrap_or_default();
        assert!(
            first_frame.contains("steps_under_test.py") && first_frame.contains("in async_fail"),
            "{traceback}"
        );
    }

    #[test]
    fn stopped_call_is_interrupted() {
        fixture();
        // An interpreter thread of its own: no other test's call runs on it or stops it.
        let interpreter = Interpreter::start(PythonSettings::default()).expect("starting");
        let (id, spinning) = interpreter.send(function("steps_under_test", "spin"), json!(null));
        assert!(
            spinning.recv_timeout(Duration::from_millis(300)).is_err(),
            "spin never returns"
        );
        interpreter.stopper.stop(id);
        let stopped = spinning
            .recv_timeout(Duration::from_secs(30))
            .expect("the stopped call ends");
        assert_eq!(
            stopped.result.map_err(|error| error.kind),
            Err("StepCancelled".to_owned())
        );
        // The interpreter is free again only if the spinning step was interrupted.
        let after = interpreter.call(function("steps_under_test", "echo"), json!("after"));
        assert_eq!(after.result, Ok(json!("after")));
    }

    #[test]
    fn call_stopped_before_it_starts_is_skipped() {
        fixture();
        let interpreter = Interpreter::start(PythonSettings::default()).expect("starting");
        let busy = PythonTarget::Code {
            source: "import time\n\ndef main(input):\n    time.sleep(0.2)\n    return input\n"
                .to_owned(),
        };
        let (_, first) = interpreter.send(busy, json!(1));
        let (id, second) = interpreter.send(function("steps_under_test", "echo"), json!(2));
        interpreter.stopper.stop(id);
        let timeout = Duration::from_secs(30);
        let first = first.recv_timeout(timeout).expect("the first call ends");
        assert_eq!(first.result, Ok(json!(1)));
        let second = second.recv_timeout(timeout).expect("the skipped call ends");
        let error = second.result.expect_err("the call was skipped");
        assert_eq!(
            (error.kind.as_str(), error.message.as_str()),
            (CANCELLED, "the step was given up before it started")
        );
    }

    #[test]
    fn concurrent_calls_all_complete() {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..50)
                .map(|n| scope.spawn(move || step("echo", json!(n))))
                .collect();
            for (n, handle) in handles.into_iter().enumerate() {
                let output = handle.join().expect("the calling thread finished");
                assert_eq!(output, Ok(json!(n)));
            }
        });
    }

    #[test]
    fn virtualenv_site_packages_are_importable() {
        fixture();
        let version = pyo3::Python::attach(|py| {
            let info = py.version_info();
            format!("{}.{}", info.major, info.minor)
        });
        let venv = unique_dir("venv");
        let site_packages = venv
            .join("lib")
            .join(format!("python{version}"))
            .join("site-packages");
        std::fs::create_dir_all(&site_packages).expect("creating site-packages");
        write(
            &site_packages.join("venv_only_module.py"),
            "def hello(name):\n    return 'hi ' + name\n",
        );
        let settings = PythonSettings {
            python_path: Vec::new(),
            virtual_env: Some(venv.clone()),
            max_log_chars: 0,
        };
        let venv_dir = venv;
        // A second interpreter thread shares the interpreter, and with it sys.path.
        let interpreter = Interpreter::start(settings).expect("starting with a virtualenv");
        let output = interpreter
            .call(function("venv_only_module", "hello"), json!("venv"))
            .result;
        assert_eq!(output, Ok(json!("hi venv")));
        drop(interpreter);
        let _ = std::fs::remove_dir_all(venv_dir);
    }

    #[test]
    fn virtualenv_without_site_packages_is_an_error() {
        fixture();
        let venv = unique_dir("empty-venv");
        let settings = PythonSettings {
            python_path: Vec::new(),
            virtual_env: Some(venv.clone()),
            max_log_chars: 0,
        };
        let Err(error) = Interpreter::start(settings) else {
            panic!("the interpreter started without the virtualenv's site-packages");
        };
        assert!(
            matches!(&error, PythonStartError::MissingSitePackages { site_packages, .. } if site_packages.starts_with(&venv)),
            "{error:?}"
        );
        assert!(error.to_string().contains("site-packages"), "{error}");
        let _ = std::fs::remove_dir_all(venv);
    }
}
