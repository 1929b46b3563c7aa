"""Celery app of the Celery side of the taskfleet benchmark.

Broker RabbitMQ, result backend Redis, JSON, Celery's defaults otherwise, except
for what keeps a run isolated from the other users of the same broker and Redis:

* everything is namespaced by the environment variable CELERY_BENCH_NS
  (run.py sets it to a fresh value per run, and the worker subprocess inherits it):
  - the task queue (and its direct exchange) is ``<ns>.celery``;
  - the remote-control exchange is ``<ns>.pidbox`` (and ``reply.<ns>.pidbox``), so a
    broadcast by some other Celery user of the vhost never reaches our worker and
    ours never reaches theirs; the event exchange is ``<ns>.ev`` (unused: events are
    off, as by default);
  - every Redis key and pub/sub channel of the result backend starts with ``<ns>:``
    (``global_keyprefix``), and so do the harness's own bookkeeping keys
    (``<ns>:bench:*``);
* ``cleanup()`` deletes the queue, the exchanges and every ``<ns>:*`` Redis key.

Addresses can be overridden with CELERY_BENCH_BROKER and CELERY_BENCH_REDIS.

Throughput tracking (only when CELERY_BENCH_TRACK=1 in the worker's environment):
each pool child keeps, in memory, the monotonic time of its first ``task_prerun``,
of its latest ``task_postrun`` and its count of finished tasks; a daemon thread in
the child writes them to Redis (one MULTI: HSET of its hash + INCRBY of a shared
counter) at most every 20 ms, and only when something changed. So the tasks being
measured pay no Redis round trip at all (two in-memory updates from Celery's own
signals, well under a microsecond each), the flusher costs about one small Redis
transaction per 20 ms per child, and the timestamps are exact, not rounded to the
flush period: the flush only delays when run.py *sees* them, not what they say.
CLOCK_MONOTONIC is system-wide on Linux, so the children's clocks compare with
each other and with run.py's.
"""

import os
import sys
import threading
import time

from celery import Celery, signals

NS = os.environ.get("CELERY_BENCH_NS") or "celerybench-default"
BROKER_URL = os.environ.get("CELERY_BENCH_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = os.environ.get("CELERY_BENCH_REDIS", "redis://127.0.0.1:6379/0")
QUEUE = f"{NS}.celery"
KEY_PREFIX = f"{NS}:"
BENCH_PREFIX = f"{NS}:bench:"
READY_KEY = BENCH_PREFIX + "ready"  # hash written by the worker's main process when ready
DONE_KEY = BENCH_PREFIX + "done"  # counter: tasks finished, as flushed by the children
PROCS_KEY = BENCH_PREFIX + "procs"  # set of the children's hash keys

app = Celery("bench_tasks", broker=BROKER_URL, backend=REDIS_URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # Isolation (see the module docstring). task_default_exchange and
    # task_default_routing_key default to the queue's name.
    task_default_queue=QUEUE,
    control_exchange=NS,
    event_exchange=f"{NS}.ev",
    result_backend_transport_options={"global_keyprefix": KEY_PREFIX},
    # Celery 5's default behaviour, said explicitly only to silence the
    # deprecation warning every worker start prints otherwise.
    broker_connection_retry_on_startup=True,
)
if os.environ.get("CELERY_BENCH_CONFIRM") == "1":
    # Not Celery's default; only with run.py --confirm-publish, to compare with a
    # producer that waits for RabbitMQ's publisher confirms as taskfleet does.
    app.conf.broker_transport_options = {"confirm_publish": True}


@app.task
def noop():
    return None


@app.task
def echo(x):
    return x


@app.task
def add(x, y):
    return x + y


@app.task
def collect(results):
    """Chord body: the number of header results it was given."""
    return len(results)


@app.task
def small_step(x):
    """Chain step."""
    return x + 1


@app.task
def probe(seconds=0.0):
    """Warm-up: sleeps a little so that concurrent probes land on different children."""
    if seconds:
        time.sleep(seconds)
    return os.getpid()


# --- CPU accounting (shared with run.py) -------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read().decode()
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(")") + 2:].split()
    return rest  # rest[0] is field 3 (state)


def _children_map():
    kids = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(entry)[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def proc_tree_cpu(pid):
    """User+system CPU seconds of pid and all its live descendants, plus what
    their already-reaped children used (cutime+cstime), from /proc/<pid>/stat.
    Returns (seconds, number_of_processes). Resolution: one clock tick (10 ms)
    per process."""
    kids = _children_map()
    todo, seen, ticks = [pid], 0, 0
    while todo:
        p = todo.pop()
        try:
            f = _stat_fields(p)
        except OSError:
            continue
        # fields 14..17: utime stime cutime cstime -> rest[11..14]
        ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
        seen += 1
        todo.extend(kids.get(p, ()))
    return ticks / CLK_TCK, seen


def redis_client():
    import redis

    return redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5, socket_timeout=30)


