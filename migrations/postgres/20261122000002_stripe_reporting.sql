-- Stripe links and usage reporting (Postgres).

-- Tollgate customer ↔ Stripe customer. Set by subscription webhooks (the subscription's
-- `customer` and its metadata), checkout, the reconciler or an operator.
CREATE TABLE stripe_customers (
    customer           text PRIMARY KEY,             -- the tollgate customer (JWT claim)
    stripe_customer_id text NOT NULL UNIQUE,         -- cus_…
    source             text NOT NULL,                -- what linked them (webhook, admin, sync, …)
    linked_at          timestamptz NOT NULL DEFAULT now()
);

-- One Billing meter event per row: the usage of one customer and meter in one time window, made
-- from the ledger rows whose `report_id` names it. Written before the call to Stripe, so a retry
-- sends the same identifier and value (Stripe dedups by identifier; nothing is counted twice).
CREATE TABLE stripe_meter_reports (
    identifier         text PRIMARY KEY,             -- the meter event's `identifier`
    customer           text NOT NULL,
    stripe_customer_id text NOT NULL,
    meter              text NOT NULL,
    event_name         text NOT NULL,
    ts                 timestamptz NOT NULL,         -- the meter event's `timestamp`
    value              bigint NOT NULL,              -- sum of the rows' units
    row_count          bigint NOT NULL,
    state              text NOT NULL,                -- pending | delivered | zero | too_old
    attempts           integer NOT NULL DEFAULT 0,
    last_error         text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    finished_at        timestamptz
);
CREATE INDEX stripe_meter_reports_pending ON stripe_meter_reports (ts) WHERE state = 'pending';

-- The report a usage row was claimed into (NULL: not claimed yet).
ALTER TABLE usage_events ADD COLUMN report_id text;
CREATE INDEX usage_events_report ON usage_events (report_id) WHERE reported_at IS NULL;
