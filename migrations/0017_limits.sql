-- Limits across the fleet (`rate_limit` and `concurrency` on a step; a queue's rate limit).
--
-- A task of a step with a rate limit names the group its starts count in (`rate_group`); its
-- reservations live in Redis, so nothing more is kept here.
--
-- A task of a step with a concurrency limit names its group and the limit. It waits
-- (`admitted_at` NULL, `due_at` 'infinity', so neither the timer nor the relay sends it) until
-- a scheduler admits it: under a transaction-scoped advisory lock on the group, while fewer
-- than the limits allow (no admitted task runs with more of its group at once than its own
-- `concurrency_limit`). Admitted tasks are due at once and the timer dispatches them; a task
-- stays admitted (holds its permit) until it finishes, through its retries, or, if cancelled,
-- until a grace after the cancel. `ready_at` is when a waiting task may be admitted: its
-- run's `delay_s`, if any.
ALTER TABLE tasks
    ADD COLUMN rate_group text,
    ADD COLUMN concurrency_group text,
    ADD COLUMN concurrency_limit integer,
    ADD COLUMN admitted_at timestamptz,
    ADD COLUMN ready_at timestamptz;

-- The waiting tasks of each group, in the order they are admitted.
CREATE INDEX tasks_waiting_by_group
    ON tasks (namespace, concurrency_group, priority DESC, id)
    WHERE status = 'queued' AND concurrency_group IS NOT NULL AND admitted_at IS NULL;
-- The admitted tasks of each group, which hold its permits, with their limits.
CREATE INDEX tasks_admitted_by_group
    ON tasks (namespace, concurrency_group) INCLUDE (concurrency_limit)
    WHERE status = 'queued' AND concurrency_group IS NOT NULL AND admitted_at IS NOT NULL;
-- The admitted tasks of each group that were cancelled, by when: one cancelled while its
-- attempt may still run on a worker keeps its permit for a grace after the cancel (the worker
-- stops the attempt, killing it if it must, within that grace), so only a short range of the
-- newest is read.
CREATE INDEX tasks_stopping_by_group
    ON tasks (namespace, concurrency_group, finished_at) INCLUDE (concurrency_limit)
    WHERE status = 'cancelled' AND concurrency_group IS NOT NULL AND admitted_at IS NOT NULL;

-- Permits of cancelled attempts whose rows a re-run deleted within that grace: they count
-- until `until` (the cancel plus the grace), as the rows would have.
CREATE TABLE lingering_permits (
    namespace         text        NOT NULL,
    concurrency_group text        NOT NULL,
    concurrency_limit integer     NOT NULL,
    until             timestamptz NOT NULL
);
CREATE INDEX lingering_permits_by_group ON lingering_permits (namespace, concurrency_group, until);

-- When a scheduler of the namespace last looked for groups to admit into without a wake (the
-- backstop): one look per period serves the whole fleet.
CREATE TABLE admission_backstop (
    namespace     text        PRIMARY KEY,
    last_round_at timestamptz NOT NULL
);

-- A queue's settings, set by an admin (`PUT /v1/queues/{name}`): its rate limit across the
-- fleet, for every task of every tenant sent to it.
CREATE TABLE queue_settings (
    namespace        text        NOT NULL,
    queue            text        NOT NULL,
    rate_limit_per_s float8,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, queue)
);
