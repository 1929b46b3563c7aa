"""Tests of taskfleet.Client against a running fleet.

The fleet's API URL comes from ``TASKFLEET_API_URL``; ``scripts/python-tests.sh`` starts a
scheduler and a worker of their own and runs these tests against them. Without the variable
the module is skipped, unless ``TASKFLEET_REQUIRE_FLEET=1`` makes that a failure.

Every test names its workflows with a fresh uuid, so tests do not see each other's runs.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from datetime import datetime
from typing import Any, Dict, Iterable, Iterator, List

import pytest

from taskfleet import (
    Client,
    Conflict,
    InvalidRequest,
    JobSummary,
    NotFound,
    Run,
    RunCancelled,
    RunFailed,
    RunRequest,
    SchedulerUnreachable,
    TaskfleetError,
    Unauthorized,
    WaitTimeout,
    WorkflowVersion,
)

API_URL = os.environ.get("TASKFLEET_API_URL", "")
if not API_URL:
    _REASON = (
        "TASKFLEET_API_URL is not set: these tests need a running fleet "
        "(scripts/python-tests.sh starts one and runs them)"
    )
    if os.environ.get("TASKFLEET_REQUIRE_FLEET") == "1":
        pytest.fail(f"TASKFLEET_REQUIRE_FLEET=1 but {_REASON}", pytrace=False)
    pytest.skip(_REASON, allow_module_level=True)

# The longest any run here should take to finish, generous for a loaded 2-core machine.
WAIT_S = 60.0

# A Python step that runs for a minute unless it is stopped; it sleeps in short slices so an
# exception raised in it (a cancellation) takes effect at once.
SLOW_STEP = """\
import time

def main(input):
    for _ in range(600):
        time.sleep(0.1)
    return "slept"
"""


def unique_name(what: str = "wf") -> str:
    """Returns a workflow name no other test (or test run) uses."""
    return f"pytest-{what}-{uuid.uuid4().hex}"


def workflow(*steps: Dict[str, Any], name: str = "") -> Dict[str, Any]:
    """Returns a definition of the given steps, under a fresh unique name unless one is given."""
    return {"name": name or unique_name(), "steps": list(steps)}


def wait_for_step(client: Client, run_id: str, step_id: str, status: str) -> Run:
    """Polls the run until the step has the status, failing the test after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while True:
        run = client.status(run_id)
        if run.steps[step_id].status == status:
            return run
        if time.monotonic() > deadline:
            pytest.fail(f"step {step_id!r} of run {run_id} never became {status}: {run}")
        time.sleep(0.05)


@pytest.fixture
def client() -> Client:
    return Client(API_URL)


@pytest.fixture
def slow_run(client: Client) -> Iterator[str]:
    """Starts a run of one slow Python step; cancels it afterwards if it is still going."""
    submitted = client.submit(workflow({"id": "slow", "python_code": SLOW_STEP}))
    yield submitted.id
    with contextlib.suppress(Conflict):
        client.cancel(submitted.id)


def test_inline_workflow_runs_jq_and_python_steps(client: Client) -> None:
    definition = workflow(
        {"id": "clean", "dataflow": "map(select(.qty > 0))"},
        {
            "id": "price",
            "after": ["clean"],
            "python_code": (
                "def main(orders):\n"
                "    print('pricing', len(orders), 'orders')\n"
                "    return [{**o, 'price': o['qty'] * o['unit_price']} for o in orders]\n"
            ),
        },
        {
            "id": "total",
            "after": ["price"],
            "dataflow": "{lines: length, total: (map(.price) | add)}",
        },
    )
    orders = [
        {"sku": "a", "qty": 2, "unit_price": 3},
        {"sku": "b", "qty": 0, "unit_price": 5},
        {"sku": "c", "qty": 1, "unit_price": 4},
    ]

    submitted = client.submit(definition, orders)
    assert submitted.created
    run = client.wait(submitted.id, timeout=WAIT_S)

    assert run.status == "succeeded", run
    assert run.succeeded and run.finished
    assert run.output == {"lines": 2, "total": 10}
    assert run.error is None
    # A run of an inline definition is listed under the definition's name.
    assert run.workflow == definition["name"]
    assert run.input == orders
    assert list(run.steps) == ["clean", "price", "total"]
    assert run.steps["clean"].output == [orders[0], orders[2]]
    price = run.steps["price"]
    assert (price.status, price.attempts, price.error) == ("succeeded", 1, None)
    assert [line["price"] for line in price.output] == [6, 4]
    assert price.logs is not None and "pricing 2 orders" in price.logs
    assert client.result(submitted.id) == {"lines": 2, "total": 10}


