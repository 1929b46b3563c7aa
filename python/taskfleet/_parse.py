"""Reading the taskfleet API's JSON answers into the dataclasses of :mod:`taskfleet.models`.

Each reader checks the shape it needs and raises :class:`_ShapeError` naming the field that is
missing or of the wrong type (``run['steps']['a']['attempts']``, say). It knows nothing of the
request: :mod:`taskfleet.client` turns a ``_ShapeError`` into an
:class:`~taskfleet.errors.UnexpectedResponse` naming the request's method and URL. Private to
the package.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Callable, Dict, List, Optional, TypeVar

from taskfleet.models import (
    DeadLetter,
    DeadLetters,
    Items,
    JobPage,
    JobSummary,
    Queue,
    Run,
    RunPage,
    RunSummary,
    Schedule,
    Step,
    StepError,
    Submitted,
    Worker,
    Workflow,
    WorkflowSummary,
    WorkflowVersion,
)


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


def _job_summary(value: Any, where: str) -> JobSummary:
    fields = _Fields(value, where)
    return JobSummary(
        id=fields.text("id"),
        status=fields.text("status"),
        step=fields.text("step"),
        executor=fields.text("executor"),
        queue=fields.text("queue"),
        created_at=fields.timestamp("created_at"),
        finished_at=fields.opt_timestamp("finished_at"),
        raw=fields.value,
    )


def _job_page(value: Any) -> JobPage:
    fields = _Fields(value, "answer")
    return JobPage(
        jobs=fields.each("jobs", _job_summary), next_cursor=fields.opt_text("next_cursor")
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


def _dead_letter(value: Any, where: str) -> DeadLetter:
    fields = _Fields(value, where)
    return DeadLetter(
        reason=fields.opt_text("reason"),
        source=fields.opt_text("source"),
        dead_lettered_at=fields.opt_timestamp("dead_lettered_at"),
        size=fields.integer("size"),
        body_prefix=fields.text("body_prefix"),
    )


def _dead_letters(value: Any) -> DeadLetters:
    fields = _Fields(value, "answer")
    return DeadLetters(
        total=fields.integer("total"), messages=fields.each("messages", _dead_letter)
    )


def _purged(value: Any) -> int:
    return _Fields(value, "answer").integer("purged")


def _schedule(value: Any, where: str) -> Schedule:
    fields = _Fields(value, where)
    definition = fields.value.get("definition")
    if definition is not None and not isinstance(definition, dict):
        raise _ShapeError(f"{where}['definition'] is {_json_type(definition)}, not an object")
    paused = fields.value.get("paused")
    if not isinstance(paused, bool):
        raise _ShapeError(f"{where}['paused'] is {_json_type(paused)}, not a boolean")
    times = fields.array("next_fire_times")
    if not all(isinstance(time, str) for time in times):
        raise _ShapeError(f"{where}['next_fire_times'] holds something other than strings")
    return Schedule(
        name=fields.text("name"),
        workflow=fields.opt_text("workflow"),
        version=fields.opt_integer("version"),
        definition=definition,
        input=fields.value.get("input"),
        cron=fields.text("cron"),
        timezone=fields.text("timezone"),
        overlap=fields.text("overlap"),
        catch_up=fields.text("catch_up"),
        paused=paused,
        next_fire_times=[fields._time(time, "next_fire_times") for time in times],
        last_run_id=fields.opt_text("last_run_id"),
        last_fired_at=fields.opt_timestamp("last_fired_at"),
        skipped_ticks=fields.integer("skipped_ticks"),
        last_error=fields.opt_text("last_error"),
        raw=fields.value,
    )
