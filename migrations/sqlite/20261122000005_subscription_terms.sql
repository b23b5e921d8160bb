-- The subscription's terms that do not change what a customer may call today but that operators
-- and customers ask about: it ends at the period's end (`cancel_at_period_end`), and when the
-- trial ends. Same columns as Postgres; times are INTEGER microseconds since the Unix epoch.
ALTER TABLE customers ADD COLUMN cancel_at_period_end INTEGER NOT NULL DEFAULT 0;  -- 0/1
ALTER TABLE customers ADD COLUMN trial_end INTEGER;
