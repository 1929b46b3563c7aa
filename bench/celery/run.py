#!/usr/bin/env python3
"""Celery side of the taskfleet benchmark.

    python run.py <workload> [--n N] [--rounds R] [--concurrency C] [...]

Runs the workload R times, each round with a fresh `celery worker` subprocess, and
prints ONE JSON object on stdout (everything else goes to stderr). Run it with the
virtualenv's python that setup.sh prints. See README.md for the workloads and the
JSON shape.

Exit codes: 0 ok; 1 a round failed (wrong result, worker died, ...); 2 Celery not
installed, or RabbitMQ/Redis unreachable; 3 a round hit its timeout. On a non-zero
exit the JSON object on stdout has "ok": false and "error".
"""

import argparse
import atexit
import json
import os
import platform
import signal
import statistics
import sys
import threading
import time
import uuid

from harness import (
    EXIT_FAIL,
    EXIT_TIMEOUT,
    EXIT_UNAVAILABLE,
    _kill_all_workers,
    BenchError,
    client_cpu,
    cpu_fields,
    Deadline,
    log,
    machine_delta,
    machine_ticks,
    ms_stats,
    read_tracked,
    RoundTimeout,
    Unavailable,
    wait_done,
    warm_up,
    Worker,
)

HERE = os.path.dirname(os.path.abspath(__file__))

WORKLOADS = ("throughput", "throughput_results", "latency", "enqueue", "chord", "chain")
DEFAULT_N = {
    "throughput": 20000,
    # 5,000 tasks with results, as taskfleet's workload of 5,000 one-step runs at once.
    "throughput_results": 5000,
    "latency": 300,
    "enqueue": None,  # --rate x --seconds
    "chord": 10000,
    "chain": 40,
}



def wl_throughput(ctx, deadline):
    bt, r, args = ctx["bt"], ctx["r"], ctx["args"]
    n = args.n
    # Preload while no worker runs.
    c0, t0 = client_cpu(), time.monotonic()
    for _ in range(n):
        bt.noop.apply_async(ignore_result=True)
        if _ % 1000 == 0:
            deadline.left("preloading")
    t1, c1 = time.monotonic(), client_cpu()
    # Without publisher confirms the last messages may still be on their way:
    # start the worker only once RabbitMQ holds them all.
    while (depth := bt.queue_depth()) != n:
        deadline.left(f"waiting for the queue to hold {n} messages (it holds {depth})")
        time.sleep(0.05)
    out = {
        "enqueue_s": round(t1 - t0, 4),
        "enqueue_per_s": round(n / (t1 - t0), 1),
        "enqueue_client_cpu_per_task_us": round(1e6 * (c1 - c0) / n, 1),
    }
    m0 = machine_ticks()
    cs = client_cpu()
    w = ctx["start_worker"](track=True)
    ready = w.wait_ready(r, deadline)
    wait_done(r, bt, w, n, deadline)
    cs = client_cpu() - cs
    wcpu, _ = w.cpu()
    first, last, count, children = read_tracked(r, bt)
    if count != n:
        raise BenchError(f"worker ran {count} tasks, expected {n}")
    out.update({
        "elapsed_s": round(last - first, 4),
        "tasks_per_s": round(n / (last - first), 1),
        "first_task_after_ready_ms": round((first - ready["t"]) * 1e3, 2),
        "children_that_ran_tasks": children,
        "worker_ready_s": round(w.ready_s, 3),
    })
    # Worker CPU from its worker_ready signal (start-up excluded) to now.
    cpu_fields(out, wcpu - ready["cpu"], cs, n)
    out.update(machine_delta(m0, machine_ticks()))
    return out


def _warm_worker(ctx, deadline, track=False):
    w = ctx["start_worker"](track=track)
    w.wait_ready(ctx["r"], deadline)
    ctx["warmed_children"], ctx["warm_tasks"] = warm_up(ctx["bt"], ctx["args"].concurrency, deadline)
    return w


