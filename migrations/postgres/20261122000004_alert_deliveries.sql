-- Threshold alerts (issue 4): one row per customer/meter/period/threshold. The unique key is what
-- makes an alert go out at most once, whichever instance sees the crossing first (the insert
-- that wins owns the delivery); the row is also the delivery log.
CREATE TABLE alert_deliveries (
    id           bigserial PRIMARY KEY,
    customer     text NOT NULL,
    meter        text NOT NULL,
    period_start timestamptz NOT NULL,
    threshold    integer NOT NULL,               -- percent of included
    plan         text NOT NULL,
    used         bigint NOT NULL,                -- the counter when it crossed
    included     bigint NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    attempts     integer NOT NULL DEFAULT 0,
    last_attempt_at timestamptz,
    last_status  integer,                        -- HTTP status of the last attempt, NULL: no answer
    last_error   text,
    delivered_at timestamptz,                    -- set by the first 2xx
    UNIQUE (customer, meter, period_start, threshold)
);
