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
