-- API keys and tenants.
--
-- A key's secret is shown once, when it is made; only its SHA-256 is kept, so the table holds
-- nothing that authenticates. A key belongs to a namespace and a tenant and carries scopes.
CREATE TABLE api_keys (
    id           uuid        PRIMARY KEY,
    namespace    text        NOT NULL,
    secret_hash  bytea       NOT NULL UNIQUE,
    tenant       text        NOT NULL,
    scopes       text[]      NOT NULL,
    description  text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_by   uuid,
    revoked_at   timestamptz,
    last_used_at timestamptz
);
CREATE INDEX api_keys_in_namespace ON api_keys (namespace, created_at);

-- Runs, jobs and workflows belong to the tenant of the key that made them; those made before
-- keys existed, or with authentication off, belong to the tenant `default`.
ALTER TABLE runs ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE workflows ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE workflows DROP CONSTRAINT workflows_pkey;
ALTER TABLE workflows ADD PRIMARY KEY (namespace, tenant, name, version);

DROP INDEX runs_by_kind_newest;
CREATE INDEX runs_by_kind_newest ON runs (namespace, tenant, kind, id DESC);
DROP INDEX runs_idempotency_key;
CREATE UNIQUE INDEX runs_idempotency_key ON runs (namespace, tenant, kind, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Per-tenant quotas; a tenant without a row, or with a null column, has no such limit.
CREATE TABLE tenant_quotas (
    namespace          text        NOT NULL,
    tenant             text        NOT NULL,
    submissions_per_s  integer     CHECK (submissions_per_s > 0),
    runs_in_flight     integer     CHECK (runs_in_flight > 0),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, tenant)
);
-- A tenant's unfinished runs and jobs, counted against its `runs_in_flight`.
CREATE INDEX runs_in_flight ON runs (namespace, tenant) WHERE status IN ('pending', 'running');

-- What was done, by which key: keys made and revoked, cancellations, quota changes.
CREATE TABLE audit_events (
    id         uuid        PRIMARY KEY,
    namespace  text        NOT NULL,
    key_id     uuid,
    tenant     text        NOT NULL,
    action     text        NOT NULL,
    target     text,
    detail     jsonb,
    at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_events_in_namespace ON audit_events (namespace, id DESC);
