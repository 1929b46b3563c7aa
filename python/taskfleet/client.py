"""A client of the taskfleet scheduler's HTTP API, using the standard library only.

::

    from taskfleet import Client

    client = Client()  # TASKFLEET_API_URL, else http://127.0.0.1:8080
    submitted = client.submit("orders", [{"sku": "a", "qty": 1, "unit_price": 2}])
    run = client.wait(submitted.id, timeout=60)
    print(run.status, run.output)

Answers are typed dataclasses: a :class:`Run` holds :class:`Step` objects and, when something
failed, :class:`StepError` objects; :class:`Submitted`, :class:`RunPage`, :class:`Workflow` and
the others below describe the other answers. The larger ones keep the JSON they were read from
as ``raw``.

Every failure raised here is a :class:`TaskfleetError`: :class:`ApiError` (and its subclasses
by HTTP status) when the scheduler answers with an error, :class:`SchedulerUnreachable` when it
cannot be reached, :class:`UnexpectedResponse` when it answers with something this client does
not understand, :class:`WaitTimeout` when a wait runs out of time, and :class:`RunFailed`
from :meth:`Client.result` when a run did not succeed. Wrong arguments raise ``ValueError``
or ``TypeError`` before any request is sent.

Workers do not carry this module (they bundle only ``taskfleet.context``); step code that
needs it must have the package installed.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Type,
    TypeVar,
    Union,
)

__all__ = [
    "API_URL_ENV",
    "DEFAULT_API_URL",
    "FINISHED_STATUSES",
    "ApiError",
    "Client",
    "Conflict",
    "InvalidRequest",
    "Items",
    "NotFound",
    "Queue",
    "Run",
    "RunCancelled",
    "RunFailed",
    "RunPage",
    "RunRequest",
    "RunSummary",
    "SchedulerUnreachable",
    "Step",
    "StepError",
    "Submitted",
    "TaskfleetError",
    "Unavailable",
    "UnexpectedResponse",
    "WaitTimeout",
    "Worker",
    "Workflow",
    "WorkflowSummary",
    "WorkflowVersion",
]

#: The environment variable naming the API's base URL.
API_URL_ENV = "TASKFLEET_API_URL"
#: The base URL used when neither an argument nor ``TASKFLEET_API_URL`` gives one.
DEFAULT_API_URL = "http://127.0.0.1:8080"

#: The statuses of a run (or job) that has ended.
FINISHED_STATUSES = frozenset({"succeeded", "failed", "cancelled"})

# The longest single long poll of a wait. The scheduler caps it too (TASKFLEET_MAX_WAIT_S) and
# answers at once when the run finishes, so this only bounds how long one request stays open.
_MAX_POLL_S = 30.0
# The least time between the starts of two polls, so that a scheduler answering before the wait
# it was asked for (a lower cap, a scheduler shutting down) is not hammered.
_MIN_POLL_INTERVAL_S = 0.5
# The most characters of an error body that is not the API's error JSON quoted in a message.
_MAX_QUOTED_BODY = 300
_USER_AGENT = "taskfleet-python/0.1.0"
# The fields of POST /v1/tasks that are not the step's own.
_JOB_FIELDS = ("input", "delay_s", "idempotency_key")


# Errors


class TaskfleetError(Exception):
    """Base of every error the client raises."""


class SchedulerUnreachable(TaskfleetError, ConnectionError):
    """Raised when a request gets no answer: connection refused, timed out, reset.

    Also a :class:`ConnectionError`. ``str()`` names the request and its URL.

    Attributes:
        method: The request's HTTP method.
        url: The request's full URL.
        reason: Why it failed, such as ``"connection refused"``.
    """

    def __init__(self, method: str, url: str, reason: str) -> None:
        super().__init__(f"{method} {url}: cannot reach the scheduler: {reason}")
        self.method = method
        self.url = url
        self.reason = reason


class UnexpectedResponse(TaskfleetError):
    """Raised when the scheduler answers success with a body this client does not understand.

    Attributes:
        method: The request's HTTP method.
        url: The request's full URL.
        reason: What is wrong with the body.
    """

    def __init__(self, method: str, url: str, reason: str) -> None:
        super().__init__(f"{method} {url}: unexpected answer: {reason}")
        self.method = method
        self.url = url
        self.reason = reason


class ApiError(TaskfleetError):
    """Raised when the scheduler answers with an error status.

    The API's errors are ``{"error": {"code", "message", "details"?}}``; an answer that is not
    (from a proxy, say) gives ``code`` ``None`` and the start of its body as ``message``.
    Subclasses name the common statuses: :class:`InvalidRequest` (400, 413, 422),
    :class:`NotFound` (404), :class:`Conflict` (409), :class:`Unavailable` (503).

    Attributes:
        status: The HTTP status, such as 422.
        code: The API's error code, such as ``"invalid_definition"``, or ``None``.
        message: The API's message, saying what is wrong.
        details: The API's details (for an invalid definition, a list of
            ``{"step"?, "message"}`` problems), or ``None``.
        method: The request's HTTP method.
        url: The request's full URL.
    """

    def __init__(
        self,
        status: int,
        code: Optional[str],
        message: str,
        details: Any = None,
        *,
        method: str = "",
        url: str = "",
    ) -> None:
        request = f"{method} {url}: " if method or url else ""
        label = f"{status} {code}" if code else str(status)
        super().__init__(f"{request}{label}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.method = method
        self.url = url


class InvalidRequest(ApiError):
    """Raised on 400 (malformed request, unknown field, bad input), 413 (body over the limit)
    and 422 (a definition that cannot run; the message names the step)."""


class NotFound(ApiError):
    """Raised on 404: no such run, job, workflow (or workflow version)."""


class Conflict(ApiError):
    """Raised on 409: cancelling a run or job that has already finished."""


class Unavailable(ApiError):
    """Raised on 503: the scheduler's database is unreachable or the scheduler is stopping."""


