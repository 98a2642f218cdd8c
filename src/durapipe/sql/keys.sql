-- durapipe's own keys of every workflow it runs (Postgres, schema durapipe), where Postgres
-- can index them: run id, pipeline, shape, node path, app, parent and creation time. The
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
  created            timestamptz NOT NULL
);
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