class Window:
    """CPU (worker tree, client) and machine counters over a measured window."""

    def __init__(self, worker):
        self.worker = worker
        self.m0 = machine_ticks()
        self.w0, _ = worker.cpu() if worker else (0.0, 0)
        self.c0 = client_cpu()

    def close(self, out, tasks):
        c1 = client_cpu()
        w1, _ = self.worker.cpu() if self.worker else (0.0, 0)
        cpu_fields(out, w1 - self.w0, c1 - self.c0, tasks)
        out.update(machine_delta(self.m0, machine_ticks()))


def wl_throughput_results(ctx, deadline):
    from celery.result import ResultSet

    bt, args = ctx["bt"], ctx["args"]
    n = args.n
    w = _warm_worker(ctx, deadline)
    win = Window(w)
    t0 = time.monotonic()
    results = []
    for i in range(n):
        results.append(bt.noop.apply_async())
        if i % 1000 == 0:
            deadline.left("submitting")
    t1 = time.monotonic()
    # ResultSet.get -> join_native: the Redis backend's efficient join (one
    # pub/sub subscription per task, made at submit time, no polling).
    values = ResultSet(results, app=bt.app).get(timeout=deadline.left("collecting results"))
    t2 = time.monotonic()
    if len(values) != n or any(v is not None for v in values):
        raise BenchError(f"got {len(values)} results, expected {n} Nones")
    out = {
        "elapsed_s": round(t2 - t0, 4),
        "tasks_per_s": round(n / (t2 - t0), 1),
        "submit_s": round(t1 - t0, 4),
        "submit_per_s": round(n / (t1 - t0), 1),
    }
    win.close(out, n)
    return out


def wl_latency(ctx, deadline):
    bt, args = ctx["bt"], ctx["args"]
    n = args.n
    w = _warm_worker(ctx, deadline)
    win = Window(w)
    samples = []
    for i in range(n):
        t = time.perf_counter()
        v = bt.echo.delay(i).get(timeout=min(30, deadline.left("latency loop")))
        samples.append(time.perf_counter() - t)
        if v != i:
            raise BenchError(f"echo({i}) returned {v!r}")
    out = ms_stats("", samples)
    win.close(out, n)
    return out


def wl_enqueue(ctx, deadline):
    """Open loop: call k is due at t0 + k/rate whatever the previous calls took
    (producer j makes calls j, j+P, ...); a late call starts at once, never skipped."""
    bt, r, args = ctx["bt"], ctx["r"], ctx["args"]
    total = max(1, int(round(args.rate * args.seconds)))
    w = None
    if not args.no_worker:
        # A worker drains the queue meanwhile, as in steady state; it tracks
        # completions so that we know when it has run them all.
        w = _warm_worker(ctx, deadline, track=True)
    win = Window(w)
    P = max(1, args.producers)
    durations = [[] for _ in range(P)]
    sched = [[] for _ in range(P)]
    ends = [0.0] * P
    errors = []
    # time.monotonic (CLOCK_MONOTONIC, ns resolution) compares with the workers' stamps.
    t0 = time.monotonic() + 0.01
    end_by = deadline.end

    def producer(j):
        try:
            d, s = durations[j], sched[j]
            for k in range(j, total, P):
                due = t0 + k / args.rate
                now = time.monotonic()
                if due > now:
                    time.sleep(due - now)
                st = time.monotonic()
                bt.noop.apply_async(ignore_result=True)
                en = time.monotonic()
                d.append(en - st)
                s.append(en - due)  # from when it was due: includes falling behind
                if en > end_by:
                    raise RoundTimeout("enqueue: round timeout exceeded")
            ends[j] = time.monotonic()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=producer, args=(j,), daemon=True) for j in range(P)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline.end - time.monotonic()) + 5)
        if t.is_alive():
            raise RoundTimeout("enqueue: a producer thread is stuck")
    if errors:
        raise errors[0]
    t_end = max(ends)
    cpu_enqueue = client_cpu() - win.c0
    all_d = [x for d in durations for x in d]
    all_s = [x for s in sched for x in s]
    out = {
        "offered_per_s": args.rate,
        "achieved_per_s": round(total / (t_end - t0), 1),
        "enqueue_s": round(t_end - t0, 4),
        "producers": P,
        **ms_stats("call_", all_d),
        **{k: v for k, v in ms_stats("from_due_", all_s).items() if "p50" in k or "p99" in k},
        "enqueue_client_cpu_per_task_us": round(1e6 * cpu_enqueue / total, 1),
    }
    if w is not None:
        # The tracked counts include the warm-up's tasks.
        expect = total + ctx["warm_tasks"]
        wait_done(r, bt, w, expect, deadline)
        _, last, count, _ = read_tracked(r, bt)
        if count != expect:
            raise BenchError(f"worker ran {count} tasks, expected {total} + {ctx['warm_tasks']} warm-up")
        # From the last call's return to the worker finishing the last task.
        out["drain_after_enqueue_s"] = round(max(0.0, last - t_end), 4)
    win.close(out, total)
    return out


