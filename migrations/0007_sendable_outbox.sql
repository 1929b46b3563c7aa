-- The relay and the retry timer claim only rows they can send, in their own namespace.
--
-- Tasks carry their run's namespace. The relay's index holds exactly the rows it may send
-- (queued, never confirmed by the broker, not waiting for their time in `due_at`, not a
-- `for_each` step's own row, which waits for its items), by namespace and then by the time they
-- were last published (their commit, or the relay's last claim); the timer's index holds the
-- tasks waiting for their time, by namespace and due time. So however many delayed jobs, waiting
-- retries, fan-outs or rows of another namespace are older, they neither hide a task to send
-- nor cost a claim anything. These replace `tasks_outbox` and `tasks_due`.
--
-- The column stays nullable, filled by a trigger for inserts that do not name it: a scheduler of
-- the previous version, still running during a rolling upgrade, writes tasks without it.
ALTER TABLE tasks ADD COLUMN namespace text;
UPDATE tasks t SET namespace = r.namespace FROM runs r WHERE r.id = t.run_id;

CREATE FUNCTION tasks_namespace_from_run() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    SELECT r.namespace INTO NEW.namespace FROM runs r WHERE r.id = NEW.run_id;
    RETURN NEW;
END;
$$;
CREATE TRIGGER tasks_namespace_from_run BEFORE INSERT ON tasks
    FOR EACH ROW WHEN (NEW.namespace IS NULL) EXECUTE FUNCTION tasks_namespace_from_run();

CREATE INDEX tasks_sendable_in_namespace ON tasks (namespace, (coalesce(relayed_at, created_at)))
    WHERE status = 'queued' AND dispatched_at IS NULL AND due_at IS NULL AND items_total IS NULL;
DROP INDEX tasks_outbox;
CREATE INDEX tasks_due_in_namespace ON tasks (namespace, due_at) WHERE due_at IS NOT NULL;
DROP INDEX tasks_due;
