//! The fleet's processes: starting, stopping, signalling and replacing its scheduler and
//! workers, and removing everything the fleet left in the services when it is dropped.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::*;

impl TestFleet {
    /// Starts a scheduler and two workers.
    pub async fn start() -> Result<Self> {
        Self::start_with(FleetOptions::default()).await
    }

    /// Starts a fleet as `options` say and waits until the API is ready.
    pub async fn start_with(options: FleetOptions) -> Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let namespace = format!("tft-{}", &id[..12]);
        let database = options
            .shared_database
            .clone()
            .unwrap_or_else(|| format!("tft_{}", &id[..12]));
        let log_dir = workspace_root().join("target/test-logs").join(&namespace);
        std::fs::create_dir_all(&log_dir)?;
        let port = free_port();
        let api_key = create_key(
            &options.services,
            &namespace,
            &database,
            &log_dir,
            TEST_TENANT,
            "admin",
        )?;
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            reqwest::header::HeaderValue::from_str(&format!("Bearer {api_key}"))?,
        );
        let mut http = http_client();
        let api = match &options.api_tls {
            Some(pki) => {
                let ca = reqwest::Certificate::from_pem(&std::fs::read(&pki.ca)?)?;
                http = http.tls_certs_only([ca]);
                format!("https://localhost:{port}")
            }
            None => format!("http://127.0.0.1:{port}"),
        };
        let mut fleet = Self {
            api,
            namespace,
            database,
            api_key,
            http: http
                .timeout(Duration::from_secs(120))
                .default_headers(headers)
                .build()?,
            scheduler: None,
            scheduler_port: port,
            started_schedulers: 0,
            other_schedulers: Vec::new(),
            workers: Vec::new(),
            options: options.clone(),
            log_dir,
            started_workers: 0,
        };
        fleet.start_scheduler(port)?;
        for _ in 0..options.workers {
            fleet.start_worker()?;
        }
        fleet.wait_ready().await?;
        Ok(fleet)
    }

    /// Sets an environment variable of the schedulers and workers started from now on.
    pub fn set_env(&mut self, key: &str, value: &str) {
        for env in [
            &mut self.options.scheduler_env,
            &mut self.options.worker_env,
        ] {
            env.retain(|(known, _)| known != key);
            env.push((key.to_owned(), value.to_owned()));
        }
    }

    /// Makes another API key of this fleet, as `taskfleet-scheduler create-key` does, and
    /// returns it.
    pub fn create_key(&self, tenant: &str, scopes: &str) -> Result<String> {
        create_key(
            &self.options.services,
            &self.namespace,
            &self.database,
            &self.log_dir,
            tenant,
            scopes,
        )
    }

    /// Returns the file a process of this fleet writes its output to: `scheduler`, or
    /// `worker-{n}` for the n-th worker started (from 0).
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.log_dir.join(format!("{name}.log"))
    }

    fn log(&self, name: &str) -> Result<(Stdio, Stdio)> {
        let file = File::create(self.log_dir.join(format!("{name}.log")))?;
        Ok((file.try_clone()?.into(), file.into()))
    }

    fn start_scheduler(&mut self, port: u16) -> Result<()> {
        self.scheduler_port = port;
        self.scheduler = Some(self.spawn_scheduler(port, "scheduler")?);
        Ok(())
    }

    /// Kills the scheduler with SIGKILL.
    pub fn kill_scheduler(&mut self) {
        if let Some(mut scheduler) = self.scheduler.take() {
            let _ = scheduler.kill();
            let _ = scheduler.wait();
        }
    }

    /// Kills every scheduler started by [`start_another_scheduler`](Self::start_another_scheduler)
    /// with SIGKILL.
    pub fn kill_other_schedulers(&mut self) {
        for mut scheduler in self.other_schedulers.drain(..) {
            let _ = scheduler.kill();
            let _ = scheduler.wait();
        }
    }

    /// Starts the scheduler again on its address (after [`kill_scheduler`](Self::kill_scheduler))
    /// and waits until it is ready.
    pub async fn restart_scheduler(&mut self) -> Result<()> {
        self.kill_scheduler();
        self.started_schedulers += 1;
        let name = format!("scheduler-{}", self.started_schedulers);
        self.scheduler = Some(self.spawn_scheduler(self.scheduler_port, &name)?);
        self.wait_ready().await
    }

    /// Starts another scheduler of the same fleet (same database and namespace) on an address
    /// of its own, waits until it is ready and returns its API URL.
    pub async fn start_another_scheduler(&mut self) -> Result<String> {
        self.started_schedulers += 1;
        let name = format!("scheduler-{}", self.started_schedulers);
        let port = free_port();
        self.other_schedulers
            .push(self.spawn_scheduler(port, &name)?);
        let api = match self.options.api_tls {
            Some(_) => format!("https://localhost:{port}"),
            None => format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(response) = self.http.get(format!("{api}/readyz")).send().await
                && response.status().is_success()
            {
                return Ok(api);
            }
            if Instant::now() > deadline {
                bail!("the other scheduler was not ready within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn spawn_scheduler(&self, port: u16, name: &str) -> Result<Child> {
        let (stdout, stderr) = self.log(name)?;
        let mut command = Command::new(binary("taskfleet-scheduler")?);
        command
            .env(
                "TASKFLEET_DATABASE_URL",
                self.options.services.database_url(&self.database),
            )
            .env("TASKFLEET_AMQP_URL", &self.options.services.amqp)
            .env("TASKFLEET_REDIS_URL", &self.options.services.redis)
            .env("TASKFLEET_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("TASKFLEET_NAMESPACE", &self.namespace)
            .env("RUST_LOG", "info,taskfleet_scheduler=debug")
            .stdout(stdout)
            .stderr(stderr);
        if let Some(pki) = &self.options.api_tls {
            command
                .env("TASKFLEET_TLS_CERT", &pki.cert)
                .env("TASKFLEET_TLS_KEY", &pki.key);
        }
        for (key, value) in &self.options.scheduler_env {
            command.env(key, value);
        }
        command.spawn().context("starting the scheduler")
    }

    /// Starts one more worker.
    pub fn start_worker(&mut self) -> Result<()> {
        self.start_worker_with(&[])
    }

    /// Starts one more worker with extra command-line arguments (after those of the options).
    pub fn start_worker_with(&mut self, extra: &[&str]) -> Result<()> {
        let index = self.started_workers;
        self.started_workers += 1;
        let (stdout, stderr) = self.log(&format!("worker-{index}"))?;
        let root = workspace_root();
        let child = Command::new(binary("taskfleet-worker")?)
            .arg("--python-path")
            .arg(root.join("tests/python"))
            .arg("--python-path")
            .arg(root.join("examples/steps"))
            .arg("--concurrency")
            .arg(self.options.concurrency.to_string())
            .args(&self.options.worker_args)
            .args(extra)
            .env("TASKFLEET_AMQP_URL", &self.options.services.amqp)
            .env("TASKFLEET_REDIS_URL", &self.options.services.redis)
            .env("TASKFLEET_NAMESPACE", &self.namespace)
            .env("TASKFLEET_LEASE_TTL_S", "3")
            // Steps of these tests leave marker files in the temporary directory.
            .env("TASKFLEET_PYTHON_WRITABLE_PATHS", std::env::temp_dir())
            .env("RUST_LOG", "info,taskfleet_worker=debug")
            .envs(self.options.worker_env.iter().map(|(k, v)| (k, v)))
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .context("starting a worker")?;
        self.workers.push(child);
        Ok(())
    }

    /// Starts a new worker for each one that has exited; returns how many were replaced.
    pub fn replace_dead_workers(&mut self) -> Result<usize> {
        let before = self.workers.len();
        self.workers
            .retain_mut(|worker| matches!(worker.try_wait(), Ok(None)));
        let dead = before - self.workers.len();
        for _ in 0..dead {
            self.start_worker()?;
        }
        Ok(dead)
    }

    /// Waits until run `id` ends, starting a new worker for each one that dies meanwhile, as a
    /// supervisor would; `after_losses(lost_so_far)` is called after each replacement. Returns
    /// the run and how many workers were replaced.
    pub async fn wait_run_replacing_workers(
        &mut self,
        id: &str,
        within: Duration,
        mut after_losses: impl FnMut(usize),
    ) -> (Value, usize) {
        let deadline = Instant::now() + within;
        let mut replaced = 0;
        loop {
            let (_, run) = self
                .request("GET", &format!("/v1/runs/{id}?wait=0.2"), None)
                .await;
            if run["status"] != "running" {
                return (run, replaced);
            }
            let dead = self.replace_dead_workers().expect("replacing dead workers");
            if dead > 0 {
                replaced += dead;
                after_losses(replaced);
            }
            assert!(Instant::now() < deadline, "the run never ended: {run:#}");
        }
    }

    /// Kills every worker with SIGKILL.
    pub fn kill_workers(&mut self) {
        for mut worker in self.workers.drain(..) {
            let _ = worker.kill();
            let _ = worker.wait();
        }
    }

    /// Sends SIGTERM to the oldest running worker, waits for it to exit (up to `within`) and
    /// returns its exit code (`None` if a signal ended it).
    pub async fn terminate_oldest_worker(&mut self, within: Duration) -> Result<Option<i32>> {
        let Some(pid) = self.workers.first().map(Child::id) else {
            bail!("no worker to terminate");
        };
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.workers[0].try_wait()? {
                // Reaped by try_wait; wait returns the same status at once.
                let _ = self.workers.remove(0).wait();
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                // Left in the list: the fleet kills it when dropped.
                bail!("the worker did not exit within {within:?} of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `signal` (a name such as `STOP` or `CONT`) to the worker at `index` (in order of
    /// start, among those still listed); returns its process id.
    pub fn signal_worker(&self, index: usize, signal: &str) -> Result<u32> {
        let pid = self
            .workers
            .get(index)
            .map(Child::id)
            .context("no such worker")?;
        let status = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -{signal} {pid} failed");
        }
        Ok(pid)
    }

    /// Returns how many of the workers started are still running.
    pub fn workers_alive(&mut self) -> usize {
        self.workers
            .iter_mut()
            .filter_map(|worker| worker.try_wait().ok())
            .filter(Option::is_none)
            .count()
    }

    /// Returns the process id of the scheduler, if it runs.
    pub fn scheduler_pid(&self) -> Option<u32> {
        self.scheduler.as_ref().map(Child::id)
    }

    /// Returns the process ids of the workers started and not yet reaped.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.workers.iter().map(Child::id).collect()
    }

    /// Returns whether the scheduler process is still running.
    pub fn scheduler_alive(&mut self) -> bool {
        self.scheduler
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(response) = self.http.get(format!("{}/readyz", self.api)).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if !self.scheduler_alive() {
                bail!(
                    "the scheduler exited during start; see {}",
                    self.log_dir.join("scheduler.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!("the scheduler was not ready within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl TestFleet {
    fn cleanup(&mut self) {
        self.kill_scheduler();
        for mut scheduler in self.other_schedulers.drain(..) {
            let _ = scheduler.kill();
            let _ = scheduler.wait();
        }
        self.kill_workers();
        let database = self.database.clone();
        let owns_database = self.options.shared_database.is_none();
        let namespace = self.namespace.clone();
        // Drop runs outside any runtime the test may still hold, on a thread of its own.
        let cleaner = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(remove_fleet_state(&database, owns_database, &namespace));
        });
        let _ = cleaner.join();
    }
}

impl Drop for TestFleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "fleet {} failed; its logs are in {}",
                self.namespace,
                self.log_dir.display()
            );
            print_log_tails(&self.log_dir);
        }
        self.cleanup();
    }
}

/// Prints the last lines of every log of a failed fleet, so that a failure seen only in a CI
/// log can be read there.
fn print_log_tails(log_dir: &Path) {
    const LINES: usize = 30;
    let Ok(entries) = std::fs::read_dir(log_dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
    paths.sort();
    for path in paths {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LINES)..];
        eprintln!("--- last {} lines of {}", tail.len(), path.display());
        for line in tail {
            eprintln!("{line}");
        }
    }
}

async fn remove_fleet_state(database: &str, owns_database: bool, namespace: &str) {
    use sqlx::Connection;
    // Every task queue the fleet used, from its own record.
    let mut queues = vec!["default".to_owned()];
    if let Ok(mut db) = sqlx::PgConnection::connect(&format!("{POSTGRES}/{database}")).await {
        let used: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT t.queue FROM tasks t JOIN runs r ON r.id = t.run_id
             WHERE r.namespace = $1",
        )
        .bind(namespace)
        .fetch_all(&mut db)
        .await
        .unwrap_or_default();
        queues.extend(used);
        let _ = db.close().await;
    }
    if owns_database
        && let Ok(mut db) = sqlx::PgConnection::connect(&format!("{POSTGRES}/postgres")).await
    {
        let statement = format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)");
        let _ = sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&mut db)
            .await;
    }
    if let Ok(connection) =
        lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default()).await
    {
        let names = queues
            .iter()
            .map(|queue| format!("{namespace}.tasks.{queue}"))
            .chain([
                format!("{namespace}.completions"),
                format!("{namespace}.dead-letters"),
            ]);
        for name in names {
            // One channel each: deleting a queue that is not there closes its channel.
            if let Ok(channel) = connection.create_channel().await {
                let _ = channel
                    .queue_delete(name.into(), lapin::options::QueueDeleteOptions::default())
                    .await;
            }
        }
        let _ = connection.close(200, "test done".into()).await;
    }
    if let Ok(client) = redis::Client::open(REDIS)
        && let Ok(mut redis) = client.get_multiplexed_async_connection().await
    {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{namespace}:*"))
            .query_async(&mut redis)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query_async(&mut redis).await;
        }
    }
}

/// Makes an API key with `taskfleet-scheduler create-key` (which creates and migrates the
/// database if it is new) and returns it: the command's last line.
fn create_key(
    services: &Services,
    namespace: &str,
    database: &str,
    log_dir: &Path,
    tenant: &str,
    scopes: &str,
) -> Result<String> {
    let output = Command::new(binary("taskfleet-scheduler")?)
        .args(["create-key", "--tenant", tenant, "--scopes", scopes])
        .env("TASKFLEET_DATABASE_URL", services.database_url(database))
        .env("TASKFLEET_NAMESPACE", namespace)
        .output()
        .context("running taskfleet-scheduler create-key")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let _ = std::fs::write(log_dir.join("create-key.log"), format!("{stdout}{stderr}"));
        bail!("taskfleet-scheduler create-key failed: {stderr}");
    }
    stdout
        .lines()
        .last()
        .map(str::to_owned)
        .context("taskfleet-scheduler create-key printed nothing")
}
