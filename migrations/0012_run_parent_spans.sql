-- The span a run's own span is a child of: the span (16 lowercase hex digits) of the request
-- that started it. With `trace_id`, it places the run in its trace when the run ends and its
-- span is exported. Runs made before this migration have none.
ALTER TABLE runs ADD COLUMN trace_span_id text;
