-- Limits across the fleet (`rate_limit` and `concurrency` on a step; a queue's rate limit).
--
-- A task of a step with a rate limit names the group its starts count in (`rate_group`); its
-- reservations live in Redis, so nothing more is kept here.
--
-- A task of a step with a concurrency limit names its group and the limit. It waits
-- (`admitted_at` NULL, `due_at` 'infinity', so neither the timer nor the relay sends it) until
-- a scheduler admits it: under a transaction-scoped advisory lock on the group, while fewer
-- than `concurrency_limit` queued tasks of the group are admitted. Admitted tasks are due at
-- once and the timer dispatches them; a task stays admitted (holds its permit) until it
-- finishes, through its retries. `ready_at` is when a waiting task may be admitted: its
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
-- The admitted tasks of each group, which hold its permits.
CREATE INDEX tasks_admitted_by_group
    ON tasks (namespace, concurrency_group)
    WHERE status = 'queued' AND concurrency_group IS NOT NULL AND admitted_at IS NOT NULL;

-- A queue's settings, set by an admin (`PUT /v1/queues/{name}`): its rate limit across the
-- fleet, for every task of every tenant sent to it.
CREATE TABLE queue_settings (
    namespace        text        NOT NULL,
    queue            text        NOT NULL,
    rate_limit_per_s float8,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, queue)
);
