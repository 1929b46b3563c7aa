"""The taskfleet package: types for Python step authors, and a client of the HTTP API.

A step is a plain function ``def step(input)`` or ``def step(input, ctx)``;
:class:`Context` is the type of ``ctx``. :class:`Client` talks to a scheduler's HTTP API
(submit runs, wait for them, cancel them, register workflows); it and its answer and error
types (``Run``, ``ApiError``, ...) are taken from :mod:`taskfleet.client` (which re-exports
those of :mod:`taskfleet.models` and :mod:`taskfleet.errors`) on first use, so importing
``taskfleet`` in a step loads only the context module.

Workers carry a copy of this file and of ``context.py`` for when the package is not
installed; the client and the modules it imports are not part of that copy.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any, List

from taskfleet.context import Context, StepCancelled

if TYPE_CHECKING:
    from taskfleet.client import (
        ApiError,
        Client,
        Conflict,
        DeadLetter,
        DeadLetters,
        Forbidden,
        InvalidRequest,
        Items,
        JobPage,
        JobSummary,
        NotFound,
        Queue,
        Run,
        RunCancelled,
        RunFailed,
        RunPage,
        RunRequest,
        RunSummary,
        Schedule,
        SchedulerUnreachable,
        Step,
        StepError,
        Submitted,
        TaskfleetError,
        Unauthorized,
        Unavailable,
        UnexpectedResponse,
        WaitTimeout,
        Worker,
        Workflow,
        WorkflowSummary,
        WorkflowVersion,
    )

__all__ = [
    "ApiError",
    "Client",
    "Conflict",
    "Context",
    "DeadLetter",
    "DeadLetters",
    "Forbidden",
    "InvalidRequest",
    "Items",
    "JobPage",
    "JobSummary",
    "NotFound",
    "Queue",
    "Run",
    "RunCancelled",
    "RunFailed",
    "RunPage",
    "RunRequest",
    "RunSummary",
    "Schedule",
    "SchedulerUnreachable",
    "Step",
    "StepCancelled",
    "StepError",
    "Submitted",
    "TaskfleetError",
    "Unauthorized",
    "Unavailable",
    "UnexpectedResponse",
    "WaitTimeout",
    "Worker",
    "Workflow",
    "WorkflowSummary",
    "WorkflowVersion",
    "__version__",
]

__version__ = "0.1.0"

# The names taken from taskfleet.client on first use (PEP 562).
_CLIENT_NAMES = frozenset(__all__) - {"Context", "StepCancelled", "__version__"}


def _client_available() -> bool:
    """Returns whether taskfleet.client can be imported, without importing it."""
    try:
        return importlib.util.find_spec("taskfleet.client") is not None
    except (ImportError, ValueError):
        return False


if not _client_available():
    # The copy the worker bundles has no client module (nor a package path to find one on).
    __all__ = ["Context", "StepCancelled", "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _CLIENT_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        client = importlib.import_module("taskfleet.client")
    except ModuleNotFoundError as error:
        if error.name != "taskfleet.client":
            raise
        # The worker's bundled copy of this package has no client module.
        raise ImportError(
            f"taskfleet.{name} needs the taskfleet package installed (pip install ./python): "
            "this copy of taskfleet, bundled into the worker, provides only Context",
            name="taskfleet.client",
        ) from None
    value = getattr(client, name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