def wl_chord(ctx, deadline):
    from celery import chord

    bt, args = ctx["bt"], ctx["args"]
    n = args.n
    w = _warm_worker(ctx, deadline)
    win = Window(w)
    t0 = time.monotonic()
    # The plain API: chord(header)(body). Server side, the Redis chord join is
    # cheap: every header task's completion runs one Lua script
    # (on_chord_part_return: ZADD its result, ZCOUNT the set), and the one that
    # completes the set ZRANGEs the N results and publishes the body with them
    # as its argument (every header message also carries a copy of the body's
    # signature). The client is what is slow:
    # * submitting: each header AsyncResult is subscribed on the client's Redis
    #   pub/sub connection (apply_async -> backend.on_task_call), so the worker
    #   PUBLISHes every header result to the client too, which decodes N
    #   messages and resolves N promises though it only wants the body's result;
    # * waiting: AsyncResult.get()'s default follow_parents=True runs
    #   _maybe_reraise_parent_error -> GroupResult.maybe_throw over all N header
    #   results on every wake-up of its wait loop, i.e. on every pub/sub message
    #   (about 2 per header task), and each header result not yet seen costs a
    #   Redis GET there: O(N^2). Measured here: N=1,000 9.3 s, N=4,000 105 s
    #   (both under cProfile), N=10,000 257 s, against 39-46 s for N=10,000
    #   with follow_parents=False. So by
    #   default we wait with get(follow_parents=False), still the plain API,
    #   which only skips re-raising a header task's error early (the body's
    #   result would carry it anyway); --chord-get plain measures the default
    #   get() (expect minutes at N=10,000).
    res = chord([bt.echo.s(i) for i in range(n)])(bt.collect.s())
    t1 = time.monotonic()
    v = res.get(timeout=deadline.left("waiting for the chord's body"),
                follow_parents=(args.chord_get == "plain"))
    t2 = time.monotonic()
    if v != n:
        raise BenchError(f"chord body returned {v!r}, expected {n}")
    out = {"elapsed_s": round(t2 - t0, 4), "submit_s": round(t1 - t0, 4),
           "tasks_per_s": round((n + 1) / (t2 - t0), 1)}
    win.close(out, n + 1)
    return out


def wl_chain(ctx, deadline):
    from celery import chain

    bt, args = ctx["bt"], ctx["args"]
    n = args.n
    w = _warm_worker(ctx, deadline)
    win = Window(w)
    t0 = time.monotonic()
    res = chain(bt.small_step.s(0), *[bt.small_step.s() for _ in range(n - 1)]).apply_async()
    v = res.get(timeout=deadline.left("waiting for the chain's result"))
    t1 = time.monotonic()
    if v != n:
        raise BenchError(f"chain returned {v!r}, expected {n}")
    out = {"elapsed_s": round(t1 - t0, 4), "per_step_ms": round(1e3 * (t1 - t0) / n, 3)}
    win.close(out, n)
    return out