_ERROR_CLASSES: Dict[int, Type[ApiError]] = {
    400: InvalidRequest,
    413: InvalidRequest,
    422: InvalidRequest,
    404: NotFound,
    409: Conflict,
    503: Unavailable,
}


class WaitTimeout(TaskfleetError, TimeoutError):
    """Raised when a run (or job) has not finished when a wait's timeout passes.

    Also a :class:`TimeoutError`. The run goes on; wait again or cancel it.

    Attributes:
        run: The run as last read, still unfinished.
        timeout: The timeout that passed, in seconds.
    """

    def __init__(self, run: Run, timeout: float) -> None:
        super().__init__(
            f"{run.kind} {run.id} did not finish within {timeout:g} s (status: {run.status})"
        )
        self.run = run
        self.timeout = timeout


class RunFailed(TaskfleetError):
    """Raised by :meth:`Client.result` and :meth:`Client.job_result` when the run failed.

    Attributes:
        run: The finished run.
        error: The run's error: the failing step's id, the error type (the Python exception
            class, or ``timeout``, ``dataflow_error``, ...) and message.
    """

    def __init__(self, run: Run) -> None:
        self.run = run
        self.error = run.error
        super().__init__(self._describe())

    def _describe(self) -> str:
        if self.error is None:
            return f"{self.run.kind} {self.run.id} {self.run.status}"
        return f"{self.run.kind} {self.run.id} failed: {self.error}"


class RunCancelled(RunFailed):
    """Raised by :meth:`Client.result` and :meth:`Client.job_result` when the run was cancelled."""

    def _describe(self) -> str:
        return f"{self.run.kind} {self.run.id} was cancelled"


# Answers


@dataclass(frozen=True)
class StepError:
    """Why a step (or a run) failed: ``{"step"?, "type", "message", "traceback"?}``.

    Attributes:
        type: The Python exception class, or one of ``timeout``, ``cancelled``,
            ``worker_lost``, ``dataflow_error``, ``invalid_output``, ``invalid_task``.
        message: What went wrong. A run's error message names the failing step.
        step: The failing step's id, in a run's error; ``None`` in a step's own error and in
            a cancelled run's.
        traceback: The Python traceback, for an exception raised by a step.
        raw: The JSON object it was read from.
    """

    type: str
    message: str
    step: Optional[str] = None
    traceback: Optional[str] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"


@dataclass(frozen=True)
class Items:
    """How far a ``for_each`` step has got: items done out of ``total``."""

    done: int
    total: int


