-- When a run whose definition sets `timeout_s` must have finished: its start (acceptance, or a
-- re-run) plus that many seconds. Past it, a scheduler cancels the run with error type
-- `run_timeout`; the index holds exactly the running runs that have a deadline.
ALTER TABLE runs ADD COLUMN deadline_at timestamptz;
CREATE INDEX runs_past_deadline ON runs (namespace, deadline_at)
    WHERE status = 'running' AND deadline_at IS NOT NULL;
