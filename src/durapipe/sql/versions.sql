-- durapipe's deploy records (Postgres, schema durapipe). Every launched App creates them;
-- `durapipe sql install` too. Every statement is idempotent.
CREATE SCHEMA IF NOT EXISTS durapipe;

-- Every pipeline shape a process of an app registered: its manifest (node paths with kind,
-- name, reads, writes and subtree hash), first and last time a process launched with it.
-- A run records its shape as the second argument of its workflow (durapipe.workflows
-- .pipeline_version), so its manifest is the row of that shape.
CREATE TABLE IF NOT EXISTS durapipe.shapes (
  app        text        NOT NULL,
  pipeline   text        NOT NULL,
  shape      text        NOT NULL,
  manifest   jsonb       NOT NULL,
  first_seen timestamptz NOT NULL DEFAULT now(),
  last_seen  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (app, pipeline, shape)
);

-- Runs (and child workflows) that a process with another shape left PENDING because they
-- already passed a node that changed: they wait for a worker with their shape.
CREATE TABLE IF NOT EXISTS durapipe.waiting (
  workflow_id text        PRIMARY KEY,
  run_id      text        NOT NULL,
  app         text        NOT NULL,
  pipeline    text        NOT NULL,
  shape       text        NOT NULL,
  path        text        NOT NULL,
  node        text,
  reason      text        NOT NULL,
  seen_by     text        NOT NULL,
  executor_id text,
  owner_xid   text,
  since       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS waiting_app_shape ON durapipe.waiting (app, shape);

-- Every shape seen, when first and last launched, and how many of its runs wait for a
-- worker with it (`durapipe versions` adds the runs running, at a gate and sleeping).
CREATE OR REPLACE VIEW durapipe.versions AS
SELECT sh.app, sh.pipeline, sh.shape, sh.first_seen, sh.last_seen,
       (SELECT count(*) FROM durapipe.waiting w
        WHERE w.app = sh.app AND w.pipeline = sh.pipeline AND w.shape = sh.shape) AS waiting,
       sh.manifest
FROM durapipe.shapes sh;

-- Runs that continued on a shape other than the one they were started by. Their workflow
-- input then names the shape they run as (so a rollback judges them against it); the
-- shape they were started by stays here, for patched() to choose alike on every replay.
CREATE TABLE IF NOT EXISTS durapipe.adopted (
  run_id     text        PRIMARY KEY,
  started_by text        NOT NULL,
  running_as text        NOT NULL,
  since      timestamptz NOT NULL DEFAULT now()
);