def test_step_imports_taskfleet_in_the_worker(client: Client) -> None:
    # Without the package installed, the worker gives steps its bundled copy of taskfleet.
    step = (
        "import taskfleet\n"
        "from taskfleet import Context\n"
        "\n"
        "def main(input, ctx: Context):\n"
        "    return {'step': ctx.step_id, 'attempt': ctx.attempt, 'run': ctx.run_id,\n"
        "            'context': isinstance(ctx, Context), 'version': taskfleet.__version__}\n"
    )
    submitted = client.submit(workflow({"id": "who", "python_code": step}))

    output = client.result(submitted.id, timeout=WAIT_S)

    assert output == {
        "step": "who",
        "attempt": 1,
        "run": submitted.id,
        "context": True,
        "version": "0.1.0",
    }


def test_registered_workflow_runs_by_name_and_version(client: Client) -> None:
    name = unique_name()
    definition = workflow(
        {"id": "inc", "dataflow": "map(. + 1)"},
        {"id": "sum", "python_code": "def main(xs):\n    return sum(xs)\n", "after": ["inc"]},
        name=name,
    )

    assert client.put_workflow(definition) == WorkflowVersion(name, 1, created=True)
    assert client.put_workflow(definition) == WorkflowVersion(name, 1, created=False)
    assert client.put_workflow({**definition, "output": "inc"}) == WorkflowVersion(
        name, 2, created=True
    )
    assert client.workflow(name).definition["output"] == "inc"
    assert "output" not in client.workflow(name, version=1).definition
    listed = [summary for summary in client.workflows() if summary.name == name]
    assert [(summary.version, summary.steps) for summary in listed] == [(2, 2)]

    first = client.wait(client.submit(name, [1, 2, 3], version=1).id, timeout=WAIT_S)
    assert (first.status, first.workflow, first.version, first.output) == (
        "succeeded",
        name,
        1,
        9,
    )
    assert client.result(client.submit(name, [1, 2, 3]).id, timeout=WAIT_S) == [2, 3, 4]


def test_batch_starts_every_run(client: Client) -> None:
    name = unique_name()
    client.put_workflow(workflow({"id": "double", "dataflow": ". * 2"}, name=name))
    inline = workflow({"id": "triple", "python_code": "def main(x):\n    return x * 3\n"})

    ids = client.submit_batch(
        [
            RunRequest(name, 1),
            RunRequest(name, 2, version=1),
            {"workflow": name, "input": 3},
            RunRequest(inline, 4),
        ]
    )

    assert len(set(ids)) == 4
    assert [client.result(run_id, timeout=WAIT_S) for run_id in ids] == [2, 4, 6, 12]
    assert {run.id for run in client.iter_runs(workflow=name)} == set(ids[:3])


def test_batch_is_all_or_nothing(client: Client) -> None:
    name = unique_name()
    client.put_workflow(workflow({"id": "double", "dataflow": ". * 2"}, name=name))
    missing = unique_name("missing")

    with pytest.raises(NotFound) as not_found:
        client.submit_batch([RunRequest(name, 1), RunRequest(missing, 2)])
    assert not_found.value.message.startswith("runs[1]: ")
    assert missing in not_found.value.message

    broken = workflow({"id": "bad", "dataflow": "map("})
    with pytest.raises(InvalidRequest) as invalid:
        client.submit_batch([RunRequest(name, 1), RunRequest(broken, 2)])
    assert invalid.value.status == 422
    assert invalid.value.message.startswith("runs[1]: ")

    assert client.list_runs(workflow=name).runs == []


def test_status_shows_the_run_and_its_steps(client: Client) -> None:
    submitted = client.submit(
        workflow(
            {"id": "pick", "dataflow": ".a"},
            {"id": "show", "python_code": "def main(x):\n    return str(x)\n", "after": ["pick"]},
        ),
        {"a": 5},
    )

    run = client.status(submitted.id)
    assert (run.id, run.kind, run.input) == (submitted.id, "run", {"a": 5})
    assert run.status in ("pending", "running", "succeeded")
    assert list(run.steps) == ["pick", "show"]
    assert isinstance(run.created_at, datetime) and run.created_at.tzinfo is not None
    assert run.raw["id"] == submitted.id

    done = client.wait(submitted.id, timeout=WAIT_S)
    assert done.output == "5"
    assert done.finished_at is not None and done.finished_at >= done.created_at
    for step in done.steps.values():
        assert (step.status, step.attempts) == ("succeeded", 1)
        assert isinstance(step.task_id, str)
        assert step.started_at is not None and step.finished_at is not None
        assert step.started_at <= step.finished_at
    assert client.status(submitted.id).status == "succeeded"