RUNNERS = {
    "throughput": wl_throughput,
    "throughput_results": wl_throughput_results,
    "latency": wl_latency,
    "enqueue": wl_enqueue,
    "chord": wl_chord,
    "chain": wl_chain,
}
PRIMARY = {
    "throughput": ("tasks_per_s", "tasks/s"),
    "throughput_results": ("tasks_per_s", "tasks/s"),
    "latency": ("p50_ms", "ms"),
    "enqueue": ("call_p50_ms", "ms"),
    "chord": ("elapsed_s", "s"),
    "chain": ("elapsed_s", "s"),
}


# --- driver ------------------------------------------------------------------

def check_services(bt):
    import redis
    from kombu import Connection

    try:
        redis.Redis.from_url(bt.REDIS_URL, socket_connect_timeout=3, socket_timeout=5).ping()
    except Exception as exc:
        raise Unavailable(f"Redis unreachable at {bt.REDIS_URL}: {exc}") from None
    conn = Connection(bt.BROKER_URL, connect_timeout=3)
    try:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=5)
    except Exception as exc:
        raise Unavailable(f"RabbitMQ unreachable at {bt.BROKER_URL}: {exc}") from None
    finally:
        conn.release()


def median_of(rounds):
    keys = [k for k, v in rounds[0].items()
            if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool)
            and all(isinstance(r.get(k), (int, float)) for r in rounds)]
    return {k: round(statistics.median(r[k] for r in rounds), 4) for k in keys}


