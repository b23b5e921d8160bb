-- Usage events reported through POST /v1/events (CloudEvents), once each by (source, id): a
-- retry finds its row and is a duplicate. `usage_id` is the usage_events row it made, written in
-- the same transaction; `dimensions` are the event's other data.* members, as JSON. Same
-- columns as Postgres; times are INTEGER microseconds since the Unix epoch.
CREATE TABLE ingested_events (
    source      TEXT NOT NULL,
    id          TEXT NOT NULL,
    usage_id    BLOB NOT NULL,
    customer    TEXT NOT NULL,
    meter       TEXT NOT NULL,
    value       INTEGER NOT NULL,
    time        INTEGER NOT NULL,
    dimensions  TEXT,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (source, id)
);
