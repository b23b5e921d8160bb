-- Threshold alerts (issue 4): one row per customer/meter/period/threshold. The unique key is what
-- makes an alert go out at most once (the insert that wins owns the delivery); the row is also
-- the delivery log. Times are INTEGER microseconds since the Unix epoch, as everywhere here.
CREATE TABLE alert_deliveries (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    customer     TEXT NOT NULL,
    meter        TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    threshold    INTEGER NOT NULL,               -- percent of included
    plan         TEXT NOT NULL,
    used         INTEGER NOT NULL,               -- the counter when it crossed
    included     INTEGER NOT NULL,
    created_at   INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)),
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_attempt_at INTEGER,
    last_status  INTEGER,                        -- HTTP status of the last attempt, NULL: no answer
    last_error   TEXT,
    delivered_at INTEGER,                        -- set by the first 2xx
    UNIQUE (customer, meter, period_start, threshold)
);
