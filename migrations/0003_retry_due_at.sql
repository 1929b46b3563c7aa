-- A task waiting for its retry is queued with the time it is due; the timer loop dispatches it
-- then. Until then neither the dispatcher nor the relay publishes it.
ALTER TABLE tasks ADD COLUMN due_at timestamptz;
CREATE INDEX tasks_due ON tasks (due_at) WHERE due_at IS NOT NULL;