@dataclass(frozen=True)
class Step:
    """One step of a run, as ``GET /v1/runs/{id}`` shows it.

    Attributes:
        id: The step's id in the definition.
        status: ``pending``, ``running``, ``succeeded``, ``failed``, ``cancelled`` or ``skipped``.
        attempts: Attempts started so far.
        output: The step's output once it succeeded (``None`` before, and when skipped).
        error: Why the step failed, if it did.
        logs: What the step printed and logged in its last attempt (Python steps).
        started_at: When the last attempt started.
        finished_at: When the step finished.
        task_id: The id of the step's task, once the step is planned.
        items: Progress of a ``for_each`` step, else ``None``.
        raw: The JSON object it was read from.
    """

    id: str
    status: str
    attempts: int
    output: Any
    error: Optional[StepError]
    logs: Optional[str]
    started_at: Optional[datetime]
    finished_at: Optional[datetime]
    task_id: Optional[str] = None
    items: Optional[Items] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Run:
    """A workflow run or a job, as ``GET /v1/runs/{id}`` (``/v1/tasks/{id}``) shows it.

    Attributes:
        id: The run's id.
        kind: ``"run"`` for a workflow run, ``"job"`` for a job (``POST /v1/tasks``).
        status: ``pending``, ``running``, ``succeeded``, ``failed`` or ``cancelled``.
        workflow: The registered workflow's name; ``None`` for an inline definition or a job.
        version: The registered workflow's version, else ``None``.
        input: The run's input.
        output: The run's output once it succeeded, else ``None``.
        error: Why the run failed (naming the step) or ``cancelled``, else ``None``.
        created_at: When the run was accepted.
        finished_at: When it finished, else ``None``.
        steps: The steps by id, in definition order.
        raw: The JSON object it was read from.
    """

    id: str
    kind: str
    status: str
    workflow: Optional[str]
    version: Optional[int]
    input: Any
    output: Any
    error: Optional[StepError]
    created_at: datetime
    finished_at: Optional[datetime]
    steps: Dict[str, Step]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def finished(self) -> bool:
        """Whether the run has ended: succeeded, failed or cancelled."""
        return self.status in FINISHED_STATUSES

    @property
    def succeeded(self) -> bool:
        """Whether the run has succeeded; its output is then :attr:`output`."""
        return self.status == "succeeded"


@dataclass(frozen=True)
class Submitted:
    """The answer to starting a run or job.

    Attributes:
        id: The run's (or job's) id.
        status: Its status when accepted, usually ``running``.
        created: ``False`` when an idempotency key matched an existing run, whose id this is.
    """

    id: str
    status: str
    created: bool


@dataclass(frozen=True)
class RunRequest:
    """One run to start, for :meth:`Client.submit_batch` (and what :meth:`Client.submit` sends).

    Attributes:
        workflow: A registered workflow's name, or an inline definition
            (``{"name"?, "steps": [...], "output"?}``).
        input: The run's input, any JSON value.
        version: The registered workflow's version (default: the latest).
        idempotency_key: A key that makes repeating the request return the existing run.
    """

    workflow: Union[str, Mapping[str, Any]]
    input: Any = None
    version: Optional[int] = None
    idempotency_key: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        """Returns the request as the JSON object ``POST /v1/runs`` takes."""
        body: Dict[str, Any]
        if isinstance(self.workflow, str):
            body = {"workflow": self.workflow}
            if self.version is not None:
                body["version"] = self.version
        elif isinstance(self.workflow, Mapping):
            if self.version is not None:
                raise ValueError(
                    "version applies to a registered workflow (given by name), "
                    "not to an inline definition"
                )
            body = {"definition": dict(self.workflow)}
        else:
            raise TypeError(
                "workflow must be a registered workflow's name (str) or an inline "
                f"definition (dict), not {type(self.workflow).__name__}"
            )
        body["input"] = self.input
        if self.idempotency_key is not None:
            body["idempotency_key"] = self.idempotency_key
        return body


@dataclass(frozen=True)
class RunSummary:
    """One run in a listing (``GET /v1/runs``): no input, output or steps."""

    id: str
    status: str
    workflow: Optional[str]
    version: Optional[int]
    created_at: datetime
    finished_at: Optional[datetime]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class RunPage:
    """A page of runs, newest first; pass ``next_cursor`` as ``cursor`` for the next page
    (``None`` when there is none)."""

    runs: List[RunSummary]
    next_cursor: Optional[str]


@dataclass(frozen=True)
class WorkflowVersion:
    """The answer to registering a definition: ``created`` is ``False`` when the definition
    was unchanged and no new version was made."""

    name: str
    version: int
    created: bool


@dataclass(frozen=True)
class WorkflowSummary:
    """A registered workflow's latest version in a listing: its name, version, number of
    steps, and when that version was registered."""

    name: str
    version: int
    steps: int
    created_at: datetime


@dataclass(frozen=True)
class Workflow:
    """One version of a registered workflow, with its definition."""

    name: str
    version: int
    definition: Dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class Worker:
    """A live worker, from its heartbeat; ``concurrency`` and ``running`` are ``None`` when
    its record lacks them."""

    id: str
    host: Optional[str]
    queues: List[str]
    concurrency: Optional[int]
    running: Optional[int]
    last_heartbeat: Optional[datetime]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Queue:
    """A task queue: messages ready in RabbitMQ, tasks in flight (held by workers), and consumers."""

    name: str
    ready: int
    in_flight: int
    consumers: int


# Reading answers


class _ShapeError(Exception):
    """An answer lacks a field or has one of the wrong type; becomes an UnexpectedResponse."""


_T = TypeVar("_T")


