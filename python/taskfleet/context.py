"""The context a taskfleet worker hands to a step that takes a ``ctx`` parameter.

This module uses only the standard library and no relative imports: the worker may
execute its source on its own when the ``taskfleet`` package is not installed.
"""

from __future__ import annotations

import logging
from typing import Optional

__all__ = ["Context", "StepCancelled"]


class StepCancelled(BaseException):
    """Raised inside a step that must stop: its attempt ran past its ``timeout_s``, or its run
    was cancelled or failed elsewhere.

    It derives from :class:`BaseException`, like :class:`KeyboardInterrupt`, so that
    ``except Exception`` blocks in step code do not swallow it. ``finally`` blocks and context
    managers still run; a step that catches it should clean up and re-raise quickly, because
    the worker kills the executor process of a step that does not stop within its grace period
    (``TASKFLEET_PYTHON_KILL_GRACE_S``).
    """


class Context:
    """Identity of one step attempt, plus a logger for the step to write to.

    A step function receives a ``Context`` when it declares a parameter named
    ``ctx``::

        def price(order, ctx):
            ctx.logger.info("pricing order %s (attempt %d)", order["id"], ctx.attempt)
            return {"id": order["id"], "price": order["qty"] * 9.5}

    Attributes:
        run_id: Identifier of the workflow run (or of the standalone task) the
            step belongs to.
        task_id: Identifier of the task executing this attempt.
        step_id: The step's ``id`` in the workflow definition.
        attempt: Which attempt this is, counting from 1 for the first try.
            Retries get 2, 3, ...; delivery is at least once, so a step should
            be idempotent whatever the attempt number.
        trace_id: The W3C trace id of the run (32 lowercase hex digits): the
            ``traceparent`` its submission carried, or one the scheduler made.
            ``None`` for a run made before runs had trace ids.
        logger: A :class:`logging.Logger` named ``taskfleet.step.<step_id>``.
            Records written to it are kept with the attempt.
    """

    run_id: str
    task_id: str
    step_id: str
    attempt: int
    trace_id: Optional[str]
    logger: logging.Logger

    def __init__(
        self,
        run_id: str,
        task_id: str,
        step_id: str,
        attempt: int,
        logger: Optional[logging.Logger] = None,
        trace_id: Optional[str] = None,
    ) -> None:
        """Creates a context; the logger defaults to ``taskfleet.step.<step_id>``."""
        self.run_id = run_id
        self.task_id = task_id
        self.step_id = step_id
        self.attempt = attempt
        self.trace_id = trace_id
        self.logger = (
            logger if logger is not None else logging.getLogger(f"taskfleet.step.{step_id}")
        )

    def __repr__(self) -> str:
        return (
            f"Context(run_id={self.run_id!r}, task_id={self.task_id!r}, "
            f"step_id={self.step_id!r}, attempt={self.attempt!r}, "
            f"trace_id={self.trace_id!r})"
        )
