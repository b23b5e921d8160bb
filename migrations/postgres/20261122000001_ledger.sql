-- tollgate ledger, Postgres. Every time is timestamptz (microsecond precision).
-- Tables are created unqualified: the pool's search_path picks the schema.

-- One row per customer: the Stripe-synced (or admin-set) entitlement, `entitle::Entitlement`.
CREATE TABLE customers (
    id           text PRIMARY KEY,
    plan         text,                              -- NULL: the default plan
    status       text NOT NULL DEFAULT 'active',    -- Stripe's spelling (entitle::Status::as_str)
    status_since timestamptz,
    period_start timestamptz,
    period_end   timestamptz,
    suspended    boolean NOT NULL DEFAULT false,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- One row per forwarded request, as finally charged. `id` is the UUIDv7 made on the request path,
-- so replays of the usage spool are idempotent.
CREATE TABLE usage_events (
    id          uuid PRIMARY KEY,
    ts          timestamptz NOT NULL,
    customer    text NOT NULL,
    meter       text NOT NULL,
    units       bigint NOT NULL,
    route       text NOT NULL,                      -- the route's name, never the raw path
    status      integer NOT NULL,                   -- HTTP status sent downstream
    latency_us  bigint NOT NULL,
    request_id  text NOT NULL,
    reported_at timestamptz                         -- set once delivered to Stripe
);
-- Totals per customer and meter over a period (quota repair, admin, tests).
CREATE INDEX usage_events_customer_meter_ts ON usage_events (customer, meter, ts);
-- The Stripe reporter's work queue: only unreported rows are indexed, so it stays small.
CREATE INDEX usage_events_unreported ON usage_events (ts) WHERE reported_at IS NULL;

-- Every Stripe webhook event received: the id makes redelivery a no-op, the payload is the audit.
CREATE TABLE stripe_events (
    id           text PRIMARY KEY,
    type         text NOT NULL,
    created      timestamptz NOT NULL,              -- Stripe's `created`
    received_at  timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz,                       -- NULL: stored but not applied yet
    payload      text NOT NULL                      -- the body exactly as received
);
CREATE INDEX stripe_events_unprocessed ON stripe_events (received_at) WHERE processed_at IS NULL;

-- History of the live-changeable config (routes, meters, plans), newest = highest version.
CREATE TABLE config_versions (
    version    bigserial PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    author     text NOT NULL,
    document   text NOT NULL
);

-- Who changed what through the admin API (and sync jobs). `before`/`after` are JSON documents.
CREATE TABLE audit_log (
    id     bigserial PRIMARY KEY,
    at     timestamptz NOT NULL DEFAULT now(),
    actor  text NOT NULL,
    action text NOT NULL,
    target text NOT NULL,
    before text,
    after  text
);
CREATE INDEX audit_log_target_at ON audit_log (target, at);
