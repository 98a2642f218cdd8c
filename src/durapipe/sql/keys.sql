-- durapipe's own keys of every workflow it runs (Postgres, schema durapipe), where Postgres
-- can index them: run id, pipeline, shape, node path, app, parent, creation time and, for
-- a top-level run, its status (kept by a trigger on dbos.workflow_status). The
-- audit views and `durapipe runs` filter and join on these columns instead of parsing the
-- JSON input of every recorded workflow. Every launched App creates them; `durapipe sql
-- install` too. Every statement is idempotent.
CREATE SCHEMA IF NOT EXISTS durapipe;

-- JSON text as jsonb; NULL for anything that is not JSON (e.g. rows pickled by other apps).
CREATE OR REPLACE FUNCTION durapipe.jsonb_or_null(t text) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
  IF t IS NULL THEN RETURN NULL; END IF;
  RETURN t::jsonb;
EXCEPTION WHEN others THEN
  RETURN NULL;
END $$;

CREATE TABLE IF NOT EXISTS durapipe.run_keys (
  workflow_id        text        PRIMARY KEY,
  run_id             text        NOT NULL,
  parent_workflow_id text,
  app                text,
  pipeline           text,
  pipeline_version   text,
  node_path          text        NOT NULL,
  name               text        NOT NULL,
  created            timestamptz NOT NULL,
  -- A top-level run's DBOS status (NULL for a child workflow: read dbos.workflow_status).
  status             text
);
-- A database keyed by an older durapipe has no status column yet (added once; ALTER takes
-- the table's strongest lock, so never when the column is there).
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'durapipe.run_keys'::regclass
                 AND attname = 'status' AND NOT attisdropped) THEN
    ALTER TABLE durapipe.run_keys ADD COLUMN status text;
  END IF;
END $$;
CREATE INDEX IF NOT EXISTS run_keys_run ON durapipe.run_keys (run_id);
-- Top-level runs, newest first: by time, by app, by pipeline (keyset paging of `runs`).
CREATE INDEX IF NOT EXISTS run_keys_created ON durapipe.run_keys (created, workflow_id)
  WHERE parent_workflow_id IS NULL;
CREATE INDEX IF NOT EXISTS run_keys_app ON durapipe.run_keys (app, created, workflow_id)
  WHERE parent_workflow_id IS NULL;
CREATE INDEX IF NOT EXISTS run_keys_pipeline
  ON durapipe.run_keys (app, pipeline, created, workflow_id) WHERE parent_workflow_id IS NULL;

-- When each recorded operation started, as the steps view shows it (`started`): time
-- filters on durapipe.steps ("slowest nodes this week") read only the window.
CREATE INDEX IF NOT EXISTS durapipe_operation_started
  ON dbos.operation_outputs ((to_timestamp(started_at_epoch_ms / 1000.0)));

-- The keys of one workflow, from DBOS's status row and its input
-- {"positionalArgs": [pipeline, version, state, path, root, ...]}; nothing for a workflow
-- that is not durapipe's. Written when DBOS writes the input (same transaction as the
-- status row, whichever way the workflow was started: start, enqueue, fork, client) and
-- again when durapipe rewrites the input's shape (engine/versions.py).
CREATE OR REPLACE FUNCTION durapipe.record_keys(wid text, inputs text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  s record;
  args json;
BEGIN
  SELECT st.name, st.parent_workflow_id, st.application_name, st.created_at INTO s
  FROM dbos.workflow_status st WHERE st.workflow_uuid = wid;
  IF NOT FOUND OR NOT (s.name IN ('durapipe.run', 'durapipe.task')
                       OR starts_with(s.name, 'durapipe.run:')) THEN
    RETURN;
  END IF;
  -- durapipe records portable JSON; anything else (a pickled input) has no keys to read.
  IF left(ltrim(inputs), 1) = '{' THEN
    args := inputs::json -> 'positionalArgs';
  END IF;
  INSERT INTO durapipe.run_keys AS k (workflow_id, run_id, parent_workflow_id, app, pipeline,
                                      pipeline_version, node_path, name, created)
  VALUES (wid, COALESCE(args ->> 4, wid), s.parent_workflow_id, s.application_name,
          COALESCE(args ->> 0, CASE WHEN starts_with(s.name, 'durapipe.run:')
                                    THEN substr(s.name, length('durapipe.run:') + 1) END),
          args ->> 1, COALESCE(args ->> 3, '0'), s.name,
          to_timestamp(COALESCE(s.created_at, 0) / 1000.0))
  ON CONFLICT (workflow_id) DO UPDATE SET
    run_id = EXCLUDED.run_id, parent_workflow_id = EXCLUDED.parent_workflow_id,
    app = EXCLUDED.app, pipeline = EXCLUDED.pipeline,
    pipeline_version = EXCLUDED.pipeline_version, node_path = EXCLUDED.node_path,
    name = EXCLUDED.name, created = EXCLUDED.created;
END $$;

-- A top-level run's status in its keys: copied when the keys are written (whichever
-- version of record_keys wrote them), then on every change of the status row. Child
-- workflows are left out (their status changes are not filtered on, and cost nothing).
CREATE OR REPLACE FUNCTION durapipe.on_run_keys_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.parent_workflow_id IS NULL THEN
    SELECT st.status INTO NEW.status FROM dbos.workflow_status st
    WHERE st.workflow_uuid = NEW.workflow_id;
  ELSE
    NEW.status := NULL;
  END IF;
  RETURN NEW;
