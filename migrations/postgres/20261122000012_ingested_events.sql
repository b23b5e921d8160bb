-- Usage events reported through POST /v1/events (CloudEvents), once each by (source, id): a
-- retry finds its row and is a duplicate. `usage_id` is the usage_events row it made, written in
-- the same transaction; `dimensions` are the event's other data.* members, as JSON.
CREATE TABLE ingested_events (
    source      text NOT NULL,
    id          text NOT NULL,
    usage_id    uuid NOT NULL,
    customer    text NOT NULL,
    meter       text NOT NULL,
    value       bigint NOT NULL,
    time        timestamptz NOT NULL,
    dimensions  text,
    received_at timestamptz NOT NULL,
    PRIMARY KEY (source, id)
);