def test_idempotency_key_returns_the_existing_run(client: Client) -> None:
    definition = workflow({"id": "echo", "dataflow": "."})
    key = f"pytest-{uuid.uuid4().hex}"

    first = client.submit(definition, 1, idempotency_key=key)
    second = client.submit(definition, 1, idempotency_key=key)

    assert first.created and not second.created
    assert second.id == first.id
    assert client.result(first.id, timeout=WAIT_S) == 1


def test_list_runs_pages_newest_first(client: Client) -> None:
    name = unique_name()
    client.put_workflow(workflow({"id": "echo", "dataflow": "."}, name=name))
    ids = [client.submit(name, n).id for n in range(3)]

    first = client.list_runs(workflow=name, limit=2)
    assert [run.id for run in first.runs] == [ids[2], ids[1]]
    assert first.next_cursor is not None
    second = client.list_runs(workflow=name, limit=2, cursor=first.next_cursor)
    assert [run.id for run in second.runs] == [ids[0]]
    assert second.next_cursor is None
    assert [run.id for run in client.iter_runs(workflow=name, page_size=2)] == ids[::-1]

    for run_id in ids:
        client.wait(run_id, timeout=WAIT_S)
    succeeded = client.list_runs(workflow=name, status="succeeded").runs
    assert sorted(run.id for run in succeeded) == sorted(ids)
    assert all(run.workflow == name and run.version == 1 for run in succeeded)
    assert client.list_runs(workflow=name, status="failed").runs == []


def test_cancel_stops_a_run_with_a_slow_step(client: Client, slow_run: str) -> None:
    wait_for_step(client, slow_run, "slow", "running")

    client.cancel(slow_run)

    run = client.wait(slow_run, timeout=WAIT_S)
    assert run.status == "cancelled"
    assert run.error is not None and run.error.type == "cancelled"
    assert run.steps["slow"].status == "cancelled"
    with pytest.raises(RunCancelled) as cancelled:
        client.result(slow_run)
    assert str(cancelled.value) == f"run {slow_run} was cancelled"
    with pytest.raises(Conflict) as conflict:
        client.cancel(slow_run)
    assert conflict.value.status == 409
    assert conflict.value.code == "conflict"
    assert slow_run in conflict.value.message and "already finished" in conflict.value.message


def test_a_failed_run_and_a_failed_job_run_again(client: Client) -> None:
    failing = workflow({"id": "boom", "dataflow": "error(\"no\")"})
    submitted = client.submit(failing, None)
    assert client.wait(submitted.id, timeout=WAIT_S).status == "failed"
    assert client.retry(submitted.id) == "running"
    assert client.wait(submitted.id, timeout=WAIT_S).status == "failed"

    job = client.submit_job({"dataflow": "error(\"no\")"}, None)
    assert client.wait_job(job.id, timeout=WAIT_S).status == "failed"
    assert client.retry_job(job.id) == "running"

    done = client.submit(workflow({"id": "echo", "dataflow": "."}), "done")
    assert client.result(done.id, timeout=WAIT_S) == "done"
    with pytest.raises(Conflict) as conflict:
        client.retry(done.id)
    assert "succeeded" in conflict.value.message


def test_cancelling_a_finished_run_is_a_conflict(client: Client) -> None:
    submitted = client.submit(workflow({"id": "echo", "dataflow": "."}), "done")
    assert client.result(submitted.id, timeout=WAIT_S) == "done"

    with pytest.raises(Conflict) as conflict:
        client.cancel(submitted.id)
    assert "(succeeded)" in conflict.value.message


