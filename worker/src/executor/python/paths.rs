//! Where steps' modules are imported from: the settings' python path and virtualenv, put on
//! `sys.path` once, when an interpreter thread starts. It must not import step modules; that is
//! [`super::loader`]'s work, at each call.

use std::ffi::CStr;
use std::path::{Path, PathBuf};

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::exception::start_error;
use super::{PythonSettings, PythonStartError};

/// Moves the entries `site.addsitedir` added for a virtualenv in front of the interpreter's own
/// site-packages, so the virtualenv's packages win, as they would in the virtualenv's own Python.
const ADD_VIRTUALENV: &CStr = pyo3::ffi::c_str!(include_str!("add_virtualenv.py"));

/// Adds the virtualenv's site-packages to `sys.path`, then prepends the python path, so the
/// python path's directories are searched first.
pub(super) fn apply(py: Python<'_>, settings: &PythonSettings) -> Result<(), PythonStartError> {
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
        .map_err(|error| start_error(py, "prepending the python path to sys.path", &error))
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::test_support::{Interpreter, call, fixture, function, unique_dir, write};
    use super::super::{PythonSettings, PythonStartError};

    #[test]
    fn first_python_path_entry_wins() {
        assert_eq!(
            call(function("shadowed", "which"), json!(null)),
            Ok(json!("first"))
        );
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
            ..PythonSettings::default()
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
            ..PythonSettings::default()
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
