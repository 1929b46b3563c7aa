"""Step functions used by the integration tests."""

import time


def double(value):
    return value * 2


def add_tax(orders, ctx):
    return {
        "orders": [dict(order, price=order["qty"] * 1.5) for order in orders],
        "attempt": ctx.attempt,
        "step": ctx.step_id,
        "run_id": ctx.run_id,
    }


def merge(inputs):
    return sorted(inputs.keys())


def fail(_value):
    raise ValueError("the input was not acceptable")


def slow(value):
    time.sleep(value.get("sleep", 1.0))
    return value


def echo(value):
    return value


def deep(n):
    value = 0
    for _ in range(n):
        value = [value]
    return value


def ctx_first(ctx, value):
    return {"step": ctx.step_id, "value": value}


def grab_sigterm(_value):
    import signal

    signal.signal(signal.SIGTERM, lambda *_: None)
    return "took SIGTERM"


def flaky(value, ctx):
    """Fails until attempt ``value["succeed_on"]``."""
    if ctx.attempt < value["succeed_on"]:
        raise RuntimeError(f"attempt {ctx.attempt} fails")
    return {"attempt": ctx.attempt}


def spin(_value):
    while True:
        pass


def crash(_value):
    """Takes its worker down (the parent of the executor process running it)."""
    import os
    import signal

    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(60)


def crash_executor(_value):
    """Ends the executor process running it, as a segfaulting C extension would."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def mark(value, ctx):
    """Records that this task ran, in ``value["dir"]``: a file named after the task, and one
    more file for each further run of it. Returns the input with ``n`` one higher."""
    import os
    import uuid

    path = os.path.join(value["dir"], ctx.task_id)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        os.close(os.open(f"{path}.again.{uuid.uuid4().hex}", os.O_CREAT | os.O_WRONLY))
    time.sleep(value.get("sleep", 0))
    return dict(value, n=value["n"] + 1)
