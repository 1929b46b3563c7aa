-- A for_each step is one parent row (item -1) that holds the fan-in counters and, once joined,
-- the output array, plus one row per element (item 0..n-1), each a task of its own.
ALTER TABLE tasks ADD COLUMN item integer NOT NULL DEFAULT -1;
ALTER TABLE tasks ADD COLUMN items_total integer;
ALTER TABLE tasks ADD COLUMN items_done integer NOT NULL DEFAULT 0;
ALTER TABLE tasks DROP CONSTRAINT tasks_run_id_step_id_key;
ALTER TABLE tasks ADD CONSTRAINT tasks_run_step_item_key UNIQUE (run_id, step_id, item);
