-- A pgbench transaction: 256 one-step jobs inserted (runs and their tasks, in one statement),
-- then each task recorded and its run finished (in one statement), as the scheduler does.
WITH r AS (INSERT INTO runs (namespace, id, kind, definition, input, status)
  SELECT 'bench', uuid7(), 'job', '{"steps":[{"id":"job","dataflow":"."}]}'::jsonb,
         '{"i":1}'::jsonb, 'running'
  FROM generate_series(1, 256) RETURNING id),
t AS (INSERT INTO tasks (namespace, id, run_id, step_id, status, queue, priority, input)
  SELECT 'bench', uuid7(), id, 'job', 'queued', 'default', 0, '{"i":1}'::jsonb FROM r
  RETURNING id, run_id)
SELECT array_agg(id)::text AS tids, array_agg(run_id)::text AS rids FROM t \gset
WITH locked AS MATERIALIZED (
  SELECT id FROM runs WHERE id = ANY(':rids'::uuid[]) ORDER BY id FOR UPDATE),
rec AS (UPDATE tasks SET status = 'succeeded', output = '{"i":1}', worker_id = 'w1',
               started_at = now(), finished_at = now()
  WHERE id = ANY(':tids'::uuid[]) AND attempt = 1 AND status = 'queued'
    AND run_id = ANY(ARRAY(SELECT id FROM locked))
  RETURNING run_id, output)
UPDATE runs SET status = 'succeeded', output = rec.output, finished_at = now()
FROM rec WHERE runs.id = rec.run_id;
