//! What the interpreter thread keeps between calls, set up once from the settings, and one call
//! from callable to output: the input converted, `ctx` built and passed the way the callable
//! takes it, a returned coroutine run to its end, the output converted. It does not catch what a
//! step raises beyond turning it into the call's error, and it does not decide retries, timeouts
//! or statuses.

use std::ffi::CStr;

use pyo3::exceptions::PyBaseException;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyFloat, PyInt, PyList, PyModule, PyString, PyTuple, PyType};
use serde_json::Value;
use taskfleet_common::StepError;
use taskfleet_common::error::INVALID_OUTPUT;

use super::capture::OutputCapture;
use super::convert::{from_python, to_python};
use super::exception::{describe, exception_error, skip_leading_frames, start_error};
use super::interrupt::InterruptState;
use super::loader::{CtxPassing, Loader};
use super::{PythonSettings, PythonStartError, PythonTarget, StepContext, paths};

/// Source of the bundled `taskfleet.context` module, used when the package is not installed.
const CONTEXT_SOURCE: &CStr =
    pyo3::ffi::c_str!(include_str!("../../../../python/taskfleet/context.py"));
/// Source of the bundled `taskfleet/__init__.py`, used when the package is not installed.
const PACKAGE_SOURCE: &CStr =
    pyo3::ffi::c_str!(include_str!("../../../../python/taskfleet/__init__.py"));

/// Everything the interpreter thread keeps between jobs.
pub(super) struct Runtime {
    /// `taskfleet.Context`, from the installed package or the bundled copy.
    context_type: Py<PyAny>,
    /// What each call prints or logs.
    pub(super) capture: OutputCapture,
    /// The callables resolved so far.
    loader: Loader,
}

impl Runtime {
    /// Applies the settings and prepares what every job needs.
    pub(super) fn start(
        py: Python<'_>,
        settings: &PythonSettings,
        state: &InterruptState,
    ) -> Result<Self, PythonStartError> {
        paths::apply(py, settings)?;
        let ident: u64 = py
            .import("threading")
            .and_then(|threading| threading.call_method0("get_ident"))
            .and_then(|ident| ident.extract())
            .map_err(|error| start_error(py, "reading the interpreter thread's id", &error))?;
        let context_type = context_type(py)
            .map_err(|error| start_error(py, "loading taskfleet.Context", &error))?;
        let cancelled = step_cancelled_type(py, context_type.bind(py))
            .map_err(|error| start_error(py, "creating the cancellation exception", &error))?;
        state.arm(ident, cancelled);
        let capture = OutputCapture::load(py, settings.max_log_chars)?;
        Ok(Self {
            context_type,
            capture,
            loader: Loader::default(),
        })
    }

    /// Runs one step call: resolves the callable, converts the input, calls, settles a
    /// coroutine and converts the output.
    pub(super) fn run(
        &mut self,
        py: Python<'_>,
        target: &PythonTarget,
        input: &Value,
        ctx: &StepContext,
    ) -> Result<Value, StepError> {
        let (callable, ctx_passing) = self.loader.load(py, target)?;
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
            .and_then(|()| self.context_type.bind(py).call((), Some(&kwargs)))
            // Set after construction rather than passed: an installed `taskfleet` older than
            // trace ids has a `Context` that takes no such argument.
            .and_then(|context| {
                context
                    .setattr("trace_id", ctx.trace_id.as_deref())
                    .map(|()| context)
            });
        built.map_err(|error| exception_error(py, &error))
    }
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::test_support::step;

    #[test]
    fn function_returns_transformed_input() {
        let output = step("transform", json!({"numbers": [1, 2, 3], "name": "ada"}));
        assert_eq!(output, Ok(json!({"doubled": [2, 4, 6], "name": "ADA"})));
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
                "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
                "logger": "taskfleet.step.price",
            }))
        );
        assert_eq!(step("keyword_only_ctx", json!(null)), Ok(json!(2)));
        assert_eq!(step("positional_only_ctx", json!(null)), Ok(json!("price")));
        assert_eq!(step("no_ctx", json!(null)), Ok(json!(null)));
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
}