class _Fields:
    """Typed reads of a JSON object's fields, each failure naming the field."""

    def __init__(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise _ShapeError(f"{where} is {_json_type(value)}, not an object")
        self.value: Dict[str, Any] = value
        self.where = where

    def _get(self, key: str, check: Callable[[Any], bool], wanted: str, optional: bool) -> Any:
        if key not in self.value:
            if optional:
                return None
            raise _ShapeError(f"{self.where} has no {key!r}")
        found = self.value[key]
        if found is None and optional:
            return None
        if not check(found):
            raise _ShapeError(f"{self.where}[{key!r}] is {_json_type(found)}, not {wanted}")
        return found

    def text(self, key: str) -> str:
        text: str = self._get(key, _is_str, "a string", False)
        return text

    def opt_text(self, key: str) -> Optional[str]:
        text: Optional[str] = self._get(key, _is_str, "a string", True)
        return text

    def integer(self, key: str) -> int:
        number: int = self._get(key, _is_int, "an integer", False)
        return number

    def opt_integer(self, key: str) -> Optional[int]:
        number: Optional[int] = self._get(key, _is_int, "an integer", True)
        return number

    def timestamp(self, key: str) -> datetime:
        return self._time(self.text(key), key)

    def opt_timestamp(self, key: str) -> Optional[datetime]:
        text = self.opt_text(key)
        return None if text is None else self._time(text, key)

    def _time(self, text: str, key: str) -> datetime:
        try:
            return _parse_time(text)
        except ValueError:
            raise _ShapeError(f"{self.where}[{key!r}] is not a timestamp: {text!r}") from None

    def array(self, key: str) -> List[Any]:
        items: List[Any] = self._get(key, _is_list, "an array", False)
        return items

    def obj(self, key: str) -> Dict[str, Any]:
        found: Dict[str, Any] = self._get(key, _is_dict, "an object", False)
        return found

    def raw(self, key: str) -> Any:
        return self.value.get(key)

    def each(self, key: str, read: Callable[[Any, str], _T]) -> List[_T]:
        return [
            read(item, f"{self.where}[{key!r}][{index}]")
            for index, item in enumerate(self.array(key))
        ]


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_list(value: Any) -> bool:
    return isinstance(value, list)


def _is_dict(value: Any) -> bool:
    return isinstance(value, dict)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


_FRACTION = re.compile(r"^(.*T\d\d:\d\d:\d\d)\.(\d+)(.*)$")


def _parse_time(text: str) -> datetime:
    """Returns an RFC 3339 timestamp (as the API writes them) as an aware datetime.

    ``datetime.fromisoformat`` before Python 3.11 takes neither ``Z`` nor other than 3 or 6
    digits of fraction, so both are normalised first.
    """
    normalised = text.strip()
    if normalised[-1:] in ("Z", "z"):
        normalised = normalised[:-1] + "+00:00"
    match = _FRACTION.match(normalised)
    if match:
        head, fraction, tail = match.groups()
        normalised = f"{head}.{fraction[:6].ljust(6, '0')}{tail}"
    return datetime.fromisoformat(normalised)


def _step_error(value: Any, where: str) -> Optional[StepError]:
    if value is None:
        return None
    fields = _Fields(value, where)
    return StepError(
        type=fields.text("type"),
        message=fields.text("message"),
        step=fields.opt_text("step"),
        traceback=fields.opt_text("traceback"),
        raw=fields.value,
    )


def _step(step_id: str, value: Any, where: str) -> Step:
    fields = _Fields(value, where)
    items = None
    if fields.raw("items") is not None:
        counts = _Fields(fields.obj("items"), f"{where}['items']")
        items = Items(done=counts.integer("done"), total=counts.integer("total"))
    return Step(
        id=step_id,
        status=fields.text("status"),
        attempts=fields.integer("attempts"),
        output=fields.raw("output"),
        error=_step_error(fields.raw("error"), f"{where}['error']"),
        logs=fields.opt_text("logs"),
        started_at=fields.opt_timestamp("started_at"),
        finished_at=fields.opt_timestamp("finished_at"),
        task_id=fields.opt_text("task_id"),
        items=items,
        raw=fields.value,
    )


def _run(value: Any, kind: str) -> Run:
    fields = _Fields(value, kind)
    run_id, status = fields.text("id"), fields.text("status")
    steps = {
        step_id: _step(step_id, step, f"{kind}['steps'][{step_id!r}]")
        for step_id, step in fields.obj("steps").items()
    }
    return Run(
        id=run_id,
        kind=kind,
        status=status,
        workflow=fields.opt_text("workflow"),
        version=fields.opt_integer("version"),
        input=fields.raw("input"),
        output=fields.raw("output"),
        error=_step_error(fields.raw("error"), f"{kind}['error']"),
        created_at=fields.timestamp("created_at"),
        finished_at=fields.opt_timestamp("finished_at"),
        steps=steps,
        raw=fields.value,
    )


def _submitted(value: Any, created: bool) -> Submitted:
    fields = _Fields(value, "answer")
    return Submitted(id=fields.text("id"), status=fields.text("status"), created=created)


def _run_summary(value: Any, where: str) -> RunSummary:
    fields = _Fields(value, where)
    return RunSummary(
        id=fields.text("id"),
        status=fields.text("status"),
        workflow=fields.opt_text("workflow"),
        version=fields.opt_integer("version"),
        created_at=fields.timestamp("created_at"),
        finished_at=fields.opt_timestamp("finished_at"),
        raw=fields.value,
    )


def _run_page(value: Any) -> RunPage:
    fields = _Fields(value, "answer")
    return RunPage(
        runs=fields.each("runs", _run_summary), next_cursor=fields.opt_text("next_cursor")
    )


def _ids(value: Any) -> List[str]:
    fields = _Fields(value, "answer")
    ids = fields.array("ids")
    for index, run_id in enumerate(ids):
        if not isinstance(run_id, str):
            raise _ShapeError(f"answer['ids'][{index}] is {_json_type(run_id)}, not a string")
    return [str(run_id) for run_id in ids]


def _workflow_version(value: Any, created: bool) -> WorkflowVersion:
    fields = _Fields(value, "answer")
    return WorkflowVersion(
        name=fields.text("name"), version=fields.integer("version"), created=created
    )


def _workflow_summary(value: Any, where: str) -> WorkflowSummary:
    fields = _Fields(value, where)
    return WorkflowSummary(
        name=fields.text("name"),
        version=fields.integer("version"),
        steps=fields.integer("steps"),
        created_at=fields.timestamp("created_at"),
    )


def _workflow(value: Any) -> Workflow:
    fields = _Fields(value, "answer")
    return Workflow(
        name=fields.text("name"),
        version=fields.integer("version"),
        definition=fields.obj("definition"),
        created_at=fields.timestamp("created_at"),
    )


def _worker(value: Any, where: str) -> Worker:
    fields = _Fields(value, where)
    queues = fields.array("queues")
    if not all(isinstance(queue, str) for queue in queues):
        raise _ShapeError(f"{where}['queues'] holds something other than strings")
    return Worker(
        id=fields.text("id"),
        host=fields.opt_text("host"),
        queues=[str(queue) for queue in queues],
        concurrency=fields.opt_integer("concurrency"),
        running=fields.opt_integer("running"),
        last_heartbeat=fields.opt_timestamp("last_heartbeat"),
        raw=fields.value,
    )


def _queue(value: Any, where: str) -> Queue:
    fields = _Fields(value, where)
    return Queue(
        name=fields.text("name"),
        ready=fields.integer("ready"),
        in_flight=fields.integer("in_flight"),
        consumers=fields.integer("consumers"),
    )


# Talking HTTP


@dataclass(frozen=True)
class _Answer:
    """A successful answer: its status and its JSON body."""

    status: int
    body: Any

    @property
    def created(self) -> bool:
        """Whether the answer is 201 Created (rather than 200 for something that existed)."""
        return self.status == HTTPStatus.CREATED


_NO_BODY = object()


def _api_error(method: str, url: str, status: int, reason: str, body: bytes) -> ApiError:
    """Returns the error for a non-2xx answer, of the subclass its status calls for."""
    code: Optional[str] = None
    details: Any = None
    message = ""
    try:
        parsed = json.loads(body.decode("utf-8"))
    except ValueError:
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        message = error["message"]
        code = error["code"] if isinstance(error.get("code"), str) else None
        details = error.get("details")
    else:
        text = body.decode("utf-8", errors="replace").strip()
        if len(text) > _MAX_QUOTED_BODY:
            text = text[:_MAX_QUOTED_BODY] + "..."
        message = text or reason or "no message"
    error_class = _ERROR_CLASSES.get(status, ApiError)
    return error_class(status, code, message, details, method=method, url=url)


def _describe_failure(error: BaseException, timeout: float) -> str:
    """Returns why a request got no answer, in a few words."""
    if isinstance(error, urllib.error.URLError) and isinstance(error.reason, BaseException):
        return _describe_failure(error.reason, timeout)
    if isinstance(error, (socket.timeout, TimeoutError)):
        return f"timed out after {timeout:g} s"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve the host name: {error.strerror or error}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    return str(error) or type(error).__name__


def _wait_parameter(seconds: float) -> str:
    """Returns a wait as the API's ``?wait=`` value: ``30``, ``2.5``, ``0``."""
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


def _segment(text: str) -> str:
    """Returns one path segment, percent-encoded."""
    return urllib.parse.quote(text, safe="")


def _check_wait_timeout(timeout: Optional[float]) -> None:
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout >= 0):
        raise ValueError(
            f"timeout must be a number of seconds, 0 or more, or None; got {timeout!r}"
        )


