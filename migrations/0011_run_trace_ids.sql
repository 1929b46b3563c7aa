-- The W3C trace each run belongs to: the trace id (32 lowercase hex digits) of the request's
-- `traceparent` header, or a new one the scheduler made. Its tasks' messages carry it to the
-- workers. Runs made before this migration have none.
ALTER TABLE runs ADD COLUMN trace_id text;