def test_unknown_ids_and_names_are_not_found(client: Client) -> None:
    run_id = str(uuid.uuid4())
    missing = unique_name("missing")

    with pytest.raises(NotFound) as unknown_run:
        client.status(run_id)
    assert unknown_run.value.status == 404
    assert unknown_run.value.code == "not_found"
    assert unknown_run.value.message == f"no run with id {run_id}"
    assert f"GET {API_URL.rstrip('/')}/v1/runs/{run_id}: 404 not_found" in str(unknown_run.value)

    with pytest.raises(NotFound):
        client.status("not-a-run-id")
    with pytest.raises(NotFound):
        client.wait(run_id, timeout=1)
    with pytest.raises(NotFound):
        client.cancel(run_id)
    with pytest.raises(NotFound):
        client.job_status(run_id)
    with pytest.raises(NotFound) as unknown_workflow:
        client.submit(missing, {})
    assert missing in unknown_workflow.value.message
    with pytest.raises(NotFound):
        client.workflow(missing)


def test_invalid_definition_is_rejected_naming_the_step(client: Client) -> None:
    definition = workflow(
        {"id": "fine", "dataflow": "."},
        {"id": "broken", "dataflow": "map(", "after": ["fine"]},
    )

    with pytest.raises(InvalidRequest) as caught:
        client.submit(definition, [])

    error = caught.value
    assert (error.status, error.code) == (422, "invalid_definition")
    assert '"broken"' in error.message
    assert isinstance(error.details, list)
    assert [problem.get("step") for problem in error.details] == ["broken"]
    assert "422 invalid_definition" in str(error)

    with pytest.raises(InvalidRequest) as unknown_after:
        client.put_workflow(workflow({"id": "late", "dataflow": ".", "after": ["nowhere"]}))
    assert '"late"' in unknown_after.value.message
    assert "nowhere" in unknown_after.value.message


def test_malformed_request_is_a_bad_request(client: Client) -> None:
    with pytest.raises(InvalidRequest) as caught:
        client.submit(workflow({"id": "a", "dataflow": ".", "colour": "blue"}))
    assert (caught.value.status, caught.value.code) == (400, "bad_request")
    assert "colour" in caught.value.message

    with pytest.raises(InvalidRequest) as bad_status:
        client.list_runs(status="sleeping")
    assert "sleeping" in bad_status.value.message


def test_step_that_raises_fails_the_run(client: Client) -> None:
    definition = workflow(
        {"id": "prepare", "dataflow": ".n"},
        {
            "id": "boom",
            "after": ["prepare"],
            "python_code": "def main(n):\n    raise ValueError(f'cannot use {n!r}')\n",
        },
    )
    submitted = client.submit(definition, {"n": 7})

    run = client.wait(submitted.id, timeout=WAIT_S)

    assert run.status == "failed"
    assert run.output is None
    assert run.error is not None
    assert (run.error.step, run.error.type) == ("boom", "ValueError")
    assert '"boom"' in run.error.message and "cannot use 7" in run.error.message
    assert run.error.traceback is not None and "ValueError" in run.error.traceback
    assert run.steps["prepare"].output == 7
    boom = run.steps["boom"]
    assert boom.status == "failed"
    assert boom.error is not None and boom.error.type == "ValueError"
    assert boom.error.step is None

    with pytest.raises(RunFailed) as caught:
        client.result(submitted.id, timeout=WAIT_S)
    failed = caught.value
    assert not isinstance(failed, RunCancelled)
    assert failed.run.id == submitted.id
    assert failed.error is not None and failed.error.type == "ValueError"
    assert str(failed).startswith(f"run {submitted.id} failed: ValueError: ")
    assert "cannot use 7" in str(failed)


def test_wait_gives_up_after_its_timeout(client: Client, slow_run: str) -> None:
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as caught:
        client.wait(slow_run, timeout=1.5)
    elapsed = time.monotonic() - started

    assert 1.5 <= elapsed < 15, elapsed
    timed_out = caught.value
    assert timed_out.timeout == 1.5
    assert timed_out.run.id == slow_run
    assert timed_out.run.status in ("pending", "running")
    assert str(timed_out).startswith(f"run {slow_run} did not finish within 1.5 s")
    assert isinstance(timed_out, TimeoutError) and isinstance(timed_out, TaskfleetError)

    with pytest.raises(WaitTimeout):
        client.wait(slow_run, timeout=0)
    with pytest.raises(WaitTimeout):
        client.result(slow_run, timeout=0.2)


