-- The run event streams (engine/eventlog.py writes them): one table, and the function that appends a batch.
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
-- One call appends a batch: {run id: [[type, path, name, kind, data, at, key, on_repeat], ...]}
-- (the writer drops or marks a key repeated inside one batch). Per run, under its lock: one
-- look-up of the batch's keys already there, then one INSERT numbering the rest from the
-- run's next offset; an event whose key is there is skipped, or becomes its on_repeat marker.
-- Earlier releases call durapipe.append_events (row by row), which they install themselves: a
-- new name keeps the old and new writers of a rolling deploy apart.
CREATE OR REPLACE FUNCTION durapipe.append_event_rows(batch jsonb) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    one text; events jsonb; last bigint; seen text[];
BEGIN
    FOR one, events IN SELECT b.key, b.value FROM jsonb_each(batch) AS b ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(hashtext('durapipe.events'), hashtext(one));
        SELECT coalesce(max(d.seq), -1) INTO last FROM durapipe.events AS d WHERE d.run_id = one;
        SELECT coalesce(array_agg(d.key), '{}') INTO seen FROM durapipe.events AS d
        WHERE d.run_id = one AND d.key = ANY (ARRAY(
            SELECT x.e ->> 6 FROM jsonb_array_elements(events) AS x(e) WHERE x.e ->> 6 IS NOT NULL));
        INSERT INTO durapipe.events (run_id, seq, key, type, path, name, kind, data, at)
        SELECT one, last + row_number() OVER (ORDER BY r.ord), r.key, r.type, r.e ->> 1,
               r.e ->> 2, r.e ->> 3, coalesce(nullif(r.e -> 4, 'null'::jsonb), '{}'::jsonb),
               (r.e ->> 5)::double precision
        FROM (SELECT x.e, x.ord,
                     CASE WHEN x.e ->> 6 = ANY (seen) THEN NULL ELSE x.e ->> 6 END AS key,
                     CASE WHEN x.e ->> 6 = ANY (seen) THEN x.e ->> 7 ELSE x.e ->> 0 END AS type
              FROM jsonb_array_elements(events) WITH ORDINALITY AS x(e, ord)) AS r
        WHERE r.type IS NOT NULL;
        PERFORM pg_notify('durapipe_events', one);
    END LOOP;
END
$fn$;
