-- The run event streams (engine/events.py): one table, and the function that appends a batch.
CREATE SCHEMA IF NOT EXISTS durapipe;
CREATE TABLE IF NOT EXISTS durapipe.events (
    run_id text NOT NULL,
    seq bigint NOT NULL,
    key text,
    type text NOT NULL,
    path text,
    name text,
    kind text,
    data jsonb NOT NULL DEFAULT '{}'::jsonb,
    at double precision NOT NULL,
    PRIMARY KEY (run_id, seq)
);
CREATE UNIQUE INDEX IF NOT EXISTS events_key ON durapipe.events (run_id, key)
    WHERE key IS NOT NULL;
-- One call appends a batch: {run id: [event, ...]}. Per run, under its lock: the next
-- offsets; an event whose key is there already is skipped, or becomes its on_repeat marker.
CREATE OR REPLACE FUNCTION durapipe.append_events(batch jsonb) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    run text; last bigint; e jsonb; k text; t text;
BEGIN
    FOR run IN SELECT jsonb_object_keys(batch) ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(hashtext('durapipe.events'), hashtext(run));
        SELECT coalesce(max(seq), -1) INTO last FROM durapipe.events WHERE run_id = run;
        FOR e IN SELECT value FROM jsonb_array_elements(batch -> run) LOOP
            k := e ->> 'key';
            t := e ->> 'type';
            IF k IS NOT NULL AND EXISTS (
                    SELECT 1 FROM durapipe.events WHERE run_id = run AND key = k) THEN
                CONTINUE WHEN e ->> 'on_repeat' IS NULL;
                k := NULL;
                t := e ->> 'on_repeat';
            END IF;
            last := last + 1;
            INSERT INTO durapipe.events (run_id, seq, key, type, path, name, kind, data, at)
            VALUES (run, last, k, t, e ->> 'path', e ->> 'name', e ->> 'kind',
                    coalesce(e -> 'data', '{}'::jsonb), (e ->> 'at')::double precision);
        END LOOP;
        PERFORM pg_notify('durapipe_events', run);
    END LOOP;
END
$fn$;
