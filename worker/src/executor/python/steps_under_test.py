# The step module the unit tests of the interpreter call; its line numbers appear in them.
import asyncio
import datetime


def transform(data):
    return {"doubled": [n * 2 for n in data["numbers"]], "name": data["name"].upper()}


def echo(value):
    return value


def describe_ctx(data, ctx):
    ctx.logger.info("describing %s", data)
    return {
        "type": type(ctx).__module__ + "." + type(ctx).__name__,
        "run_id": ctx.run_id,
        "task_id": ctx.task_id,
        "step_id": ctx.step_id,
        "attempt": ctx.attempt,
        "trace_id": ctx.trace_id,
        "logger": ctx.logger.name,
    }


def keyword_only_ctx(data, *, ctx):
    return ctx.attempt


def positional_only_ctx(data, ctx, /):
    return ctx.step_id


def no_ctx(data, context=None):
    return context


def fail(data):
    raise ValueError("bad value: " + str(data))


class PricingError(Exception):
    pass


def fail_custom(data):
    raise PricingError("no price")


def fail_key(data):
    return data["missing"]


def returns_datetime(data):
    return {"when": datetime.datetime(2024, 1, 1)}


def returns_set(data):
    return {"items": [1, {2, 3}]}


def returns_big_int(data):
    return {"n": 2 ** 64}


def returns_nan(data):
    return [float("nan")]


def returns_int_keys(data):
    return {"counts": {1: "one"}}


def returns_tuple(data):
    return (1, [2, (3, "x")])


def returns_cycle(data):
    items = []
    items.append(items)
    return items


def returns_generator(data):
    yield data


async def async_step(data):
    await asyncio.sleep(0.01)
    return data + 1


async def async_fail(data):
    await asyncio.sleep(0)
    raise KeyError("gone")


def spin(data):
    while True:
        pass


class Pricer:
    @staticmethod
    def price(order):
        return order["qty"] * 2


not_callable = 42
