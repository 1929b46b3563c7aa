-- Schedules: runs started on a cron expression, in a time zone. Each belongs to a tenant.
--
-- `next_fire_at` is the durable cursor: the next tick to fire (null when the expression has no
-- tick left). A scheduler claims a due schedule with FOR UPDATE SKIP LOCKED, inserts the run of
-- its tick and advances the cursor in the same transaction, so a tick is fired once whatever
-- the number of schedulers, and a scheduler that dies mid-tick leaves it due for another.
CREATE TABLE schedules (
    namespace        text        NOT NULL,
    tenant           text        NOT NULL,
    name             text        NOT NULL,
    -- The target: a registered workflow (at `workflow_version`, or its latest at each tick),
    -- or an inline definition.
    workflow         text,
    workflow_version integer,
    definition       jsonb,
    input            jsonb       NOT NULL,
    cron             text        NOT NULL,
    timezone         text        NOT NULL,
    overlap          text        NOT NULL CHECK (overlap IN ('allow', 'skip')),
    catch_up         text        NOT NULL CHECK (catch_up IN ('none', 'last')),
    paused           boolean     NOT NULL DEFAULT false,
    next_fire_at     timestamptz,
    -- What its ticks came to: the last run started, the last tick skipped (overlap), how many
    -- were skipped, and the last tick whose run could not be started, with why.
    last_run_id      uuid,
    last_fired_at    timestamptz,
    last_skipped_at  timestamptz,
    skipped_ticks    bigint      NOT NULL DEFAULT 0,
    last_error       text,
    last_error_at    timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, tenant, name),
    CHECK ((workflow IS NULL) <> (definition IS NULL))
);
-- The schedules a scheduler claims: due and not paused, earliest first.
CREATE INDEX schedules_due ON schedules (namespace, next_fire_at) WHERE NOT paused;

-- A run started by a schedule names it and the tick it was started for; one run per tick.
ALTER TABLE runs ADD COLUMN schedule text;
ALTER TABLE runs ADD COLUMN scheduled_for timestamptz;
CREATE UNIQUE INDEX runs_schedule_tick ON runs (namespace, tenant, schedule, scheduled_for)
    WHERE schedule IS NOT NULL;
