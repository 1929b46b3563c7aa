-- The backlog of each queue, read by a scrape of the scheduler's /metrics: the tasks queued to
-- run now (waiting in the broker, held by a worker, or a moment from being published), by queue
-- and the time they were last dispatched. Retries and delays waiting for their time, and
-- `for_each` steps waiting for their items, are not in it.
CREATE INDEX tasks_queued_by_queue ON tasks (namespace, queue, (coalesce(dispatched_at, created_at)))
    WHERE status = 'queued' AND due_at IS NULL AND items_total IS NULL;
