-- Events that named no known customer (no metadata match, no stored Stripe link): kept listed for
-- the operator (`GET /admin/stripe/unmatched`) instead of only counted.
ALTER TABLE stripe_events ADD COLUMN unmatched boolean NOT NULL DEFAULT false;
CREATE INDEX stripe_events_unmatched ON stripe_events (received_at) WHERE unmatched;