def test_job_runs_one_step(client: Client) -> None:
    submitted = client.submit_job({"python_code": "def main(x):\n    return x * 2\n"}, 21)

    assert submitted.created
    assert client.job_result(submitted.id, timeout=WAIT_S) == 42
    job = client.job_status(submitted.id)
    assert (job.kind, job.status, list(job.steps)) == ("job", "succeeded", ["job"])
    with pytest.raises(NotFound):
        client.status(submitted.id)
    with pytest.raises(Conflict):
        client.cancel_job(submitted.id)


def test_delayed_job_waits_before_it_runs(client: Client) -> None:
    submitted = client.submit_job({"id": "later", "dataflow": ". + 1"}, 1, delay_s=1.0)

    job = client.wait_job(submitted.id, timeout=WAIT_S)

    assert (job.status, job.output) == ("succeeded", 2)
    started_at = job.steps["later"].started_at
    assert started_at is not None
    assert (started_at - job.created_at).total_seconds() >= 0.9


def test_cancelled_job_raises_run_cancelled(client: Client) -> None:
    submitted = client.submit_job({"id": "idle", "dataflow": "."}, None, delay_s=300)

    client.cancel_job(submitted.id)

    with pytest.raises(RunCancelled) as caught:
        client.job_result(submitted.id, timeout=WAIT_S)
    assert str(caught.value) == f"job {submitted.id} was cancelled"


def jobs_down_to(listed: Iterable[JobSummary], job_id: str) -> List[JobSummary]:
    """Returns the listed jobs (newest first) down to the one with this id, failing the test if
    it is not listed. Jobs have no workflow to filter on: the fleet may hold others."""
    seen: List[JobSummary] = []
    for job in listed:
        seen.append(job)
        if job.id == job_id:
            return seen
    pytest.fail(f"job {job_id} is not listed; the listing held {[job.id for job in seen]}")


def test_list_jobs_pages_newest_first(client: Client) -> None:
    # No worker reads this queue: a job sent to it stays unfinished until it is cancelled.
    unread_queue = unique_name("unread")
    done = client.submit_job({"id": "double", "dataflow": ". * 2"}, 21)
    assert client.job_result(done.id, timeout=WAIT_S) == 42
    parked = client.submit_job(
        {"id": "parked", "python_code": "def main(x):\n    return x\n", "queue": unread_queue}
    )
    try:
        parked_status = client.job_status(parked.id).status
        assert parked_status in ("pending", "running")

        # One job a page, following the cursor, down to the older of the two.
        listed: List[JobSummary] = []
        cursor = None
        while done.id not in [job.id for job in listed]:
            assert len(listed) < 100, "the jobs were not listed near the top"
            page = client.list_jobs(limit=1, cursor=cursor)
            assert len(page.jobs) == 1 and page.next_cursor is not None
            listed += page.jobs
            cursor = page.next_cursor
        ids = [job.id for job in listed]
        assert ids.index(parked.id) < ids.index(done.id)
        created = [job.created_at for job in listed]
        assert created == sorted(created, reverse=True)
        assert jobs_down_to(client.iter_jobs(page_size=1), done.id)[-1] == listed[-1]

        by_id = {job.id: job for job in listed}
        listed_parked, listed_done = by_id[parked.id], by_id[done.id]
        assert (
            listed_parked.step,
            listed_parked.executor,
            listed_parked.queue,
            listed_parked.status,
            listed_parked.finished_at,
        ) == ("parked", "python_code", unread_queue, parked_status, None)
        assert listed_parked.created_at == client.job_status(parked.id).created_at
        assert (listed_done.step, listed_done.executor, listed_done.queue) == (
            "double",
            "dataflow",
            "default",
        )
        shown = client.job_status(done.id)
        assert (listed_done.status, listed_done.created_at, listed_done.finished_at) == (
            "succeeded",
            shown.created_at,
            shown.finished_at,
        )
        assert listed_done.raw["id"] == done.id

        # The status filter: the newer, unfinished job is not among the succeeded ones above
        # the older; the succeeded job is not among the unfinished ones.
        succeeded = jobs_down_to(client.iter_jobs(status="succeeded", page_size=2), done.id)
        assert parked.id not in [job.id for job in succeeded]
        assert all(job.status == "succeeded" for job in succeeded)
        unfinished = list(client.iter_jobs(status=parked_status))
        assert parked.id in [job.id for job in unfinished]
        assert done.id not in [job.id for job in unfinished]
        assert all(job.status == parked_status for job in unfinished)

        client.cancel_job(parked.id)
        cancelled = jobs_down_to(client.iter_jobs(status="cancelled"), parked.id)[-1]
        assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    finally:
        with contextlib.suppress(Conflict):
            client.cancel_job(parked.id)
    with pytest.raises(InvalidRequest) as bad_status:
        client.list_jobs(status="sleeping")
    assert "sleeping" in bad_status.value.message
    with pytest.raises(InvalidRequest):
        client.list_jobs(limit=0)


