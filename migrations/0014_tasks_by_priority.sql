-- The relay and the retry timer claim the highest priority first: both indexes of the rows they
-- may claim lead with the priority, so that each claim reads one short range per priority
-- (highest first) instead of every row due, whatever the backlog of lower priorities.
CREATE INDEX tasks_sendable_by_priority
    ON tasks (namespace, priority DESC, (coalesce(relayed_at, created_at)))
    WHERE status = 'queued' AND dispatched_at IS NULL AND due_at IS NULL AND items_total IS NULL;
DROP INDEX tasks_sendable_in_namespace;
CREATE INDEX tasks_due_by_priority ON tasks (namespace, priority DESC, due_at)
    WHERE due_at IS NOT NULL;
DROP INDEX tasks_due_in_namespace;
