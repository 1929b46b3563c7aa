"""The answers of the taskfleet HTTP API as typed, frozen dataclasses.

A :class:`Run` holds :class:`Step` objects and, when something failed, :class:`StepError`
objects; :class:`Submitted`, :class:`RunPage`, :class:`JobPage`, :class:`Workflow` and the
others below describe the other answers, and :class:`RunRequest` is one run to start. The
larger ones keep the JSON they were read from as ``raw``.

This module only declares them: it sends no request, and reading them from the API's JSON is
:mod:`taskfleet._parse`'s work. Every name here is also importable from
:mod:`taskfleet.client` and from ``taskfleet`` (``FINISHED_STATUSES`` from
:mod:`taskfleet.client` only). Like the rest of the client, it is not part of the copy of the
package that workers bundle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Dict, List, Mapping, Optional, Union

__all__ = [
    "FINISHED_STATUSES",
    "DeadLetter",
    "DeadLetters",
    "Items",
    "JobPage",
    "JobSummary",
    "Queue",
    "Run",
    "RunPage",
    "RunRequest",
    "RunSummary",
    "Schedule",
    "Step",
    "StepError",
    "Submitted",
    "Worker",
    "Workflow",
    "WorkflowSummary",
    "WorkflowVersion",
]

#: The statuses of a run (or job) that has ended.
FINISHED_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


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
        workflow: The workflow's name: the registered workflow's, or an inline definition's
            ``name``; ``None`` for an inline definition without one, or a job.
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
class JobSummary:
    """One job in a listing (``GET /v1/tasks``): no input, output or error.

    Attributes:
        id: The job's id.
        status: ``pending``, ``running``, ``succeeded``, ``failed`` or ``cancelled``.
        step: The job's step id (``"job"`` unless the step gave one).
        executor: What runs the step: ``python``, ``python_code`` or ``dataflow``.
        queue: The task queue the job is dispatched to (``default`` unless the step names one).
        created_at: When the job was accepted.
        finished_at: When it finished, else ``None``.
        raw: The JSON object it was read from.
    """

    id: str
    status: str
    step: str
    executor: str
    queue: str
    created_at: datetime
    finished_at: Optional[datetime]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class JobPage:
    """A page of jobs, newest first; pass ``next_cursor`` as ``cursor`` for the next page
    (``None`` when there is none)."""

    jobs: List[JobSummary]
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


@dataclass(frozen=True)
class DeadLetter:
    """A message in the dead-letters queue: one that names no task, which nothing can handle.

    Attributes:
        reason: Why nobody could read it, as the scheduler or worker that moved it there said.
        source: The queue it came from, such as ``"taskfleet.completions"``.
        dead_lettered_at: When it was moved there, to the second; ``None`` if not recorded.
        size: Its body's size in bytes.
        body_prefix: Its body's first 256 bytes at most, as text. With payload encryption on,
            payloads in it stay sealed.
    """

    reason: Optional[str]
    source: Optional[str]
    dead_lettered_at: Optional[datetime]
    size: int
    body_prefix: str


@dataclass(frozen=True)
class DeadLetters:
    """The start of the dead-letters queue: ``messages``, oldest first, and the ``total``
    the queue holds (more than listed when it holds more than the limit)."""

    total: int
    messages: List[DeadLetter]


@dataclass(frozen=True)
class Schedule:
    """A schedule: what it runs (a registered ``workflow``, at ``version`` or its latest, or
    an inline ``definition``), with which ``input``, at each tick of ``cron`` in
    ``timezone``; its policies; its next fire times; and what its last ticks came to.

    Attributes:
        overlap: ``"allow"``, or ``"skip"``: a tick while the previous run is unfinished
            starts nothing.
        catch_up: ``"none"``, or ``"last"``: one run for the ticks missed while no scheduler
            ran.
        next_fire_times: Up to 5 next ticks, in the schedule's time zone; none while paused.
        last_error: Why the last tick that failed could not start its run.
        raw: The JSON object it was read from.
    """

    name: str
    workflow: Optional[str]
    version: Optional[int]
    definition: Optional[Dict[str, Any]]
    input: Any
    cron: str
    timezone: str
    overlap: str
    catch_up: str
    paused: bool
    next_fire_times: List[datetime]
    last_run_id: Optional[str]
    last_fired_at: Optional[datetime]
    skipped_ticks: int
    last_error: Optional[str]
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