def test_fleet_endpoints_show_the_worker(client: Client) -> None:
    workers = client.workers()
    assert workers, "the fleet has a worker"
    assert all("default" in worker.queues for worker in workers)
    assert all(worker.concurrency and worker.concurrency > 0 for worker in workers)
    default_queues = [queue for queue in client.queues() if queue.name == "default"]
    assert len(default_queues) == 1 and default_queues[0].consumers >= 1
    stats: Dict[str, Any] = client.stats()
    assert isinstance(stats["runs"], dict) and isinstance(stats["tasks"], dict)


def test_a_queue_rate_limit_is_set_read_and_refused_out_of_range(client: Client) -> None:
    queue = unique_name("queue")
    assert client.queue_settings(queue)["rate_limit_per_s"] is None
    settings = client.set_queue_settings(queue, rate_limit_per_s=2.5)
    assert (settings["queue"], settings["rate_limit_per_s"]) == (queue, 2.5)
    assert client.queue_settings(queue)["rate_limit_per_s"] == 2.5
    with pytest.raises(InvalidRequest) as caught:
        client.set_queue_settings(queue, rate_limit_per_s=0)
    assert caught.value.status == 422 and "rate_limit_per_s" in caught.value.message
    assert client.set_queue_settings(queue)["rate_limit_per_s"] is None


def test_dead_letters_are_listed_and_purged(client: Client) -> None:
    # Nothing this fleet was sent names no task, so it has no dead letters; the integration
    # tests of the scheduler put some there.
    listed = client.dead_letters(limit=10)
    assert listed.total == len(listed.messages) == 0
    assert client.purge_dead_letters() == 0
    with pytest.raises(InvalidRequest):
        client.dead_letters(limit=0)


def test_unreachable_scheduler_raises_a_connection_error() -> None:
    unreachable = Client("http://127.0.0.1:1", timeout=5)

    errors: List[SchedulerUnreachable] = []
    for call in (
        lambda: unreachable.status(str(uuid.uuid4())),
        lambda: unreachable.submit(workflow({"id": "a", "dataflow": "."})),
    ):
        with pytest.raises(SchedulerUnreachable) as caught:
            call()
        errors.append(caught.value)

    for error in errors:
        assert error.url.startswith("http://127.0.0.1:1/v1/runs")
        assert error.reason == "connection refused"
        assert f"{error.method} {error.url}: cannot reach the scheduler" in str(error)
        assert isinstance(error, ConnectionError) and isinstance(error, TaskfleetError)


def test_a_wrong_key_is_refused_and_the_fleets_key_works() -> None:
    assert os.environ.get("TASKFLEET_API_KEY"), "the fleet's tests run with a key"
    with pytest.raises(Unauthorized):
        Client(API_URL, api_key="tfk_not-a-key").list_runs()
    Client(API_URL).list_runs(limit=1)


def test_schedules_are_set_listed_fire_and_are_deleted(client: Client) -> None:
    name = unique_name("schedule")
    definition = workflow({"id": "a", "dataflow": ". + 1"})
    made = client.set_schedule(
        name, cron="* * * * * *", definition=definition, input=1, overlap="skip"
    )
    assert made.name == name and made.timezone == "UTC" and made.overlap == "skip"
    assert len(made.next_fire_times) == 5
    assert name in [schedule.name for schedule in client.schedules()]
    deadline = time.monotonic() + WAIT_S
    while client.schedule(name).last_run_id is None:
        assert time.monotonic() < deadline, "the schedule never fired"
        time.sleep(0.1)
    paused = client.set_schedule(name, cron="* * * * * *", definition=definition, paused=True)
    assert paused.paused and paused.next_fire_times == []
    run = client.wait(str(client.schedule(name).last_run_id), timeout=WAIT_S)
    assert run.output == 2 and run.raw["schedule"] == name
    with pytest.raises(InvalidRequest) as refused:
        client.set_schedule(name, cron="* * * *", definition=definition)
    assert "cron" in str(refused.value)
    client.delete_schedule(name)
    with pytest.raises(NotFound):
        client.schedule(name)