def parse_args(argv):
    p = argparse.ArgumentParser(description="Celery side of the taskfleet benchmark")
    p.add_argument("workload", choices=WORKLOADS)
    p.add_argument("--n", type=int, help="tasks (chain: steps); default per workload")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", "-c", type=int, default=os.cpu_count() or 1,
                   help="prefork processes (default: number of cores)")
    p.add_argument("--rate", type=float, default=2000.0, help="enqueue: offered calls/s")
    p.add_argument("--seconds", type=float, default=5.0, help="enqueue: duration")
    p.add_argument("--producers", type=int, default=1, help="enqueue: producer threads")
    p.add_argument("--no-worker", action="store_true",
                   help="enqueue: no worker drains the queue meanwhile")
    p.add_argument("--chord-get", choices=("fast", "plain"), default="fast",
                   help="chord: wait with get(follow_parents=False) (fast, default) "
                        "or the default get() (plain; quadratic in N, see run.py)")
    p.add_argument("--round-timeout", type=float, default=300.0, help="seconds per round")
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds to sleep before each round (lets the machine quiet down)")
    p.add_argument("--confirm-publish", action="store_true",
                   help="publisher confirms (not Celery's default)")
    a = p.parse_args(argv)
    if a.n is None:
        a.n = DEFAULT_N[a.workload]
    if a.workload == "enqueue":
        a.n = None
    elif a.n < 1:
        p.error("--n must be >= 1")
    if a.rounds < 1 or a.concurrency < 1:
        p.error("--rounds and --concurrency must be >= 1")
    return a


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("CELERY_BENCH_NS", f"celerybench-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    if args.confirm_publish:
        os.environ["CELERY_BENCH_CONFIRM"] = "1"
    sys.path.insert(0, HERE)

    report = {"ok": False, "workload": args.workload}

    def emit(code):
        print(json.dumps(report), flush=True)
        return code

    try:
        import celery
        import celery.exceptions
        import kombu
        import kombu.exceptions
        import redis
        import redis.exceptions
        import bench_tasks as bt
    except ImportError as exc:
        report["error"] = (f"cannot import Celery ({exc}); run bench/celery/setup.sh "
                           "and use the python it prints")
        log(report["error"])
        return emit(EXIT_UNAVAILABLE)

    report.update({
        "celery_version": celery.__version__,
        "kombu_version": kombu.__version__,
        "redis_py_version": redis.__version__,
        "python_version": platform.python_version(),
        "ns": bt.NS,
        "params": {k: v for k, v in vars(args).items() if k != "workload"},
        "rounds": [],
    })
    report["params"]["pool"] = "prefork"

    # A watchdog for what no timeout inside can catch (a call blocked for good).
    hard_limit = args.round_timeout + 60

    def hard_abort():
        log(f"watchdog: round blocked for more than {hard_limit:.0f} s; aborting")
        _kill_all_workers()
        report["error"] = f"round blocked for more than {hard_limit:.0f} s"
        print(json.dumps(report), flush=True)
        os._exit(EXIT_TIMEOUT)

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    atexit.register(_kill_all_workers)

    code = 0
    services_ok = False
    try:
        check_services(bt)
        services_ok = True
        r = bt.redis_client()
        ctx = {"bt": bt, "r": r, "args": args}
        current = []

        def start_worker(track):
            w = Worker(bt, args.concurrency, track)
            current.append(w)
            return w

        ctx["start_worker"] = start_worker
        for i in range(args.rounds):
            if args.settle:
                time.sleep(args.settle)
            # Purge: nothing left in our queue or our Redis keys from a previous round.
            dropped = bt.purge_queue()
            bt.delete_redis_keys(r)
            if dropped:
                log(f"purged {dropped} leftover messages")
            deadline = Deadline(args.round_timeout)
            dog = threading.Timer(hard_limit, hard_abort)
            dog.daemon = True
            dog.start()
            try:
                log(f"round {i + 1}/{args.rounds}: {args.workload}")
                res = RUNNERS[args.workload](ctx, deadline)
                if ctx.get("warmed_children") is not None:
                    res["warmed_children"] = ctx.pop("warmed_children")
                    ctx.pop("warm_tasks", None)
                res["round"] = i + 1
                report["rounds"].append(res)
                log(f"round {i + 1}: {json.dumps(res)}")
            finally:
                for w in current:
                    w.stop()
                current.clear()
                dog.cancel()
        report["median"] = median_of(report["rounds"])
        name, unit = PRIMARY[args.workload]
        report["primary"] = {"name": name, "unit": unit, "value": report["median"].get(name)}
        report["ok"] = True
    except BenchError as exc:
        report["error"] = str(exc)
        code = exc.code
    except celery.exceptions.TimeoutError as exc:  # a .get(timeout=...) ran out
        report["error"] = f"timed out waiting for a result: {exc}"
        code = EXIT_TIMEOUT
    except KeyboardInterrupt as exc:
        report["error"] = f"interrupted ({exc})"
        code = EXIT_FAIL
    except Exception as exc:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        report["error"] = f"{type(exc).__name__}: {exc}"
        code = EXIT_FAIL
        # A broker or Redis that went away mid-run (other tests on this machine
        # restart them) is "unavailable" too.
        if isinstance(exc, (kombu.exceptions.OperationalError, redis.exceptions.ConnectionError,
                            redis.exceptions.TimeoutError, ConnectionError)):
            code = EXIT_UNAVAILABLE
            report["error"] = "RabbitMQ or Redis went away during the run: " + report["error"]
    finally:
        _kill_all_workers()
        if services_ok:
            try:
                n = bt.cleanup()
                log(f"cleanup: deleted queue {bt.QUEUE}, its exchanges and {n} Redis keys")
            except Exception as exc:  # noqa: BLE001
                log(f"cleanup failed: {exc!r}")
    if code:
        log("error:", report.get("error"))
    return emit(code)


if __name__ == "__main__":
    sys.exit(main())
