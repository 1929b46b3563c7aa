-- The relay claims the rows it can send: queued, never confirmed by the broker, not waiting for
-- their time (`due_at`: a delayed job, a retry) and not the row of a `for_each` step (which waits
-- for its items). This index holds exactly those, by the time they were last published (their
-- commit, or the relay's last claim), so the relay's scan starts at its oldest candidate and never
-- reads the rows it would leave: however many delayed jobs, waiting retries or fan-outs are older,
-- they cannot hide a task left unpublished. It replaces `tasks_outbox`, which held them all.
CREATE INDEX tasks_sendable ON tasks ((coalesce(relayed_at, created_at)))
    WHERE status = 'queued' AND dispatched_at IS NULL AND due_at IS NULL AND items_total IS NULL;
DROP INDEX tasks_outbox;
