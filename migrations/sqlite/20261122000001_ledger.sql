-- tollgate ledger, SQLite (the embedded mode). Same tables and columns as the Postgres schema.
-- Every time is INTEGER microseconds since the Unix epoch (UTC): exact, compact and ordered as
-- numbers, so the (customer, meter, ts) index serves range queries directly.
-- The default for "now" is julianday-based (millisecond resolution) and works on every SQLite 3.

-- One row per customer: the Stripe-synced (or admin-set) entitlement, `entitle::Entitlement`.
CREATE TABLE customers (
    id           TEXT PRIMARY KEY NOT NULL,
    plan         TEXT,                              -- NULL: the default plan
    status       TEXT NOT NULL DEFAULT 'active',    -- Stripe's spelling (entitle::Status::as_str)
    status_since INTEGER,
    period_start INTEGER,
    period_end   INTEGER,
    suspended    INTEGER NOT NULL DEFAULT 0,        -- 0/1
    updated_at   INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER))
);

-- One row per forwarded request, as finally charged. `id` is the UUIDv7 as a 16-byte BLOB
-- (big-endian, so byte order is time order); replays of the usage spool are idempotent.
CREATE TABLE usage_events (
    id          BLOB PRIMARY KEY NOT NULL,
    ts          INTEGER NOT NULL,
    customer    TEXT NOT NULL,
    meter       TEXT NOT NULL,
    units       INTEGER NOT NULL,
    route       TEXT NOT NULL,                      -- the route's name, never the raw path
    status      INTEGER NOT NULL,                   -- HTTP status sent downstream
    latency_us  INTEGER NOT NULL,
    request_id  TEXT NOT NULL,
    reported_at INTEGER                             -- set once delivered to Stripe
);
-- Totals per customer and meter over a period (quota repair, admin, tests).
CREATE INDEX usage_events_customer_meter_ts ON usage_events (customer, meter, ts);
-- The Stripe reporter's work queue: only unreported rows are indexed, so it stays small.
CREATE INDEX usage_events_unreported ON usage_events (ts) WHERE reported_at IS NULL;

-- Every Stripe webhook event received: the id makes redelivery a no-op, the payload is the audit.
CREATE TABLE stripe_events (
    id           TEXT PRIMARY KEY NOT NULL,
    type         TEXT NOT NULL,
    created      INTEGER NOT NULL,                  -- Stripe's `created`
    received_at  INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)),
    processed_at INTEGER,                           -- NULL: stored but not applied yet
    payload      TEXT NOT NULL                      -- the body exactly as received
);
CREATE INDEX stripe_events_unprocessed ON stripe_events (received_at) WHERE processed_at IS NULL;

-- History of the live-changeable config (routes, meters, plans), newest = highest version.
-- AUTOINCREMENT: a version number is never reused, even after the newest row is deleted.
CREATE TABLE config_versions (
    version    INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)),
    author     TEXT NOT NULL,
    document   TEXT NOT NULL
);

-- Who changed what through the admin API (and sync jobs). `before`/`after` are JSON documents.
CREATE TABLE audit_log (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at     INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)),
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    before TEXT,
    after  TEXT
);
CREATE INDEX audit_log_target_at ON audit_log (target, at);
