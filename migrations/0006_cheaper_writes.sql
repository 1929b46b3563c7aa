-- Every task is written by the scheduler together with its run (in the same statement) or under
-- its run's lock, and runs are not deleted; the foreign key's check cost a lookup and a row lock
-- of the run for every task inserted.
ALTER TABLE tasks DROP CONSTRAINT tasks_run_id_fkey;
-- A run's row is written twice, inserted and then finished (status, output, finished_at, none of
-- them indexed). With room left on its page the second write is a heap-only update, which
-- touches no index.
ALTER TABLE runs SET (fillfactor = 50);
