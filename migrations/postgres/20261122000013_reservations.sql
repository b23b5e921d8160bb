-- Units held for work in progress (POST /v1/check with reserve, issue 14): a voice call holds
-- its minutes at the start and commits what it used at the end. state: held, then committed,
-- released or expired (each once). The counter holds the reserved units while held; committing
-- writes the usage_events row (id = the reservation's) in the same transaction.
CREATE TABLE reservations (
    id            uuid PRIMARY KEY,
    customer      text NOT NULL,
    meter         text NOT NULL,
    period_start  bigint NOT NULL,
    period_end    bigint NOT NULL,
    units         bigint NOT NULL,
    state         text NOT NULL,
    expires_at    timestamptz NOT NULL,
    created_at    timestamptz NOT NULL,
    settled_units bigint,
    settled_at    timestamptz
);
CREATE INDEX reservations_held ON reservations (expires_at) WHERE state = 'held';
