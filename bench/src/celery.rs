//! The Celery side of each workload: `bench/celery/run.py` in a virtualenv of its own (made by
//! `bench/celery/setup.sh` from PyPI), run as a subprocess that prints one JSON report.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

/// A Celery installation ready to run workloads.
pub struct Celery {
    python: PathBuf,
    script: PathBuf,
    /// The installed Celery version.
    pub version: String,
}

impl Celery {
    /// Makes (or reuses) the benchmark's virtualenv under `target/` and checks that Celery runs.
    pub fn install(root: &Path) -> Result<Self> {
        let setup = root.join("bench/celery/setup.sh");
        let venv = root.join("target/bench-celery-venv");
        let output = Command::new(&setup)
            .arg(&venv)
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("running {}", setup.display()))?;
        ensure!(
            output.status.success(),
            "{} failed: {}",
            setup.display(),
            output.status
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        let python = stdout
            .lines()
            .last()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .context("setup.sh printed no python path")?;
        let version = Command::new(python)
            .args(["-c", "import celery; print(celery.__version__)"])
            .output()
            .context("asking the virtualenv for celery's version")?;
        ensure!(
            version.status.success(),
            "celery does not import in {python}"
        );
        Ok(Self {
            python: PathBuf::from(python),
            script: root.join("bench/celery/run.py"),
            version: String::from_utf8_lossy(&version.stdout).trim().to_owned(),
        })
    }

    /// Runs `workload` with extra arguments and returns its report's medians (every numeric
    /// field of its rounds).
    pub fn run(&self, workload: &str, args: &[String]) -> Result<Value> {
        let output = Command::new(&self.python)
            .arg(&self.script)
            .arg(workload)
            .args(args)
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("running celery workload {workload}"))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let report: Value = stdout
            .lines()
            .rev()
            .find_map(|line| serde_json::from_str(line).ok())
            .with_context(|| format!("celery workload {workload} printed no report: {stdout}"))?;
        if report["ok"] != Value::Bool(true) || !output.status.success() {
            bail!(
                "celery workload {workload} failed ({}): {}",
                output.status,
                report["error"]
            );
        }
        Ok(report["median"].clone())
    }
}
