-- The subscription's terms that do not change what a customer may call today but that operators
-- and customers ask about: it ends at the period's end (`cancel_at_period_end`), and when the
-- trial ends. Written by Stripe webhooks and the reconciler, under the same order rule as the
-- rest of the row (`updated_at`).
ALTER TABLE customers ADD COLUMN cancel_at_period_end boolean NOT NULL DEFAULT false;
ALTER TABLE customers ADD COLUMN trial_end timestamptz;
