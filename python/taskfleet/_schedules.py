"""The schedule methods of :class:`taskfleet.client.Client` (``/v1/schedules``), kept apart
from the rest of the client's requests. Private to the package: use them through ``Client``.
"""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, TypeVar

from taskfleet._parse import _Fields, _schedule
from taskfleet.models import Schedule

if TYPE_CHECKING:
    from taskfleet.client import _Answer

_T = TypeVar("_T")


def _path(name: str) -> str:
    return "/v1/schedules/" + urllib.parse.quote(name, safe="")


class _ScheduleMethods:
    """Listing, showing, setting and deleting schedules."""

    if TYPE_CHECKING:

        def _call(self, method: str, path: str, *, body: Any = ...) -> _Answer: ...

        def _read(
            self, answer: _Answer, method: str, path: str, parse: Callable[[Any], _T]
        ) -> _T: ...

    def schedules(self) -> List[Schedule]:
        """Returns the tenant's schedules, by name (``GET /v1/schedules``)."""
        answer = self._call("GET", "/v1/schedules")
        return self._read(
            answer,
            "GET",
            "/v1/schedules",
            lambda body: _Fields(body, "answer").each("schedules", _schedule),
        )

    def schedule(self, name: str) -> Schedule:
        """Returns a schedule, with its next fire times.

        Raises:
            NotFound: No schedule of that name.
        """
        answer = self._call("GET", _path(name))
        return self._read(answer, "GET", _path(name), lambda body: _schedule(body, "answer"))

    def set_schedule(
        self,
        name: str,
        *,
        cron: str,
        workflow: Optional[str] = None,
        version: Optional[int] = None,
        definition: Optional[Mapping[str, Any]] = None,
        input: Any = None,
        timezone: Optional[str] = None,
        overlap: Optional[str] = None,
        catch_up: Optional[str] = None,
        paused: bool = False,
    ) -> Schedule:
        """Makes a schedule, or replaces what it says, with ``PUT /v1/schedules/{name}``.

        Args:
            name: The schedule's name.
            cron: 5 fields (minute hour day-of-month month day-of-week), or 6 with seconds first.
            workflow: A registered workflow to run (or give ``definition``).
            version: That workflow's version; default: its latest at each tick.
            definition: An inline definition to run (or give ``workflow``).
            input: Every run's input.
            timezone: The IANA time zone the expression is read in; default ``UTC``.
            overlap: ``"allow"`` (default) or ``"skip"`` while the previous run is unfinished.
            catch_up: ``"none"`` (default) or ``"last"``: one run for ticks missed while no
                scheduler ran.
            paused: Whether it starts nothing until set again unpaused.

        Raises:
            InvalidRequest: A field is wrong; the message names it.
            NotFound: The workflow (or its version) is not registered.
        """
        body: Dict[str, Any] = {"cron": cron, "input": input, "paused": paused}
        optional = {
            "workflow": workflow,
            "version": version,
            "definition": None if definition is None else dict(definition),
            "timezone": timezone,
            "overlap": overlap,
            "catch_up": catch_up,
        }
        body.update({key: value for key, value in optional.items() if value is not None})
        answer = self._call("PUT", _path(name), body=body)
        return self._read(answer, "PUT", _path(name), lambda body: _schedule(body, "answer"))

    def delete_schedule(self, name: str) -> None:
        """Deletes a schedule; its runs stay.

        Raises:
            NotFound: No schedule of that name.
        """
        self._call("DELETE", _path(name))
