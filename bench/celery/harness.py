"""What every workload of the Celery side of the benchmark runs on: a `celery worker`
subprocess started and stopped per round, deadlines, CPU sampling, and the statistics of the
JSON it prints. The workloads themselves and the command line are in run.py.
"""

import os
import resource
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

EXIT_FAIL, EXIT_UNAVAILABLE, EXIT_TIMEOUT = 1, 2, 3


def log(*args):
    print("[celery-bench]", *args, file=sys.stderr, flush=True)


class BenchError(Exception):
    code = EXIT_FAIL


class Unavailable(BenchError):
    code = EXIT_UNAVAILABLE


class RoundTimeout(BenchError):
    code = EXIT_TIMEOUT


class Deadline:
    def __init__(self, seconds):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self, what="round"):
        left = self.end - time.monotonic()
        if left <= 0:
            raise RoundTimeout(f"{what}: round timeout of {self.seconds:.0f} s exceeded")
        return left


# --- measurement helpers -----------------------------------------------------

def client_cpu():
    ru = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return ru.ru_utime + ru.ru_stime


def machine_ticks():
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = [int(x) for x in parts[:8]]  # user nice system idle iowait irq softirq steal
    return {"total": sum(vals), "idle": vals[3] + vals[4], "steal": vals[7]}


def machine_delta(a, b):
    total = max(1, b["total"] - a["total"])
    return {
        "busy_pct": round(100.0 * (total - (b["idle"] - a["idle"])) / total, 1),
        "steal_pct": round(100.0 * (b["steal"] - a["steal"]) / total, 1),
    }


def quantile(sorted_vals, q):
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_vals:
        return None
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def ms_stats(prefix, samples_s):
    s = sorted(samples_s)
    return {
        f"{prefix}p50_ms": round(quantile(s, 0.50) * 1e3, 3),
        f"{prefix}p99_ms": round(quantile(s, 0.99) * 1e3, 3),
        f"{prefix}mean_ms": round(statistics.fmean(s) * 1e3, 3),
        f"{prefix}min_ms": round(s[0] * 1e3, 3),
        f"{prefix}max_ms": round(s[-1] * 1e3, 3),
    }


# --- the worker subprocess ---------------------------------------------------

_live_workers = set()


def _kill_all_workers():
    for w in list(_live_workers):
        w.kill()


try:
    import ctypes

    _libc = ctypes.CDLL(None, use_errno=True)
    _PR_SET_PDEATHSIG = 1
except Exception:  # pragma: no cover
    _libc = None


def _child_setup():
    # If run.py dies without cleaning up (SIGKILL), the kernel kills the worker's
    # main process too; its pool children then exit on their pipes' EOF.
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Worker:
    def __init__(self, bt, concurrency, track):
        self.bt = bt
        cmd = [
            sys.executable, "-m", "celery", "-A", "bench_tasks", "worker",
            "-P", "prefork", "-c", str(concurrency),
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            # No "-O fair": since Celery 4 the prefork pool's default scheduling
            # strategy *is* fair (celery/concurrency/asynpool.py maps None and
            # 'default' to SCHED_STRATEGY_FAIR), so passing it changes nothing;
            # we leave the default, as a user would.
            "--loglevel=WARNING",
            "-n", f"{bt.NS}@%h",
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = HERE + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["CELERY_BENCH_TRACK"] = "1" if track else "0"
        self.started = time.monotonic()
        # stdout too goes to our stderr: our stdout carries only the JSON.
        self.proc = subprocess.Popen(
            cmd, cwd=HERE, env=env, stdin=subprocess.DEVNULL,
            stdout=sys.stderr.fileno(), stderr=sys.stderr.fileno(),
            start_new_session=True, preexec_fn=_child_setup,
        )
        self.pid = self.proc.pid
        _live_workers.add(self)
        log(f"worker pid {self.pid} started (-c {concurrency}, track={track})")

    def check_alive(self):
        rc = self.proc.poll()
        if rc is not None:
            raise BenchError(f"celery worker exited early with code {rc} (its log is above on stderr)")

    def wait_ready(self, r, deadline):
        """Until the worker_ready signal's record appears in Redis (bench_tasks.py)."""
        while True:
            self.check_alive()
            rec = r.hgetall(self.bt.READY_KEY)
            if rec:
                self.ready_s = time.monotonic() - self.started
                return {k.decode(): float(v) for k, v in rec.items()}
            deadline.left("waiting for the worker to be ready")
            time.sleep(0.02)

    def cpu(self):
        return self.bt.proc_tree_cpu(self.pid)

    def stop(self, timeout=30):
        """Warm shutdown (SIGTERM), then SIGKILL to the whole process group."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"worker {self.pid} did not stop within {timeout} s; killing it")
        self.kill()

    def kill(self):
        try:
            os.killpg(self.pid, signal.SIGKILL)  # the pool children are in its group
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        _live_workers.discard(self)


def warm_up(bt, concurrency, deadline):
    """Make every pool child run a task (its first Redis connection, its first
    import of the task path), and the client do a few round trips."""
    seen, tasks = set(), 0
    for _ in range(5):
        rs = [bt.probe.delay(0.05) for _ in range(2 * concurrency)]
        tasks += len(rs)
        seen.update(x.get(timeout=min(30, deadline.left("warm-up"))) for x in rs)
        if len(seen) >= concurrency:
            break
    for i in range(5):
        bt.echo.delay(i).get(timeout=min(30, deadline.left("warm-up")))
        tasks += 1
    return len(seen), tasks


def wait_done(r, bt, worker, n, deadline):
    """Until the children's flushed counter reaches n (tracking on)."""
    while True:
        done = int(r.get(bt.DONE_KEY) or 0)
        if done >= n:
            return done
        worker.check_alive()
        deadline.left(f"waiting for {n} tasks to finish ({done} done)")
        time.sleep(0.02)


def read_tracked(r, bt):
    firsts, lasts, count = [], [], 0
    for key in r.smembers(bt.PROCS_KEY):
        h = {k.decode(): v.decode() for k, v in r.hgetall(key).items()}
        if not h or h.get("first") in (None, "None"):
            continue
        firsts.append(float(h["first"]))
        lasts.append(float(h["last"]))
        count += int(h["count"])
    if not firsts:
        raise BenchError("no task timestamps recorded by the worker")
    return min(firsts), max(lasts), count, len(firsts)


def cpu_fields(out, worker_cpu, client_cpu_s, tasks):
    out["tasks"] = tasks
    out["worker_cpu_s"] = round(worker_cpu, 3)
    out["client_cpu_s"] = round(client_cpu_s, 4)
    out["worker_cpu_per_task_us"] = round(1e6 * worker_cpu / tasks, 1)
    out["client_cpu_per_task_us"] = round(1e6 * client_cpu_s / tasks, 1)


# --- workloads ---------------------------------------------------------------
# Each returns the round's figures. `ctx` has bt (bench_tasks), r (Redis), args.
