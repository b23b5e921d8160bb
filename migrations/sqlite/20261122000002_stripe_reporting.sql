-- Stripe links and usage reporting (SQLite). Same tables and columns as Postgres; times are
-- INTEGER microseconds since the Unix epoch.

-- Tollgate customer ↔ Stripe customer. Set by subscription webhooks (the subscription's
-- `customer` and its metadata), checkout, the reconciler or an operator.
CREATE TABLE stripe_customers (
    customer           TEXT PRIMARY KEY NOT NULL,    -- the tollgate customer (JWT claim)
    stripe_customer_id TEXT NOT NULL UNIQUE,         -- cus_…
    source             TEXT NOT NULL,                -- what linked them (webhook, admin, sync, …)
    linked_at          INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER))
);

-- One Billing meter event per row: the usage of one customer and meter in one time window, made
-- from the ledger rows whose `report_id` names it. Written before the call to Stripe, so a retry
-- sends the same identifier and value (Stripe dedups by identifier; nothing is counted twice).
CREATE TABLE stripe_meter_reports (
    identifier         TEXT PRIMARY KEY NOT NULL,    -- the meter event's `identifier`
    customer           TEXT NOT NULL,
    stripe_customer_id TEXT NOT NULL,
    meter              TEXT NOT NULL,
    event_name         TEXT NOT NULL,
    ts                 INTEGER NOT NULL,             -- the meter event's `timestamp`
    value              INTEGER NOT NULL,             -- sum of the rows' units
    row_count          INTEGER NOT NULL,
    state              TEXT NOT NULL,                -- pending | delivered | zero | too_old
    attempts           INTEGER NOT NULL DEFAULT 0,
    last_error         TEXT,
    created_at         INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)),
    finished_at        INTEGER
);
CREATE INDEX stripe_meter_reports_pending ON stripe_meter_reports (ts) WHERE state = 'pending';

-- The report a usage row was claimed into (NULL: not claimed yet).
ALTER TABLE usage_events ADD COLUMN report_id TEXT;
CREATE INDEX usage_events_report ON usage_events (report_id) WHERE reported_at IS NULL;
