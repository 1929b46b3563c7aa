-- How many times a run was run again (`POST /v1/runs/{id}/retry`) from its failed, cancelled
-- and unstarted steps. A retry of a run that is running again answers as it did, instead of
-- starting another.
ALTER TABLE runs ADD COLUMN reruns integer NOT NULL DEFAULT 0;
