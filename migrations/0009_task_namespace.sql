-- Tasks carry their run's namespace, so that the relay and the retry timer of one namespace read
-- only its own rows from their indexes: another namespace's backlog (its schedulers stopped, its
-- retries due) costs them nothing, where they used to read and pass over every such row on each
-- claim. The indexes lead with the namespace and keep the order each claim reads in.
ALTER TABLE tasks ADD COLUMN namespace text;
UPDATE tasks t SET namespace = r.namespace FROM runs r WHERE r.id = t.run_id;
ALTER TABLE tasks ALTER COLUMN namespace SET NOT NULL;

CREATE INDEX tasks_sendable_in_namespace ON tasks (namespace, (coalesce(relayed_at, created_at)))
    WHERE status = 'queued' AND dispatched_at IS NULL AND due_at IS NULL AND items_total IS NULL;
DROP INDEX tasks_sendable;
CREATE INDEX tasks_due_in_namespace ON tasks (namespace, due_at) WHERE due_at IS NOT NULL;
DROP INDEX tasks_due;
