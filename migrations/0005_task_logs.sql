-- What a step printed or logged during its latest attempt, capped by the worker.
ALTER TABLE tasks ADD COLUMN logs text;
