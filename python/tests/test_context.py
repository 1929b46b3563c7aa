"""Tests for taskfleet.Context, the type of a step's ``ctx`` parameter."""

import logging
import pathlib
import types

import taskfleet
from taskfleet import Context


def make_context(**overrides):
    fields = {"run_id": "run-1", "task_id": "task-1", "step_id": "price", "attempt": 1}
    fields.update(overrides)
    return Context(**fields)


def test_context_keeps_identity_fields():
    ctx = Context("run-7", "task-9", "load", 2)
    assert (ctx.run_id, ctx.task_id, ctx.step_id, ctx.attempt) == ("run-7", "task-9", "load", 2)


def test_first_attempt_is_one():
    assert make_context().attempt == 1


def test_logger_defaults_to_step_logger():
    ctx = make_context(step_id="clean")
    assert isinstance(ctx.logger, logging.Logger)
    assert ctx.logger.name == "taskfleet.step.clean"


def test_explicit_logger_is_kept():
    logger = logging.getLogger("custom")
    assert make_context(logger=logger).logger is logger


def test_logger_records_reach_handlers(caplog):
    ctx = make_context(step_id="total")
    with caplog.at_level(logging.INFO, logger="taskfleet.step.total"):
        ctx.logger.info("summed %d items", 3)
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("taskfleet.step.total", "summed 3 items")
    ]


def test_repr_names_the_fields():
    text = repr(Context("r", "t", "s", 3))
    assert text == "Context(run_id='r', task_id='t', step_id='s', attempt=3, trace_id=None)"


def test_trace_id_defaults_to_none_and_is_kept():
    assert make_context().trace_id is None
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert make_context(trace_id=trace_id).trace_id == trace_id


def test_package_exports_context_and_version():
    assert taskfleet.Context is Context
    assert taskfleet.__version__ == "0.1.0"
    assert "Context" in taskfleet.__all__


def test_context_module_loads_standalone():
    # The worker executes context.py on its own when the package is not installed,
    # so the file must not depend on the package around it.
    source = pathlib.Path(taskfleet.context.__file__).read_text(encoding="utf-8")
    module = types.ModuleType("standalone_context")
    exec(compile(source, "context.py", "exec"), module.__dict__)
    ctx = module.Context("r", "t", "s", 1)
    assert ctx.logger.name == "taskfleet.step.s"


def test_package_is_typed():
    package_dir = pathlib.Path(taskfleet.__file__).parent
    assert (package_dir / "py.typed").is_file()


def test_step_cancelled_is_not_an_exception():
    from taskfleet import StepCancelled

    assert issubclass(StepCancelled, BaseException)
    assert not issubclass(StepCancelled, Exception)
