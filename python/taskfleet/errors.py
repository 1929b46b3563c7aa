"""The errors of the taskfleet HTTP client: every one is a :class:`TaskfleetError`.

:class:`ApiError` (and its subclasses by HTTP status) when the scheduler answers with an error,
:class:`SchedulerUnreachable` when it cannot be reached, :class:`UnexpectedResponse` when it
answers with something the client does not understand, :class:`WaitTimeout` when a wait runs
out of time, and :class:`RunFailed` (:class:`RunCancelled`) from :meth:`Client.result` when a
run did not succeed.

This module declares them, reads an error answer into the fitting :class:`ApiError` and says
why a request got no answer; it sends no request, and :mod:`taskfleet.client` decides when a request raises which. Every public
name here is also importable from :mod:`taskfleet.client` and from ``taskfleet``. Like the rest
of the client, it is not part of the copy of the package that workers bundle.
"""

from __future__ import annotations

import json
import socket
import urllib.error
from typing import Any, Dict, Optional, Type

from taskfleet.models import Run

__all__ = [
    "ApiError",
    "Conflict",
    "Forbidden",
    "InvalidRequest",
    "NotFound",
    "RunCancelled",
    "RunFailed",
    "SchedulerUnreachable",
    "TaskfleetError",
    "Unavailable",
    "Unauthorized",
    "UnexpectedResponse",
    "WaitTimeout",
]

# The most characters of an error body that is not the API's error JSON quoted in a message.
_MAX_QUOTED_BODY = 300


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
    :class:`Unauthorized` (401), :class:`Forbidden` (403), :class:`NotFound` (404),
    :class:`Conflict` (409), :class:`Unavailable` (503).

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


class Unauthorized(ApiError):
    """Raised on 401: no API key was sent, or it is unknown or revoked (the answer does not say
    which), or the ``Authorization`` header is malformed."""


class Forbidden(ApiError):
    """Raised on 403: the API key lacks the scope the request needs (the message names it)."""


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
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    503: Unavailable,
}


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
