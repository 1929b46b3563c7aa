"""A client of the taskfleet scheduler's HTTP API, using the standard library only.

::

    from taskfleet import Client

    client = Client()  # TASKFLEET_API_URL, else http://127.0.0.1:8080
    submitted = client.submit("orders", [{"sku": "a", "qty": 1, "unit_price": 2}])
    run = client.wait(submitted.id, timeout=60)
    print(run.status, run.output)

This module owns :class:`Client` and the HTTP underneath it: requests, long polls, and turning
each answer into a typed value or an error. The answers' types (:class:`Run`, :class:`Step`,
:class:`Submitted`, ...) are declared in :mod:`taskfleet.models` and read from JSON by
:mod:`taskfleet._parse`; the errors are declared in :mod:`taskfleet.errors`. Every public name
of ``models`` and ``errors`` is importable from here as well, which is where ``taskfleet``
takes them from.

Every failure raised here is a :class:`TaskfleetError`: :class:`ApiError` (and its subclasses
by HTTP status) when the scheduler answers with an error, :class:`SchedulerUnreachable` when it
cannot be reached, :class:`UnexpectedResponse` when it answers with something this client does
not understand, :class:`WaitTimeout` when a wait runs out of time, and :class:`RunFailed`
from :meth:`Client.result` when a run did not succeed. Wrong arguments raise ``ValueError``
or ``TypeError`` before any request is sent.

Workers do not carry this module, nor ``models``, ``errors`` and ``_parse`` (they bundle only
``taskfleet.context``); step code that needs the client must have the package installed.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
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
    Tuple,
    TypeVar,
    Union,
)

from taskfleet._fleet import _FleetMethods
from taskfleet._parse import (
    _Fields,
    _ids,
    _job_page,
    _run,
    _run_page,
    _ShapeError,
    _submitted,
    _workflow,
    _workflow_summary,
    _workflow_version,
)
from taskfleet._schedules import _ScheduleMethods
from taskfleet.errors import (
    ApiError,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    RunCancelled,
    RunFailed,
    SchedulerUnreachable,
    TaskfleetError,
    Unauthorized,
    Unavailable,
    UnexpectedResponse,
    WaitTimeout,
    _api_error,
    _describe_failure,
)
from taskfleet.models import (
    FINISHED_STATUSES,
    DeadLetter,
    DeadLetters,
    Items,
    JobPage,
    JobSummary,
    Queue,
    Run,
    RunPage,
    RunRequest,
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

__all__ = [
    "API_KEY_ENV",
    "CA_CERT_ENV",
    "API_URL_ENV",
    "DEFAULT_API_URL",
    "FINISHED_STATUSES",
    "ApiError",
    "Client",
    "Conflict",
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
]

#: The environment variable naming the API's base URL.
API_URL_ENV = "TASKFLEET_API_URL"
#: The environment variable holding the API key sent with every request.
API_KEY_ENV = "TASKFLEET_API_KEY"
#: The environment variable naming a PEM file of CA certificates to trust for ``https://``.
CA_CERT_ENV = "TASKFLEET_CA_CERT"
#: The base URL used when neither an argument nor ``TASKFLEET_API_URL`` gives one.
DEFAULT_API_URL = "http://127.0.0.1:8080"

# The longest single long poll of a wait. The scheduler caps it too (TASKFLEET_MAX_WAIT_S) and
# answers at once when the run finishes, so this only bounds how long one request stays open.
_MAX_POLL_S = 30.0
# The least time between the starts of two polls, so that a scheduler answering before the wait
# it was asked for (a lower cap, a scheduler shutting down) is not hammered.
_MIN_POLL_INTERVAL_S = 0.5
_USER_AGENT = "taskfleet-python/0.1.0"
# The fields of POST /v1/tasks that are not the step's own.
_JOB_FIELDS = ("input", "delay_s", "idempotency_key")

_T = TypeVar("_T")


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


class Client(_ScheduleMethods, _FleetMethods):
    """A client of one scheduler's HTTP API.

    Args:
        base_url: The API's base URL, such as ``http://127.0.0.1:8080``. Default: the
            ``TASKFLEET_API_URL`` environment variable, else ``http://127.0.0.1:8080``.
        timeout: The longest, in seconds, one request may take, beyond any long-poll wait it
            asks for.
        api_key: The API key sent with every request (``Authorization: Bearer``). Default:
            the ``TASKFLEET_API_KEY`` environment variable, else none.
        ca_cert: A PEM file of CA certificates trusted for an ``https://`` URL, besides the
            system's. Default: the ``TASKFLEET_CA_CERT`` environment variable, else none.

    Raises:
        ValueError: The base URL is not an ``http://`` or ``https://`` URL, the timeout is
            not a positive number, the API key holds characters a header cannot carry, or
            the CA certificate file cannot be read as PEM certificates.

    A client keeps no connection open between requests and may be shared between threads.
    """

    def __init__(
        self,
        base_url: Optional[str] = None,
        timeout: float = 30.0,
        *,
        api_key: Optional[str] = None,
        ca_cert: Optional[str] = None,
    ) -> None:
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
        if api_key is None:
            api_key = os.environ.get(API_KEY_ENV) or None
        if api_key is not None:
            api_key = api_key.strip()
            if not api_key or not api_key.isascii() or not api_key.isprintable():
                raise ValueError(
                    "api_key (or TASKFLEET_API_KEY) must be printable ASCII, as the API's keys are"
                )
        self._authorization = None if api_key is None else f"Bearer {api_key}"
        if ca_cert is None:
            ca_cert = os.environ.get(CA_CERT_ENV) or None
        handlers: List[urllib.request.BaseHandler] = []
        if ca_cert is not None:
            context = ssl.create_default_context()
            try:
                context.load_verify_locations(cafile=ca_cert)
            except (OSError, ssl.SSLError) as error:
                raise ValueError(
                    f"ca_cert (or TASKFLEET_CA_CERT) {ca_cert!r} cannot be used: {error}"
                ) from error
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)

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

    def retry(self, run_id: str) -> str:
        """Runs a failed or cancelled run again with ``POST /v1/runs/{id}/retry``, from its
        failed, cancelled and unstarted steps; the steps that succeeded keep their outputs.
        Asked again while the re-run is under way, it answers the same.

        Raises:
            Conflict: The run succeeded, or is running and was never re-run.
            NotFound: No run with that id.

        Returns:
            The run's status: ``running``, or how it ended if it ended at once.
        """
        return self._act("runs", run_id, "retry")

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

        Raises:
            InvalidRequest: A status, limit or cursor the API does not take.
        """
        return self._list(
            "/v1/runs", _run_page, status=status, workflow=workflow, limit=limit, cursor=cursor
        )

    def iter_runs(
        self,
        *,
        status: Optional[str] = None,
        workflow: Optional[str] = None,
        page_size: Optional[int] = None,
    ) -> Iterator[RunSummary]:
        """Yields every matching run, newest first, fetching pages of ``page_size`` as needed."""

        def page(cursor: Optional[str]) -> Tuple[List[RunSummary], Optional[str]]:
            found = self.list_runs(status=status, workflow=workflow, limit=page_size, cursor=cursor)
            return found.runs, found.next_cursor

        return _every_page(page)

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

    def retry_job(self, job_id: str) -> str:
        """Runs a failed or cancelled job again with ``POST /v1/tasks/{id}/retry``, as
        :meth:`retry` does a run, and returns its status."""
        return self._act("tasks", job_id, "retry")

    def list_jobs(
        self,
        *,
        status: Optional[str] = None,
        limit: Optional[int] = None,
        cursor: Optional[str] = None,
    ) -> JobPage:
        """Returns one page of jobs, newest first, with ``GET /v1/tasks``.

        Args:
            status: Only jobs with this status.
            limit: The most jobs on the page, 1 to 1000 (the API's default is 50).
            cursor: The ``next_cursor`` of the previous page.

        Raises:
            InvalidRequest: A status, limit or cursor the API does not take.
        """
        return self._list("/v1/tasks", _job_page, status=status, limit=limit, cursor=cursor)

    def iter_jobs(
        self, *, status: Optional[str] = None, page_size: Optional[int] = None
    ) -> Iterator[JobSummary]:
        """Yields every matching job, newest first, fetching pages of ``page_size`` as needed."""

        def page(cursor: Optional[str]) -> Tuple[List[JobSummary], Optional[str]]:
            found = self.list_jobs(status=status, limit=page_size, cursor=cursor)
            return found.jobs, found.next_cursor

        return _every_page(page)

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

    # Plumbing

    def _list(self, path: str, parse: Callable[[Any], _T], **params: Union[str, int, None]) -> _T:
        """Returns one page of a listing: ``GET path`` with the parameters that are not
        ``None``, its answer parsed."""
        query = {name: str(value) for name, value in params.items() if value is not None}
        answer = self._call("GET", path, query=query)
        return self._read(answer, "GET", path, parse)

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

    def _act(self, collection: str, run_id: str, action: str) -> str:
        """Posts ``action`` to a run or job and returns the status it answers."""
        path = f"/v1/{collection}/{_segment(run_id)}/{action}"
        answer = self._call("POST", path)
        return self._read(answer, "POST", path, lambda body: _submitted(body, False).status)

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
        if self._authorization is not None:
            # Not repeated to wherever a redirect points.
            request.add_unredirected_header("Authorization", self._authorization)
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


def _every_page(fetch: Callable[[Optional[str]], Tuple[List[_T], Optional[str]]]) -> Iterator[_T]:
    """Yields the items of a listing's pages: ``fetch(cursor)`` returns a page's items and the
    next page's cursor, starting from ``None`` and ending with the page that has no next."""
    cursor: Optional[str] = None
    while True:
        items, cursor = fetch(cursor)
        yield from items
        if cursor is None:
            return


def _output(run: Run) -> Any:
    """Returns a finished run's output, or raises RunFailed (RunCancelled) for its error."""
    if run.status == "succeeded":
        return run.output
    if run.status == "cancelled":
        raise RunCancelled(run)
    raise RunFailed(run)
