-- The durable record of taskfleet. Only the scheduler reads and writes these tables.

-- Registered workflow definitions; every change of a definition is a new version.
CREATE TABLE workflows (
    name        text        NOT NULL,
    version     integer     NOT NULL,
    definition  jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);

-- Runs of workflows, and jobs (a run of a single step enqueued through POST /v1/tasks).
-- A run keeps the definition it started with.
CREATE TABLE runs (
    id               uuid        PRIMARY KEY,
    kind             text        NOT NULL CHECK (kind IN ('workflow', 'job')),
    workflow         text,
    workflow_version integer,
    definition       jsonb       NOT NULL,
    input            jsonb       NOT NULL,
    status           text        NOT NULL,
    output           jsonb,
    error            jsonb,
    idempotency_key  text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);
CREATE INDEX runs_by_kind_newest ON runs (kind, created_at DESC, id DESC);
CREATE UNIQUE INDEX runs_idempotency_key ON runs (kind, idempotency_key) WHERE idempotency_key IS NOT NULL;

-- One row per step of a run that has been planned. The rows in status 'queued' whose
-- dispatched_at is null are the outbox: committed, not yet confirmed by the broker.
CREATE TABLE tasks (
    id            uuid        PRIMARY KEY,
    run_id        uuid        NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step_id       text        NOT NULL,
    status        text        NOT NULL,
    attempt       integer     NOT NULL DEFAULT 1,
    queue         text        NOT NULL,
    priority      smallint    NOT NULL DEFAULT 0,
    input         jsonb,
    output        jsonb,
    error         jsonb,
    worker_id     text,
    dispatched_at timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    finished_at   timestamptz,
    UNIQUE (run_id, step_id)
);
CREATE INDEX tasks_outbox ON tasks (created_at) WHERE status = 'queued' AND dispatched_at IS NULL;
