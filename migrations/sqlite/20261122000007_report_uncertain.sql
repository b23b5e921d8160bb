-- Stripe deduplicates a meter event's identifier for "at least 24 hours" only. A report whose
-- try may have landed without an answer (timeout, 5xx) records when that first happened; a
-- report still unconfirmed 23 h later is not resent (a resend could count twice) but set to
-- state 'uncertain' for an operator (POST /admin/stripe/reports/{identifier}/resolve).
ALTER TABLE stripe_meter_reports ADD COLUMN ambiguous_since INTEGER;
