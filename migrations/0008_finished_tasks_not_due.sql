-- A run that ended (failed, or finished otherwise) cancelled its tasks still queued but left the
-- due time of those waiting for a retry or a delay, so they stayed in `tasks_due`, which the
-- timer reads every 100 ms. Every statement that finishes a task now clears it; this clears it
-- on the tasks finished before.
UPDATE tasks SET due_at = NULL WHERE due_at IS NOT NULL AND status <> 'queued';
