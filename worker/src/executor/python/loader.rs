//! Resolving a step's target to a callable: importing a module and reading the function from it,
//! or compiling `python_code` source into a module of its own and taking its `main`; how each
//! callable takes `ctx`; and the cache of what was resolved. Failures become `import_error`s that
//! name the module, the function or the search path. It does not call the step.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use pyo3::exceptions::PyImportError;
use pyo3::prelude::*;
use pyo3::types::{PyModule, PyString};
use taskfleet_common::StepError;
use taskfleet_common::error::IMPORT_ERROR;

use super::PythonTarget;
use super::convert::type_name;
use super::exception::{describe, exception_error};

/// How many `python_code` sources stay compiled before the cache of them is emptied.
const MAX_CACHED_CODE: usize = 256;

/// How a callable wants its `ctx`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CtxPassing {
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

/// The callables resolved so far, kept by the interpreter thread between calls.
#[derive(Default)]
pub(super) struct Loader {
    /// Callables resolved successfully; failures are not cached so a fixed module loads.
    loaded: HashMap<PythonTarget, Loaded>,
    /// The `python_code` modules compiled, registered in `sys.modules` and `linecache` while
    /// they are cached.
    code_modules: Vec<CodeModule>,
}

impl Loader {
    /// Returns the callable for a target, resolving and caching it on first use.
    pub(super) fn load(
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
    // Source that does not compile fails with its own error type (`SyntaxError`,
    // `IndentationError`), whose message names the line; what fails later is an import error.
    let (compiled, module) = setup().map_err(|error| {
        let step_error = exception_error(py, &error);
        StepError {
            message: format!("python_code does not compile: {}", step_error.message),
            ..step_error
        }
    })?;
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

#[cfg(test)]
mod tests {
    use serde_json::json;
    use taskfleet_common::error::IMPORT_ERROR;

    use super::super::PythonTarget;
    use super::super::test_support::{call, fixture, function, step, write};

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
        assert_eq!(error.kind, "SyntaxError");
        assert!(
            error.message.starts_with("python_code does not compile: ")
                && error.message.contains("line 1"),
            "{}",
            error.message
        );
        let error = call(code("def main(input):\nreturn input\n"), json!(1))
            .expect_err("the source does not compile");
        assert_eq!(error.kind, "IndentationError", "{}", error.message);

        let error = call(code("def main(input):\n    return 1 / input\n"), json!(0))
            .expect_err("the step raises");
        assert_eq!(error.kind, "ZeroDivisionError");
        let traceback = error.traceback.expect("a traceback");
        assert!(traceback.contains("line 2, in main"), "{traceback}");
        assert!(traceback.contains("return 1 / input"), "{traceback}");
    }
}
