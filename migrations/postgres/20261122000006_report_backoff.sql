-- Per-report backoff: a meter event Stripe refused or failed is not retried before this time
-- (doubling per attempt), so one report Stripe keeps refusing neither hammers the API nor
-- holds up the reports behind it. NULL: due now.
ALTER TABLE stripe_meter_reports ADD COLUMN next_attempt_at timestamptz;