class Client:
    """A client of one scheduler's HTTP API.

    Args:
        base_url: The API's base URL, such as ``http://127.0.0.1:8080``. Default: the
            ``TASKFLEET_API_URL`` environment variable, else ``http://127.0.0.1:8080``.
        timeout: The longest, in seconds, one request may take, beyond any long-poll wait it
            asks for.

    Raises:
        ValueError: The base URL is not an ``http://`` or ``https://`` URL, or the timeout is
            not a positive number.

    A client keeps no connection open between requests and may be shared between threads.
    """

    def __init__(self, base_url: Optional[str] = None, timeout: float = 30.0) -> None:
        source = "base_url"
        if base_url is None:
            from_env = os.environ.get(API_URL_ENV)
            if from_env:
                base_url, source = from_env, API_URL_ENV
            else:
                base_url = DEFAULT_API_URL
        parts = urllib.parse.urlsplit(base_url.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"{source} {base_url!r} is not an http:// or https:// URL "
                f"(such as {DEFAULT_API_URL!r})"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"{source} {base_url!r} must not have a query or fragment")
        if not (isinstance(timeout, (int, float)) and timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"timeout must be a positive number of seconds; got {timeout!r}")
        self._base_url = urllib.parse.urlunsplit(
            (parts.scheme, parts.netloc, parts.path.rstrip("/"), "", "")
        )
        self.timeout = float(timeout)
        self._opener = urllib.request.build_opener()

    @property
    def base_url(self) -> str:
        """The API's base URL, without a trailing slash."""
        return self._base_url

    def __repr__(self) -> str:
        return f"Client({self._base_url!r}, timeout={self.timeout:g})"

    # Runs

    def submit(
        self,
        workflow: Union[str, Mapping[str, Any]],
        input: Any = None,
        *,
        version: Optional[int] = None,
        idempotency_key: Optional[str] = None,
    ) -> Submitted:
        """Starts a run with ``POST /v1/runs`` and returns its id.

        Args:
            workflow: A registered workflow's name, or an inline definition
                (``{"name"?, "steps": [...], "output"?}``).
            input: The run's input, any JSON value.
            version: The registered workflow's version (default: the latest).
            idempotency_key: Repeating a request with the same key returns the existing run
                (with ``created`` ``False``) instead of starting another.

        Raises:
            NotFound: No workflow of that name (or version).
            InvalidRequest: The definition cannot run (422, naming the step), or the request is
                malformed (400: an unknown field, an input the store cannot hold).
        """
        request = RunRequest(workflow, input, version, idempotency_key)
        answer = self._call("POST", "/v1/runs", body=request.to_json())
        return self._read(answer, "POST", "/v1/runs", lambda body: _submitted(body, answer.created))

    def submit_batch(self, runs: Sequence[Union[RunRequest, Mapping[str, Any]]]) -> List[str]:
        """Starts many runs at once with ``POST /v1/runs:batch``; returns their ids in order.

        All or nothing: every run is checked before any is written, and an error (naming the
        run as ``runs[i]``) means none was started. A run is a :class:`RunRequest` or a
        mapping in the API's shape (``{"workflow"|"definition", "input", ...}``); at most
        1000 per batch.
        """
        bodies = [run.to_json() if isinstance(run, RunRequest) else dict(run) for run in runs]
        answer = self._call("POST", "/v1/runs:batch", body={"runs": bodies})
        return self._read(answer, "POST", "/v1/runs:batch", _ids)

    def status(self, run_id: str) -> Run:
        """Returns the run with ``GET /v1/runs/{id}``, finished or not.

        Raises:
            NotFound: No run with that id.
        """
        return self._show("runs", "run", run_id, None)

    def wait(self, run_id: str, timeout: Optional[float] = None) -> Run:
        """Waits for the run to finish and returns it, whatever its outcome.

        Long-polls ``GET /v1/runs/{id}?wait=S`` until the run is succeeded, failed or
        cancelled; check :attr:`Run.status`, or use :meth:`result` to get the output or an
        exception.

        Args:
            timeout: The most seconds to wait; ``None`` waits as long as it takes.

        Raises:
            WaitTimeout: The run had not finished when the timeout passed (it goes on).
            NotFound: No run with that id.
        """
        return self._wait("runs", "run", run_id, timeout)

    def result(self, run_id: str, timeout: Optional[float] = None) -> Any:
        """Waits for the run to finish and returns its output.

        Raises:
            RunFailed: The run failed; the exception's ``error`` names the step, the error
                type and message.
            RunCancelled: The run was cancelled (a subclass of :class:`RunFailed`).
            WaitTimeout: The run had not finished when the timeout passed.
        """
        return _output(self.wait(run_id, timeout))

    def cancel(self, run_id: str) -> None:
        """Cancels the run with ``POST /v1/runs/{id}/cancel``: no new step starts and running
        steps are stopped.

        Raises:
            Conflict: The run has already finished.
            NotFound: No run with that id.
        """
        self._call("POST", f"/v1/runs/{_segment(run_id)}/cancel")

    def list_runs(
        self,
        *,
        status: Optional[str] = None,
        workflow: Optional[str] = None,
        limit: Optional[int] = None,
        cursor: Optional[str] = None,
    ) -> RunPage:
        """Returns one page of workflow runs, newest first, with ``GET /v1/runs``.

        Args:
            status: Only runs with this status.
            workflow: Only runs of this registered workflow.
            limit: The most runs on the page, 1 to 1000 (the API's default is 50).
            cursor: The ``next_cursor`` of the previous page.
        """
        query: Dict[str, str] = {}
        if status is not None:
            query["status"] = status
        if workflow is not None:
            query["workflow"] = workflow
        if limit is not None:
            query["limit"] = str(limit)
        if cursor is not None:
            query["cursor"] = cursor
        answer = self._call("GET", "/v1/runs", query=query)
        return self._read(answer, "GET", "/v1/runs", _run_page)

    def iter_runs(
        self,
        *,
        status: Optional[str] = None,
        workflow: Optional[str] = None,
        page_size: Optional[int] = None,
    ) -> Iterator[RunSummary]:
        """Yields every matching run, newest first, fetching pages of ``page_size`` as needed."""
        cursor: Optional[str] = None
        while True:
            page = self.list_runs(status=status, workflow=workflow, limit=page_size, cursor=cursor)
            yield from page.runs
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    # Jobs

    def submit_job(
        self,
        step: Mapping[str, Any],
        input: Any = None,
        *,
        delay_s: Optional[float] = None,
        idempotency_key: Optional[str] = None,
    ) -> Submitted:
        """Enqueues one step as a job with ``POST /v1/tasks`` and returns its id.

        Args:
            step: The step's fields, as in a definition: one of ``python``, ``python_code``
                or ``dataflow``, and optionally ``retry``, ``timeout_s``, ``queue``, ... (``id``
                defaults to ``"job"``).
            input: The job's input.
            delay_s: Seconds before the job is dispatched.
            idempotency_key: Repeating a request with the same key returns the existing job.
        """
        clashing = [name for name in _JOB_FIELDS if name in step]
        if clashing:
            raise ValueError(
                f"give {', '.join(clashing)} as submit_job's argument, not in the step"
            )
        body = dict(step)
        body["input"] = input
        if delay_s is not None:
            body["delay_s"] = delay_s
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        answer = self._call("POST", "/v1/tasks", body=body)
        return self._read(
            answer, "POST", "/v1/tasks", lambda body: _submitted(body, answer.created)
        )

    def job_status(self, job_id: str) -> Run:
        """Returns the job with ``GET /v1/tasks/{id}``, in the shape of a run."""
        return self._show("tasks", "job", job_id, None)

    def wait_job(self, job_id: str, timeout: Optional[float] = None) -> Run:
        """Waits for the job to finish and returns it, as :meth:`wait` does for a run."""
        return self._wait("tasks", "job", job_id, timeout)

    def job_result(self, job_id: str, timeout: Optional[float] = None) -> Any:
        """Waits for the job to finish and returns its output, as :meth:`result` does."""
        return _output(self.wait_job(job_id, timeout))

    def cancel_job(self, job_id: str) -> None:
        """Cancels the job with ``POST /v1/tasks/{id}/cancel``, as :meth:`cancel` does a run."""
        self._call("POST", f"/v1/tasks/{_segment(job_id)}/cancel")

    # Workflows

    def put_workflow(
        self, definition: Mapping[str, Any], name: Optional[str] = None
    ) -> WorkflowVersion:
        """Registers a definition with ``PUT /v1/workflows/{name}``.

        Args:
            definition: The workflow definition.
            name: The workflow's name; default: the definition's ``"name"``.

        Returns:
            The name and version; ``created`` is ``False`` when the definition was unchanged.

        Raises:
            InvalidRequest: The definition cannot run (naming the step), or the name is not
                valid (1 to 64 characters among ``A-Z a-z 0-9 _ - .``).
        """
        if name is None:
            given = definition.get("name")
            if not isinstance(given, str):
                raise ValueError(
                    'put_workflow needs a name: pass name= or a definition with "name"'
                )
            name = given
        path = f"/v1/workflows/{_segment(name)}"
        answer = self._call("PUT", path, body=dict(definition))
        return self._read(answer, "PUT", path, lambda body: _workflow_version(body, answer.created))

    def workflows(self) -> List[WorkflowSummary]:
        """Returns the latest version of every registered workflow (``GET /v1/workflows``)."""
        answer = self._call("GET", "/v1/workflows")
        return self._read(
            answer,
            "GET",
            "/v1/workflows",
            lambda body: _Fields(body, "answer").each("workflows", _workflow_summary),
        )

    def workflow(self, name: str, version: Optional[int] = None) -> Workflow:
        """Returns a registered workflow's latest (or given) version, with its definition.

        Raises:
            NotFound: No workflow of that name, or no such version.
        """
        path = f"/v1/workflows/{_segment(name)}"
        query = {"version": str(version)} if version is not None else None
        answer = self._call("GET", path, query=query)
        return self._read(answer, "GET", path, _workflow)

    # The fleet

    def workers(self) -> List[Worker]:
        """Returns the live workers, from their heartbeats (``GET /v1/workers``)."""
        answer = self._call("GET", "/v1/workers")
        return self._read(
            answer,
            "GET",
            "/v1/workers",
            lambda body: _Fields(body, "answer").each("workers", _worker),
        )

    def queues(self) -> List[Queue]:
        """Returns the task queues with their counts (``GET /v1/queues``)."""
        answer = self._call("GET", "/v1/queues")
        return self._read(
            answer, "GET", "/v1/queues", lambda body: _Fields(body, "answer").each("queues", _queue)
        )

    def stats(self) -> Dict[str, Any]:
        """Returns counts of runs and tasks by status (``GET /v1/stats``), as the API gives
        them: ``{"namespace", "runs": {status: n}, "tasks": {status: n}}``."""
        answer = self._call("GET", "/v1/stats")
        return self._read(answer, "GET", "/v1/stats", lambda body: _Fields(body, "answer").value)

    # Plumbing

    def _show(self, collection: str, kind: str, run_id: str, wait: Optional[float]) -> Run:
        path = f"/v1/{collection}/{_segment(run_id)}"
        query = {"wait": _wait_parameter(wait)} if wait is not None else None
        answer = self._call("GET", path, query=query, extra_time=wait or 0.0)
        return self._read(answer, "GET", path, lambda body: _run(body, kind))

    def _wait(self, collection: str, kind: str, run_id: str, timeout: Optional[float]) -> Run:
        _check_wait_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            started = time.monotonic()
            poll = (
                _MAX_POLL_S if deadline is None else max(0.0, min(_MAX_POLL_S, deadline - started))
            )
            run = self._show(collection, kind, run_id, poll)
            if run.finished:
                return run
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise WaitTimeout(run, float(timeout or 0.0))
            next_poll = started + _MIN_POLL_INTERVAL_S
            if deadline is not None:
                next_poll = min(next_poll, deadline)
            if next_poll > now:
                time.sleep(next_poll - now)

    def _read(self, answer: _Answer, method: str, path: str, parse: Callable[[Any], _T]) -> _T:
        """Returns the answer's body parsed, or raises UnexpectedResponse naming what is wrong."""
        try:
            return parse(answer.body)
        except _ShapeError as error:
            raise UnexpectedResponse(method, self._base_url + path, str(error)) from None

    def _call(
        self,
        method: str,
        path: str,
        *,
        query: Optional[Mapping[str, str]] = None,
        body: Any = _NO_BODY,
        extra_time: float = 0.0,
    ) -> _Answer:
        """Sends one request and returns its status and JSON body, raising the fitting
        TaskfleetError for anything else."""
        url = self._base_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json", "User-Agent": _USER_AGENT}
        data = None
        if body is not _NO_BODY:
            try:
                data = json.dumps(body, allow_nan=False, separators=(",", ":")).encode("utf-8")
            except (TypeError, ValueError) as error:
                raise type(error)(
                    f"{method} {path}: the request cannot be sent as JSON: {error}"
                ) from error
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        timeout = self.timeout + extra_time
        try:
            with self._opener.open(request, timeout=timeout) as response:
                status = int(response.status)
                raw = response.read()
        except urllib.error.HTTPError as error:
            try:
                raw = error.read()
            except (OSError, http.client.HTTPException):
                raw = b""
            finally:
                error.close()
            raise _api_error(method, url, error.code, str(error.reason or ""), raw) from None
        except (OSError, http.client.HTTPException) as error:
            # URLError (refused, unresolvable), timeouts and resets are all OSErrors.
            raise SchedulerUnreachable(method, url, _describe_failure(error, timeout)) from error
        try:
            parsed = json.loads(raw.decode("utf-8")) if raw else None
        except ValueError as error:
            raise UnexpectedResponse(method, url, f"the body is not JSON: {error}") from None
        return _Answer(status, parsed)


def _output(run: Run) -> Any:
    """Returns a finished run's output, or raises RunFailed (RunCancelled) for its error."""
    if run.status == "succeeded":
        return run.output
    if run.status == "cancelled":
        raise RunCancelled(run)
    raise RunFailed(run)
