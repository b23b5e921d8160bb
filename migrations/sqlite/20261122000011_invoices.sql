-- Stripe invoices as their webhooks deliver them (invoice.created/finalized/updated/paid/
-- payment_failed/voided/marked_uncollectible): one row per invoice, the newest event's state.
-- Amounts are Stripe's integer minor units of `currency`. `customer` is NULL while the invoice
-- names no known tollgate customer; it is found then through `stripe_customer`'s link.
-- `attempt_count` > 0 on an open invoice: a payment was tried and failed. Same
-- columns as Postgres; times are INTEGER microseconds since the Unix epoch.
CREATE TABLE invoices (
    id                 TEXT PRIMARY KEY NOT NULL,
    customer           TEXT,
    stripe_customer    TEXT,
    subscription       TEXT,
    number             TEXT,
    status             TEXT NOT NULL,
    currency           TEXT NOT NULL,
    amount_due         INTEGER NOT NULL,
    amount_paid        INTEGER NOT NULL,
    amount_remaining   INTEGER NOT NULL,
    total              INTEGER NOT NULL,
    period_start       INTEGER,
    period_end         INTEGER,
    attempt_count      INTEGER NOT NULL DEFAULT 0,
    hosted_invoice_url TEXT,
    created            INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL
);
CREATE INDEX invoices_customer ON invoices (customer, created, id);
CREATE INDEX invoices_unlinked ON invoices (stripe_customer) WHERE customer IS NULL;
