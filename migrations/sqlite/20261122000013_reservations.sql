-- Units held for work in progress (POST /v1/check with reserve, issue 14): a voice call holds
-- its minutes at the start and commits what it used at the end. state: held, then committed,
-- released or expired (each once). The counter holds the reserved units while held; committing
-- writes the usage_events row (id = the reservation's) in the same transaction.
-- Times are INTEGER microseconds since the Unix epoch; periods are unix seconds.
CREATE TABLE reservations (
    id            BLOB PRIMARY KEY,
    customer      TEXT NOT NULL,
    meter         TEXT NOT NULL,
    period_start  INTEGER NOT NULL,
    period_end    INTEGER NOT NULL,
    units         INTEGER NOT NULL,
    state         TEXT NOT NULL,
    expires_at    INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    settled_units INTEGER,
    settled_at    INTEGER
);
CREATE INDEX reservations_held ON reservations (expires_at) WHERE state = 'held';