# --- worker-side hooks -------------------------------------------------------

@signals.worker_ready.connect
def _on_worker_ready(sender=None, **kwargs):
    # Runs in the worker's main process right after basic.consume and before its
    # event loop handles the first message: the CPU used from here on is the
    # measured window's (start-up -- imports, forking the pool -- is excluded).
    cpu, nprocs = proc_tree_cpu(os.getpid())
    try:
        redis_client().hset(
            READY_KEY,
            mapping={"t": time.monotonic(), "cpu": cpu, "pid": os.getpid(), "procs": nprocs},
        )
    except Exception as exc:  # never let the harness break the worker
        print(f"bench_tasks: could not record readiness: {exc!r}", file=sys.stderr)


_TRACK = os.environ.get("CELERY_BENCH_TRACK") == "1"
_state = {"first": None, "last": None, "count": 0}


def _on_prerun(**kwargs):
    if _state["first"] is None:
        _state["first"] = time.monotonic()


def _on_postrun(**kwargs):
    _state["last"] = time.monotonic()  # before count: the flusher reads count first
    _state["count"] += 1


def _flusher():
    r = redis_client()
    key = f"{BENCH_PREFIX}proc:{os.getpid()}"
    flushed = 0
    while True:
        time.sleep(0.02)
        count = _state["count"]
        if count == flushed:
            continue
        last, first = _state["last"], _state["first"]
        try:
            pipe = r.pipeline(transaction=True)
            pipe.hset(key, mapping={"first": first, "last": last, "count": count})
            pipe.sadd(PROCS_KEY, key)
            pipe.incrby(DONE_KEY, count - flushed)
            pipe.execute()
            flushed = count
        except Exception as exc:
            print(f"bench_tasks: flush failed: {exc!r}", file=sys.stderr)
            time.sleep(0.5)


if _TRACK:
    signals.task_prerun.connect(_on_prerun, weak=False)
    signals.task_postrun.connect(_on_postrun, weak=False)

    @signals.worker_process_init.connect
    def _start_flusher(**kwargs):
        # In each prefork child, after the fork: its own thread, its own connection.
        _state.update(first=None, last=None, count=0)
        threading.Thread(target=_flusher, name="bench-flusher", daemon=True).start()


# --- cleanup -----------------------------------------------------------------

def delete_redis_keys(r=None):
    r = r or redis_client()
    n = 0
    batch = []
    for key in r.scan_iter(match=KEY_PREFIX + "*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            n += r.unlink(*batch)
            batch = []
    if batch:
        n += r.unlink(*batch)
    return n


def purge_queue():
    """Empty our task queue (if it exists). Returns the number of messages dropped."""
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
        ch = conn.default_channel
        try:
            return ch.queue_purge(QUEUE) or 0
        except conn.channel_errors:
            return 0  # NOT_FOUND: nothing to purge (the channel is closed by the broker)


def queue_depth():
    """Messages ready in our queue (passive declare), or None if it does not exist."""
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
        ch = conn.channel()
        try:
            _, count, _ = ch.queue_declare(QUEUE, passive=True)
            return count
        except conn.channel_errors:
            return None
        finally:
            try:
                ch.close()
            except Exception:
                pass


def delete_broker_entities():
    """Delete our queue and exchanges. Each in its own channel, since a missing
    entity closes the channel."""
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
        for kind, name in (
            ("queue", QUEUE),
            ("exchange", QUEUE),
            ("exchange", f"{NS}.pidbox"),
            ("exchange", f"reply.{NS}.pidbox"),
            ("exchange", f"{NS}.ev"),
        ):
            ch = conn.channel()
            try:
                if kind == "queue":
                    ch.queue_delete(name)
                else:
                    ch.exchange_delete(name)
            except conn.channel_errors:
                pass
            finally:
                try:
                    ch.close()
                except Exception:
                    pass


def cleanup(attempts=4, pause=5.0):
    """Delete our broker entities and Redis keys, retrying a few times (other
    tests on this machine stop and restart RabbitMQ and Redis). Returns the number
    of Redis keys deleted; raises the last error if a part never succeeded."""
    deleted, errors = 0, {}
    for part, fn in (("broker", delete_broker_entities), ("redis", delete_redis_keys)):
        for i in range(attempts):
            try:
                n = fn()
                if part == "redis":
                    deleted = n
                errors.pop(part, None)
                break
            except Exception as exc:  # noqa: BLE001
                errors[part] = exc
                if i + 1 < attempts:
                    time.sleep(pause)
    if errors:
        raise next(iter(errors.values()))
    return deleted
