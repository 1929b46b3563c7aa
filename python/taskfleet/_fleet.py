"""The fleet methods of :class:`taskfleet.client.Client` (workers, queues, dead letters and
counts), kept apart from the requests about runs, jobs and workflows. Private to the package:
use them through ``Client``.
"""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, TypeVar, Union

from taskfleet._parse import _dead_letters, _Fields, _purged, _queue, _worker
from taskfleet.models import DeadLetters, Queue, Worker

if TYPE_CHECKING:
    from taskfleet.client import _Answer

_T = TypeVar("_T")


def _queue_path(name: str) -> str:
    return "/v1/queues/" + urllib.parse.quote(name, safe="")


class _FleetMethods:
    """The live workers, the task queues, the dead letters and the counts by status."""

    if TYPE_CHECKING:

        def _call(self, method: str, path: str, *, body: Any = ...) -> _Answer: ...

        def _read(
            self, answer: _Answer, method: str, path: str, parse: Callable[[Any], _T]
        ) -> _T: ...

        def _list(
            self, path: str, parse: Callable[[Any], _T], **params: Union[str, int, None]
        ) -> _T: ...

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

    def queue_settings(self, name: str) -> Dict[str, Any]:
        """Returns a queue's settings (``GET /v1/queues/{name}``; an ``admin`` key):
        ``{"queue", "rate_limit_per_s", "updated_at"}``, ``None`` where unset."""
        path = _queue_path(name)
        answer = self._call("GET", path)
        return self._read(answer, "GET", path, lambda body: _Fields(body, "answer").value)

    def set_queue_settings(
        self, name: str, *, rate_limit_per_s: Optional[float] = None
    ) -> Dict[str, Any]:
        """Sets a queue's settings (``PUT /v1/queues/{name}``; an ``admin`` key) and returns
        them as :meth:`queue_settings` does. Every scheduler applies them within two seconds.

        Args:
            name: The task queue.
            rate_limit_per_s: The most starts per second of the queue's tasks, of every
                tenant, across the fleet (fractions allowed); ``None`` for no limit.
        """
        path = _queue_path(name)
        answer = self._call("PUT", path, body={"rate_limit_per_s": rate_limit_per_s})
        return self._read(answer, "PUT", path, lambda body: _Fields(body, "answer").value)

    def dead_letters(self, limit: Optional[int] = None) -> DeadLetters:
        """Returns the first messages of the dead-letters queue, oldest first, and how many it
        holds, without taking any off it (``GET /v1/dead-letters``; an ``admin`` key).

        Args:
            limit: The most messages listed, 1 to 1000 (the API's default is 50).
        """
        return self._list("/v1/dead-letters", _dead_letters, limit=limit)

    def purge_dead_letters(self) -> int:
        """Empties the dead-letters queue and returns how many messages it removed
        (``POST /v1/dead-letters:purge``; an ``admin`` key). The purge is audited."""
        answer = self._call("POST", "/v1/dead-letters:purge")
        return self._read(answer, "POST", "/v1/dead-letters:purge", _purged)

    def stats(self) -> Dict[str, Any]:
        """Returns counts of runs and tasks by status (``GET /v1/stats``), as the API gives
        them: ``{"namespace", "runs": {status: n}, "tasks": {status: n}}``."""
        answer = self._call("GET", "/v1/stats")
        return self._read(answer, "GET", "/v1/stats", lambda body: _Fields(body, "answer").value)