END $$;

CREATE OR REPLACE FUNCTION durapipe.on_workflow_status() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  UPDATE durapipe.run_keys SET status = NEW.status
  WHERE workflow_id = NEW.workflow_uuid AND parent_workflow_id IS NULL;
  RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION durapipe.on_workflow_input() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM durapipe.record_keys(NEW.workflow_uuid, NEW.inputs);
  RETURN NULL;
END $$;

-- Deleted or truncated workflows take their keys with them.
CREATE OR REPLACE FUNCTION durapipe.on_workflow_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM durapipe.run_keys WHERE workflow_id = OLD.workflow_uuid;
  RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION durapipe.on_workflow_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  TRUNCATE durapipe.run_keys;
  RETURN NULL;
END $$;

-- The triggers, and the keys of the workflows recorded before them (a database that ran an
-- older durapipe): done once, in one transaction, so no workflow is missed in between.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'durapipe_run_keys'
                 AND tgrelid = 'dbos.workflow_input'::regclass) THEN
    CREATE TRIGGER durapipe_run_keys AFTER INSERT OR UPDATE OF inputs ON dbos.workflow_input
      FOR EACH ROW EXECUTE FUNCTION durapipe.on_workflow_input();
    CREATE TRIGGER durapipe_run_keys_delete AFTER DELETE ON dbos.workflow_status
      FOR EACH ROW EXECUTE FUNCTION durapipe.on_workflow_delete();
    CREATE TRIGGER durapipe_run_keys_truncate AFTER TRUNCATE ON dbos.workflow_status
      FOR EACH STATEMENT EXECUTE FUNCTION durapipe.on_workflow_truncate();
    PERFORM durapipe.record_keys(i.workflow_uuid, i.inputs)
    FROM dbos.workflow_input i
    JOIN dbos.workflow_status s ON s.workflow_uuid = i.workflow_uuid
    WHERE s.name IN ('durapipe.run', 'durapipe.task') OR starts_with(s.name, 'durapipe.run:');
  END IF;
END $$;

-- Run status in the keys (added after the keys themselves): the triggers, the status of the
-- runs keyed before them, and the indexes `runs --status` pages along, once.
DO $$
DECLARE
  missing boolean := false;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'durapipe_run_keys_fill'
                 AND tgrelid = 'durapipe.run_keys'::regclass) THEN
    CREATE TRIGGER durapipe_run_keys_fill BEFORE INSERT OR UPDATE OF parent_workflow_id
      ON durapipe.run_keys FOR EACH ROW EXECUTE FUNCTION durapipe.on_run_keys_insert();
    missing := true;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'durapipe_run_keys_status'
                 AND tgrelid = 'dbos.workflow_status'::regclass) THEN
    CREATE TRIGGER durapipe_run_keys_status AFTER UPDATE OF status ON dbos.workflow_status
      FOR EACH ROW
      WHEN (OLD.status IS DISTINCT FROM NEW.status AND NEW.parent_workflow_id IS NULL
            AND starts_with(NEW.name, 'durapipe.'))
      EXECUTE FUNCTION durapipe.on_workflow_status();
    missing := true;
  END IF;
  IF missing THEN
    UPDATE durapipe.run_keys k SET status = s.status
    FROM dbos.workflow_status s
    WHERE s.workflow_uuid = k.workflow_id AND k.parent_workflow_id IS NULL
      AND k.status IS DISTINCT FROM s.status;
    -- Top-level runs, newest first, by pipeline and/or status, without and with the app
    -- (`durapipe runs` lists every app's runs; the console one app's).
    CREATE INDEX IF NOT EXISTS run_keys_by_pipeline
      ON durapipe.run_keys (pipeline, created, workflow_id) WHERE parent_workflow_id IS NULL;
    CREATE INDEX IF NOT EXISTS run_keys_by_status
      ON durapipe.run_keys (status, created, workflow_id) WHERE parent_workflow_id IS NULL;
    CREATE INDEX IF NOT EXISTS run_keys_by_pipeline_status
      ON durapipe.run_keys (pipeline, status, created, workflow_id) WHERE parent_workflow_id IS NULL;
    CREATE INDEX IF NOT EXISTS run_keys_app_status
      ON durapipe.run_keys (app, status, created, workflow_id) WHERE parent_workflow_id IS NULL;
    CREATE INDEX IF NOT EXISTS run_keys_app_pipeline_status
      ON durapipe.run_keys (app, pipeline, status, created, workflow_id)
      WHERE parent_workflow_id IS NULL;
  END IF;
END $$;
