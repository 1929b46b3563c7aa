"""Tests of taskfleet.Client that need no fleet: arguments, and answers from a stub server."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterator, List, Tuple
from urllib.parse import parse_qs, urlsplit

import pytest

from taskfleet import (
    ApiError,
    Client,
    Conflict,
    DeadLetter,
    DeadLetters,
    Forbidden,
    InvalidRequest,
    JobPage,
    JobSummary,
    NotFound,
    RunRequest,
    SchedulerUnreachable,
    Unauthorized,
    Unavailable,
    UnexpectedResponse,
    WaitTimeout,
)
from taskfleet._parse import _parse_time
from taskfleet.client import DEFAULT_API_URL

# A stub answer: status, content type, body.
Answer = Tuple[int, str, bytes]


def json_answer(status: int, value: Any) -> Answer:
    return status, "application/json", json.dumps(value).encode()


def poll_wait(path: str) -> float:
    """Returns the ``wait`` parameter of a polled path."""
    return float(parse_qs(urlsplit(path).query)["wait"][0])


RUNNING_RUN = {
    "id": "r1",
    "workflow": None,
    "version": None,
    "status": "running",
    "input": None,
    "output": None,
    "error": None,
    "created_at": "2026-11-26T12:00:00.123456Z",
    "finished_at": None,
    "steps": {
        "a": {
            "task_id": "t1",
            "status": "running",
            "attempts": 1,
            "output": None,
            "error": None,
            "logs": None,
            "started_at": "2026-11-26T12:00:00.2Z",
            "finished_at": None,
            "items": {"done": 3, "total": 10},
        }
    },
}


class Stub:
    """An HTTP server answering every request with what ``respond`` returns for it."""

    def __init__(self, respond: Callable[[str, str, bytes], Answer]) -> None:
        self.requests: List[Tuple[str, str, bytes]] = []
        self.authorizations: List[Any] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def handle_any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                stub.requests.append((self.command, self.path, body))
                stub.authorizations.append(self.headers.get("Authorization"))
                status, content_type, answer = respond(self.command, self.path, body)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            do_GET = do_POST = do_PUT = handle_any

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Iterator[Callable[[Callable[[str, str, bytes], Answer]], Stub]]:
    started: List[Stub] = []

    def start(respond: Callable[[str, str, bytes], Answer]) -> Stub:
        server = Stub(respond)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def test_base_url_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKFLEET_API_URL", "http://scheduler.example:9000/")
    assert Client().base_url == "http://scheduler.example:9000"
    assert Client("http://other:1/api/").base_url == "http://other:1/api"
    monkeypatch.delenv("TASKFLEET_API_URL")
    assert Client().base_url == DEFAULT_API_URL == "http://127.0.0.1:8080"


def test_bad_arguments_are_refused_before_any_request(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="base_url '127.0.0.1:8080' is not an http"):
        Client("127.0.0.1:8080")
    monkeypatch.setenv("TASKFLEET_API_URL", "ftp://files")
    with pytest.raises(ValueError, match="TASKFLEET_API_URL 'ftp://files'"):
        Client()
    with pytest.raises(ValueError, match="timeout"):
        Client("http://127.0.0.1:1", timeout=0)
    client = Client("http://127.0.0.1:1")
    with pytest.raises(ValueError, match="version applies to a registered workflow"):
        client.submit({"steps": []}, version=2)
    with pytest.raises(TypeError, match="not int"):
        RunRequest(7).to_json()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="give input as submit_job's argument"):
        client.submit_job({"dataflow": ".", "input": 1})
    with pytest.raises(ValueError, match="needs a name"):
        client.put_workflow({"steps": []})
    with pytest.raises(ValueError, match="timeout must be"):
        client.wait("r1", timeout=-1)
    with pytest.raises(TypeError, match="cannot be sent as JSON"):
        client.submit("orders", {1, 2})


def test_run_requests_take_the_api_shape() -> None:
    assert RunRequest("orders", [1], version=3, idempotency_key="k").to_json() == {
        "workflow": "orders",
        "version": 3,
        "input": [1],
        "idempotency_key": "k",
    }
    assert RunRequest({"steps": []}).to_json() == {"definition": {"steps": []}, "input": None}


def test_timestamps_are_parsed_whatever_their_precision() -> None:
    utc = timezone.utc
    assert _parse_time("2026-11-26T12:41:00Z") == datetime(2026, 11, 26, 12, 41, tzinfo=utc)
    assert _parse_time("2026-11-26T12:41:00.5Z").microsecond == 500000
    assert _parse_time("2026-11-26T12:41:00.123456789Z").microsecond == 123456
    assert _parse_time("2026-11-26T13:41:00.1+01:00") == datetime(
        2026, 11, 26, 12, 41, 0, 100000, tzinfo=utc
    )


def test_runs_are_read_into_types(stub: Any) -> None:
    server = stub(lambda method, path, body: json_answer(200, RUNNING_RUN))

    run = Client(server.url).status("r1")

    assert (run.id, run.kind, run.status, run.finished) == ("r1", "run", "running", False)
    assert run.created_at == datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=timezone.utc)
    step = run.steps["a"]
    assert (step.id, step.status, step.attempts, step.task_id) == ("a", "running", 1, "t1")
    assert step.items is not None and (step.items.done, step.items.total) == (3, 10)
    assert step.started_at is not None and step.started_at - run.created_at == timedelta(
        microseconds=76544
    )
    assert run.raw == RUNNING_RUN
    assert server.requests == [("GET", "/v1/runs/r1", b"")]


def test_error_answers_become_typed_errors(stub: Any) -> None:
    answers: Dict[str, Answer] = {
        "/v1/runs/r1/cancel": json_answer(
            409, {"error": {"code": "conflict", "message": "run r1 has already finished"}}
        ),
        "/v1/runs": json_answer(
            422,
            {
                "error": {
                    "code": "invalid_definition",
                    "message": 'invalid workflow definition: step "b": bad',
                    "details": [{"step": "b", "message": "bad"}],
                }
            },
        ),
        "/v1/runs/r2": json_answer(404, {"error": {"code": "not_found", "message": "no run"}}),
        "/v1/stats": json_answer(503, {"error": {"code": "unavailable", "message": "db down"}}),
        "/v1/workers": (502, "text/html", b"<html>bad gateway</html>"),
        "/v1/queues": (200, "text/plain", b"not json"),
        "/v1/runs/r3": json_answer(200, {"id": "r3"}),
    }
    server = stub(lambda method, path, body: answers[path.split("?")[0]])
    client = Client(server.url)

    with pytest.raises(Conflict) as conflict:
        client.cancel("r1")
    assert str(conflict.value) == (
        f"POST {server.url}/v1/runs/r1/cancel: 409 conflict: run r1 has already finished"
    )
    with pytest.raises(InvalidRequest) as invalid:
        client.submit({"steps": []})
    assert invalid.value.details == [{"step": "b", "message": "bad"}]
    with pytest.raises(NotFound):
        client.status("r2")
    with pytest.raises(Unavailable, match="db down"):
        client.stats()
    with pytest.raises(ApiError) as gateway:
        client.workers()
    assert type(gateway.value) is ApiError
    assert (gateway.value.status, gateway.value.code) == (502, None)
    assert gateway.value.message == "<html>bad gateway</html>"
    with pytest.raises(UnexpectedResponse, match="the body is not JSON"):
        client.queues()
    with pytest.raises(UnexpectedResponse, match="run has no 'status'"):
        client.status("r3")


def test_wait_polls_with_a_wait_and_paces_early_answers(stub: Any) -> None:
    # The stub answers at once, as a scheduler with a low TASKFLEET_MAX_WAIT_S would.
    server = stub(lambda method, path, body: json_answer(200, RUNNING_RUN))
    client = Client(server.url)

    started = time.monotonic()
    with pytest.raises(WaitTimeout) as caught:
        client.wait("r1", timeout=1.2)
    elapsed = time.monotonic() - started

    assert 1.2 <= elapsed < 5
    assert caught.value.run.status == "running"
    assert 1.1 < poll_wait(server.requests[0][1]) <= 1.2
    assert 2 <= len(server.requests) <= 5, server.requests


def test_a_wait_ends_when_the_run_finishes(stub: Any) -> None:
    polls: List[str] = []

    def respond(method: str, path: str, body: bytes) -> Answer:
        polls.append(path)
        status = "succeeded" if len(polls) >= 2 else "running"
        return json_answer(200, {**RUNNING_RUN, "status": status, "output": [1]})

    client = Client(stub(respond).url)

    assert client.result("r1", timeout=10) == [1]
    assert len(polls) == 2
    assert 9 < poll_wait(polls[0]) <= 10


def test_refused_connection_names_the_url() -> None:
    with pytest.raises(SchedulerUnreachable) as caught:
        Client("http://127.0.0.1:1").workflows()
    assert str(caught.value) == (
        "GET http://127.0.0.1:1/v1/workflows: cannot reach the scheduler: connection refused"
    )
    assert isinstance(caught.value, ConnectionError)


JOB_PAGE = {
    "jobs": [
        {
            "id": "j2",
            "step": "resize",
            "executor": "python",
            "queue": "images",
            "status": "running",
            "created_at": "2026-11-26T12:00:01Z",
            "finished_at": None,
        },
        {
            "id": "j1",
            "step": "job",
            "executor": "dataflow",
            "queue": "default",
            "status": "succeeded",
            "created_at": "2026-11-26T12:00:00.5Z",
            "finished_at": "2026-11-26T12:00:00.75Z",
        },
    ],
    "next_cursor": "j1",
}


def test_jobs_listing_is_read_into_types(stub: Any) -> None:
    server = stub(lambda method, path, body: json_answer(200, JOB_PAGE))

    page = Client(server.url).list_jobs()

    assert isinstance(page, JobPage) and page.next_cursor == "j1"
    assert [type(job) for job in page.jobs] == [JobSummary, JobSummary]
    running, done = page.jobs
    assert (running.id, running.status, running.step, running.executor, running.queue) == (
        "j2",
        "running",
        "resize",
        "python",
        "images",
    )
    assert running.created_at == datetime(2026, 11, 26, 12, 0, 1, tzinfo=timezone.utc)
    assert running.finished_at is None
    assert (done.id, done.status, done.step, done.executor, done.queue) == (
        "j1",
        "succeeded",
        "job",
        "dataflow",
        "default",
    )
    assert done.finished_at is not None and done.finished_at - done.created_at == timedelta(
        milliseconds=250
    )
    assert done.raw == JOB_PAGE["jobs"][1]
    with pytest.raises(dataclasses.FrozenInstanceError):
        done.status = "failed"  # type: ignore[misc]
    assert server.requests == [("GET", "/v1/tasks", b"")]
    last = stub(lambda method, path, body: json_answer(200, {"jobs": [], "next_cursor": None}))
    assert Client(last.url).list_jobs() == JobPage(jobs=[], next_cursor=None)


def test_dead_letters_are_read_into_types_and_purged(stub: Any) -> None:
    listing = {
        "total": 3,
        "messages": [
            {
                "reason": "message is not valid JSON",
                "source": "ns.tasks.default",
                "dead_lettered_at": "2026-11-26T12:00:00Z",
                "size": 15,
                "body_prefix": "not json at all",
            },
            {
                "reason": None,
                "source": None,
                "dead_lettered_at": None,
                "size": 0,
                "body_prefix": "",
            },
        ],
    }
    answers = {
        "/v1/dead-letters": json_answer(200, listing),
        "/v1/dead-letters:purge": json_answer(200, {"purged": 3}),
    }
    server = stub(lambda method, path, body: answers[urlsplit(path).path])
    client = Client(server.url)

    at = datetime(2026, 11, 26, 12, 0, 0, tzinfo=timezone.utc)
    assert client.dead_letters(limit=2) == DeadLetters(
        total=3,
        messages=[
            DeadLetter("message is not valid JSON", "ns.tasks.default", at, 15, "not json at all"),
            DeadLetter(None, None, None, 0, ""),
        ],
    )
    assert client.purge_dead_letters() == 3
    client.dead_letters()
    assert [(method, path) for method, path, _ in server.requests] == [
        ("GET", "/v1/dead-letters?limit=2"),
        ("POST", "/v1/dead-letters:purge"),
        ("GET", "/v1/dead-letters"),
    ]


def test_listings_send_only_the_parameters_given(stub: Any) -> None:
    def respond(method: str, path: str, body: bytes) -> Answer:
        key = "runs" if urlsplit(path).path == "/v1/runs" else "jobs"
        return json_answer(200, {key: [], "next_cursor": None})

    server = stub(respond)
    client = Client(server.url)

    client.list_runs()
    client.list_runs(status="failed", workflow="orders/eu", limit=2, cursor="c 1")
    client.list_jobs()
    client.list_jobs(status="running", limit=1000, cursor="c&2")
    client.list_jobs(limit=1)

    paths = [path for _, path, _ in server.requests]
    assert [urlsplit(path).path for path in paths] == ["/v1/runs"] * 2 + ["/v1/tasks"] * 3
    assert [parse_qs(urlsplit(path).query) for path in paths] == [
        {},
        {"status": ["failed"], "workflow": ["orders/eu"], "limit": ["2"], "cursor": ["c 1"]},
        {},
        {"status": ["running"], "limit": ["1000"], "cursor": ["c&2"]},
        {"limit": ["1"]},
    ]
    assert paths[0] == "/v1/runs" and paths[2] == "/v1/tasks"  # no "?" without parameters


@pytest.mark.parametrize("kind", ["runs", "jobs"])
def test_iterating_follows_the_cursor_to_the_last_page(stub: Any, kind: str) -> None:
    def item(number: int) -> Dict[str, Any]:
        common = {"id": f"x{number}", "status": "failed", "created_at": "2026-11-26T12:00:00Z"}
        if kind == "runs":
            return {**common, "workflow": "orders", "version": 1, "finished_at": None}
        return {**common, "step": "job", "executor": "python_code", "queue": "default"}

    # Three pages of 2, 2 and 1 item; a page's cursor is its last item's id.
    pages = {None: [5, 4], "x4": [3, 2], "x2": [1]}

    def respond(method: str, path: str, body: bytes) -> Answer:
        cursor = parse_qs(urlsplit(path).query).get("cursor", [None])[0]
        numbers = pages[cursor]
        next_cursor = f"x{numbers[-1]}" if len(numbers) == 2 else None
        return json_answer(200, {kind: [item(n) for n in numbers], "next_cursor": next_cursor})

    server = stub(respond)
    client = Client(server.url)

    if kind == "runs":
        listed = client.iter_runs(status="failed", workflow="orders", page_size=2)
    else:
        listed = client.iter_jobs(status="failed", page_size=2)
    assert server.requests == []  # nothing is fetched before the first item is asked for
    assert [summary.id for summary in listed] == ["x5", "x4", "x3", "x2", "x1"]

    path = "/v1/runs" if kind == "runs" else "/v1/tasks"
    filters = {"status": ["failed"], "limit": ["2"]}
    if kind == "runs":
        filters["workflow"] = ["orders"]
    assert [urlsplit(request[1]).path for request in server.requests] == [path] * 3
    assert [parse_qs(urlsplit(request[1]).query) for request in server.requests] == [
        filters,
        {**filters, "cursor": ["x4"]},
        {**filters, "cursor": ["x2"]},
    ]


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ({"next_cursor": None}, "answer has no 'jobs'"),
        ({"jobs": {}, "next_cursor": None}, "answer['jobs'] is an object, not an array"),
        ({"jobs": [7]}, "answer['jobs'][0] is a number, not an object"),
        (
            {"jobs": [{k: v for k, v in JOB_PAGE["jobs"][0].items() if k != "executor"}]},
            "answer['jobs'][0] has no 'executor'",
        ),
        (
            {"jobs": [JOB_PAGE["jobs"][1], {**JOB_PAGE["jobs"][0], "queue": None}]},
            "answer['jobs'][1]['queue'] is null, not a string",
        ),
        (
            {"jobs": [{**JOB_PAGE["jobs"][0], "step": 3}]},
            "answer['jobs'][0]['step'] is a number, not a string",
        ),
        (
            {"jobs": [{**JOB_PAGE["jobs"][0], "created_at": "yesterday"}]},
            "answer['jobs'][0]['created_at'] is not a timestamp: 'yesterday'",
        ),
        ({"jobs": [], "next_cursor": 5}, "answer['next_cursor'] is a number, not a string"),
        ([], "answer is an array, not an object"),
    ],
)
def test_a_bad_jobs_listing_is_an_unexpected_response(
    stub: Any, answer: Any, problem: str
) -> None:
    server = stub(lambda method, path, body: json_answer(200, answer))

    with pytest.raises(UnexpectedResponse) as caught:
        Client(server.url).list_jobs(limit=5)

    assert str(caught.value).endswith(problem), str(caught.value)
    assert caught.value.url == f"{server.url}/v1/tasks"


def test_a_refused_jobs_listing_is_an_invalid_request(stub: Any) -> None:
    message = 'status "sleeping" is not one of pending, running, succeeded, failed, cancelled'
    server = stub(
        lambda method, path, body: json_answer(
            400, {"error": {"code": "bad_request", "message": message}}
        )
    )

    with pytest.raises(InvalidRequest) as caught:
        Client(server.url).list_jobs(status="sleeping")

    assert (caught.value.status, caught.value.code, caught.value.message) == (
        400,
        "bad_request",
        message,
    )
    assert caught.value.url == f"{server.url}/v1/tasks?status=sleeping"


def test_the_api_key_is_sent_as_a_bearer_token(
    stub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = stub(lambda method, path, body: (200, "application/json", b'{"workflows": []}'))
    monkeypatch.delenv("TASKFLEET_API_KEY", raising=False)
    Client(server.url).workflows()
    Client(server.url, api_key="tfk_given").workflows()
    monkeypatch.setenv("TASKFLEET_API_KEY", "tfk_from_env")
    Client(server.url).workflows()
    Client(server.url, api_key="tfk_given").workflows()
    assert server.authorizations == [
        None,
        "Bearer tfk_given",
        "Bearer tfk_from_env",
        "Bearer tfk_given",
    ]
    assert "tfk_" not in repr(Client(server.url))
    for bad in ["", "tfk_caf\u00e9", "tfk\nx"]:
        with pytest.raises(ValueError, match="api_key"):
            Client(server.url, api_key=bad)


def test_refused_keys_and_scopes_are_typed_errors(stub: Any) -> None:
    answers = {
        "/v1/runs": (401, {"code": "unauthorized", "message": "a valid API key is required"}),
        "/v1/workers": (403, {"code": "forbidden", "message": "lacks the scope admin"}),
    }

    def respond(method: str, path: str, body: bytes) -> Answer:
        status, error = answers[urlsplit(path).path]
        return status, "application/json", json.dumps({"error": error}).encode()

    client = Client(stub(respond).url, api_key="tfk_x")
    with pytest.raises(Unauthorized) as unauthorized:
        client.list_runs()
    assert unauthorized.value.status == 401
    assert isinstance(unauthorized.value, ApiError)
    with pytest.raises(Forbidden, match="admin"):
        client.workers()


def test_a_ca_certificate_that_cannot_be_read_is_refused_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ValueError, match="/no/such/ca.pem"):
        Client("https://scheduler.example", ca_cert="/no/such/ca.pem")
    monkeypatch.setenv("TASKFLEET_CA_CERT", "/no/such/env-ca.pem")
    with pytest.raises(ValueError, match="env-ca.pem"):
        Client("https://scheduler.example")
