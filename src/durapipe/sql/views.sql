-- durapipe audit views over the DBOS 3.x system tables (schema dbos, Postgres).
-- Install with `durapipe sql install` (or `psql -f` after sql/keys.sql, which they read);
-- every statement is idempotent.
-- Outputs, inputs and errors are portable JSON text (DBOSPortableJSONSerializer).

CREATE SCHEMA IF NOT EXISTS durapipe;

-- A recorded error ({"name","message",...}) as one line: "Name: message".
CREATE OR REPLACE FUNCTION durapipe.error_text(t text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE
    WHEN t IS NULL THEN NULL
    WHEN jsonb_typeof(durapipe.jsonb_or_null(t)) = 'object'
      THEN concat_ws(': ', durapipe.jsonb_or_null(t)->>'name', durapipe.jsonb_or_null(t)->>'message')
    ELSE t
  END
$$;

-- A timestamp held in JSON: epoch seconds, epoch milliseconds or an ISO 8601 string.
CREATE OR REPLACE FUNCTION durapipe.ts(v jsonb) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
  IF v IS NULL OR jsonb_typeof(v) = 'null' THEN RETURN NULL; END IF;
  IF jsonb_typeof(v) = 'number' THEN
    IF (v #>> '{}')::float8 > 1e11 THEN RETURN to_timestamp((v #>> '{}')::float8 / 1000.0); END IF;
    RETURN to_timestamp((v #>> '{}')::float8);
  END IF;
  RETURN (v #>> '{}')::timestamptz;
EXCEPTION WHEN others THEN
  RETURN NULL;
END $$;

-- Every workflow of the durapipe interpreter: runs and their child workflows. Its keys
-- (run id, pipeline, node path, app, created) come from durapipe.run_keys (sql/keys.sql),
-- indexed, so a filter on them reads only the rows it selects; inputs are parsed only
-- for the rows a query returns.
CREATE OR REPLACE VIEW durapipe.workflows AS
SELECT k.workflow_id,
       k.run_id,
       k.parent_workflow_id,
       k.pipeline,
       k.pipeline_version,
       k.node_path,
       s.status,
       k.app,
       s.application_version                                  AS app_version,
       s.executor_id,
       s.queue_name,
       k.created,
       to_timestamp(s.completed_at / 1000.0)                  AS completed,
       s.completed_at - s.created_at                          AS duration_ms,
       (SELECT durapipe.jsonb_or_null(wi.inputs)->'positionalArgs'->2
        FROM dbos.workflow_input wi WHERE wi.workflow_uuid = k.workflow_id) AS inputs,
       durapipe.jsonb_or_null(w.output)                       AS output,
       durapipe.error_text(w.error)                           AS error,
       s.forked_from,
       s.recovery_attempts,
       s.attributes->>'durapipe.tenant'                       AS tenant
FROM durapipe.run_keys k
JOIN dbos.workflow_status s ON s.workflow_uuid = k.workflow_id
LEFT JOIN dbos.workflow_output w ON w.workflow_uuid = k.workflow_id;

-- One row per run (top-level workflow).
CREATE OR REPLACE VIEW durapipe.runs AS
SELECT run_id, app, pipeline, status, created, completed, duration_ms, error,
       executor_id, queue_name, inputs, output, forked_from, recovery_attempts, app_version,
       tenant
FROM durapipe.workflows
WHERE parent_workflow_id IS NULL;

-- One row per recorded operation of a run or of one of its child workflows.
-- kind: 'step' (agent, model or function call: name "<path>:<label>"),
--       'child' (a child workflow started here), 'dbos-op' (DBOS.sleep, DBOS.recv, ...).
-- A step that is still running has no row yet.
CREATE OR REPLACE VIEW durapipe.steps AS
SELECT w.run_id,
       w.pipeline,
       o.workflow_uuid                                        AS workflow_id,
       o.function_id                                          AS step_id,
       CASE WHEN o.child_workflow_id IS NOT NULL THEN c.node_path
            WHEN o.function_name ~ '^[0-9][0-9.#]*:' THEN split_part(o.function_name, ':', 1)
       END                                                    AS node_path,
       CASE WHEN o.child_workflow_id IS NOT NULL AND c.workflow_id IS NOT NULL
                 AND left(o.child_workflow_id, length(c.run_id) + length(c.node_path) + 2)
                     = c.run_id || '/' || c.node_path || ':'
              THEN substr(o.child_workflow_id, length(c.run_id) + length(c.node_path) + 3)
            WHEN o.child_workflow_id IS NOT NULL THEN o.child_workflow_id
            WHEN o.function_name ~ '^[0-9][0-9.#]*:'
              THEN substr(o.function_name, strpos(o.function_name, ':') + 1)
            ELSE o.function_name
       END                                                    AS node_name,
       CASE WHEN o.child_workflow_id IS NOT NULL THEN 'child'
            WHEN o.function_name ~ '^[0-9][0-9.#]*:' THEN 'step'
            ELSE 'dbos-op'
       END                                                    AS kind,
       CASE WHEN o.child_workflow_id IS NOT NULL THEN COALESCE(c.status, 'UNKNOWN')
            WHEN o.error IS NULL THEN 'SUCCESS' ELSE 'ERROR'
       END                                                    AS status,
       to_timestamp(o.started_at_epoch_ms / 1000.0)           AS started,
       CASE WHEN o.child_workflow_id IS NOT NULL THEN c.duration_ms
            ELSE o.completed_at_epoch_ms - o.started_at_epoch_ms
       END                                                    AS duration_ms,
       CASE WHEN o.child_workflow_id IS NOT NULL THEN c.error
            ELSE durapipe.error_text(o.error)
       END                                                    AS error,
       durapipe.jsonb_or_null(o.output)                       AS output,
       o.child_workflow_id
-- A DBOS.getResult row names the child it waited for; only the start row stands for the child.
FROM (SELECT op.workflow_uuid, op.function_id, op.function_name, op.output, op.error,
             op.started_at_epoch_ms, op.completed_at_epoch_ms,
             CASE WHEN op.function_name <> 'DBOS.getResult' THEN op.child_workflow_id END
               AS child_workflow_id
      FROM dbos.operation_outputs op) o
JOIN durapipe.workflows w ON w.workflow_id = o.workflow_uuid
LEFT JOIN durapipe.workflows c ON c.workflow_id = o.child_workflow_id;

-- One row per model call: what an agent step recorded (text, model, tokens, latency).
CREATE OR REPLACE VIEW durapipe.llm_calls AS
SELECT s.run_id, s.pipeline, s.workflow_id, s.step_id, s.node_path,
       split_part(s.node_name, '#', 1)                        AS agent,
       s.node_name                                            AS step_name,
       s.output->>'model'                                     AS model,
       (s.output->>'input_tokens')::bigint                    AS input_tokens,
       (s.output->>'output_tokens')::bigint                   AS output_tokens,
       (s.output->>'latency_ms')::float8                      AS latency_ms,
       s.output->>'finish_reason'                             AS finish_reason,
       s.started, s.duration_ms,
       (s.output->>'cost')::numeric                           AS cost
FROM durapipe.steps s
WHERE s.kind = 'step' AND jsonb_typeof(s.output) = 'object'
  AND s.output ? 'model' AND s.output ? 'input_tokens';

-- One row per background task started by dispatch: a "durapipe.task" child workflow (its
-- attribute "durapipe.task" is the task name) and the operation of the dispatching workflow
-- that started it. status: running until the dispatching workflow records a DBOS.getResult
-- naming the child, then joined (failed when that row holds an error); timed_out,
-- auto_joined and cancelled (by name, then met by a join) are recorded as the event
-- "task:<child workflow id>" of the dispatching workflow. A task of dispatch(detach=True)
-- (attribute "durapipe.detached") is never joined: its status is detached, and
-- child_status says whether it still runs.
CREATE OR REPLACE VIEW durapipe.background_tasks AS
SELECT w.run_id, w.pipeline,
       o.workflow_uuid                                        AS workflow_id,
       COALESCE(t.attributes->>'durapipe.task',
                substr(c.workflow_id, length(c.run_id) + length(c.node_path) + 3)) AS task,
       c.node_path,
       c.workflow_id                                          AS child_workflow_id,
       CASE WHEN t.attributes->>'durapipe.detached' = 'true' THEN 'detached'
            WHEN f.v->>'status' IN ('timed_out', 'auto_joined', 'cancelled') THEN f.v->>'status'
            WHEN j.function_id IS NULL THEN 'running'
            WHEN j.error IS NOT NULL THEN 'failed'
            ELSE 'joined'
       END                                                    AS status,
       CASE WHEN f.v->>'status' IN ('timed_out', 'auto_joined', 'cancelled') THEN durapipe.ts(f.v->'at')
            WHEN j.function_id IS NOT NULL THEN to_timestamp(j.completed_at_epoch_ms / 1000.0)
            ELSE to_timestamp(o.completed_at_epoch_ms / 1000.0)
       END                                                    AS status_at,
       c.status                                               AS child_status,
       c.created                                              AS started,
       c.duration_ms,
       c.error
FROM dbos.operation_outputs o
JOIN durapipe.workflows w ON w.workflow_id = o.workflow_uuid
JOIN durapipe.workflows c ON c.workflow_id = o.child_workflow_id
JOIN dbos.workflow_status t ON t.workflow_uuid = o.child_workflow_id
LEFT JOIN LATERAL (
  SELECT g.function_id, g.error, g.completed_at_epoch_ms
  FROM dbos.operation_outputs g
  WHERE g.workflow_uuid = o.workflow_uuid AND g.child_workflow_id = o.child_workflow_id
    AND g.function_name = 'DBOS.getResult'
  ORDER BY g.function_id LIMIT 1
) j ON true
LEFT JOIN LATERAL (
  SELECT durapipe.jsonb_or_null(e.value) AS v
  FROM dbos.workflow_events e
  WHERE e.workflow_uuid = o.workflow_uuid AND e.key = 'task:' || o.child_workflow_id
) f ON true
WHERE o.function_name = 'durapipe.task' AND t.name = 'durapipe.task';

-- One row per human-approval gate (DBOS event "gate:<name>"): who decided what, and when.
CREATE OR REPLACE VIEW durapipe.approvals AS
SELECT w.run_id, w.pipeline,
       e.workflow_uuid                                        AS workflow_id,
       COALESCE(v.v->>'gate', substr(e.key, length('gate:') + 1)) AS gate,
       v.v->>'status'                                         AS status,
       v.v->>'message'                                        AS message,
       v.v->'approvers'                                       AS approvers,
       durapipe.ts(v.v->'requested_at')                       AS requested_at,
       v.v->>'by'                                             AS decided_by,
       v.v->>'comment'                                        AS comment,
       durapipe.ts(v.v->'decided_at')                         AS decided_at,
       w.status                                               AS run_status
FROM dbos.workflow_events e
JOIN durapipe.workflows w ON w.workflow_id = e.workflow_uuid
CROSS JOIN LATERAL (SELECT durapipe.jsonb_or_null(e.value) AS v) v
WHERE e.key LIKE 'gate:%';

-- One row per log record a step emitted (DBOS event "log:<step name>", written when the
-- step logged or failed); a failed step without records has one row with its traceback.
-- A retried step's records name their attempt; error and traceback are that attempt's, and
-- failed_attempts lists every failed attempt but the last (error, traceback).
CREATE OR REPLACE VIEW durapipe.step_logs AS
SELECT w.run_id, w.pipeline,
       e.workflow_uuid                                        AS workflow_id,
       split_part(substr(e.key, 5), ':', 1)                   AS node_path,
       substr(e.key, 5)                                       AS step_name,
       r.ord                                                  AS seq,
       durapipe.ts(r.rec->'at_ms')                            AS logged_at,
       r.rec->>'level'                                        AS level,
       r.rec->>'logger'                                       AS logger,
       r.rec->>'message'                                      AS message,
       CASE WHEN x.attempt = x.last THEN v.v->>'error' ELSE fa.f->>'error' END AS error,
       CASE WHEN x.attempt = x.last THEN v.v->'traceback' ELSE fa.f->'traceback' END AS traceback,
       x.attempt                                              AS attempt,
       CASE WHEN jsonb_typeof(v.v->'attempts') = 'array' THEN v.v->'attempts' ELSE '[]'::jsonb END
                                                              AS failed_attempts
FROM dbos.workflow_events e
JOIN durapipe.workflows w ON w.workflow_id = e.workflow_uuid
CROSS JOIN LATERAL (SELECT durapipe.jsonb_or_null(e.value) AS v) v
LEFT JOIN LATERAL jsonb_array_elements(
  CASE WHEN jsonb_typeof(v.v->'records') = 'array' THEN v.v->'records' ELSE '[]'::jsonb END
) WITH ORDINALITY AS r(rec, ord) ON true
CROSS JOIN LATERAL (
  SELECT CASE WHEN jsonb_typeof(v.v->'attempt') = 'number' THEN (v.v->>'attempt')::numeric::int ELSE 1 END AS last
) l
CROSS JOIN LATERAL (
  SELECT l.last,
         CASE WHEN jsonb_typeof(r.rec->'attempt') = 'number' THEN (r.rec->>'attempt')::numeric::int
              ELSE l.last END AS attempt
) x
LEFT JOIN LATERAL (
  SELECT a.f FROM jsonb_array_elements(
    CASE WHEN jsonb_typeof(v.v->'attempts') = 'array' THEN v.v->'attempts' ELSE '[]'::jsonb END) AS a(f)
  WHERE a.f->>'attempt' = x.attempt::text LIMIT 1
) fa ON true
WHERE e.key LIKE 'log:%';
