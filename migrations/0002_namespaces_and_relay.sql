-- Several fleets (namespaces) may share one database: runs and workflows belong to a namespace.
ALTER TABLE workflows ADD COLUMN namespace text NOT NULL DEFAULT 'taskfleet';
ALTER TABLE workflows DROP CONSTRAINT workflows_pkey;
ALTER TABLE workflows ADD PRIMARY KEY (namespace, name, version);

ALTER TABLE runs ADD COLUMN namespace text NOT NULL DEFAULT 'taskfleet';
DROP INDEX runs_by_kind_newest;
CREATE INDEX runs_by_kind_newest ON runs (namespace, kind, id DESC);
DROP INDEX runs_idempotency_key;
CREATE UNIQUE INDEX runs_idempotency_key ON runs (namespace, kind, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- When the relay last published a task that no broker has confirmed; the relay claims rows by
-- moving it forward, so a row is relayed once per period, by one scheduler.
ALTER TABLE tasks ADD COLUMN relayed_at timestamptz;
