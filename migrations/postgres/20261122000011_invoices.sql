-- Stripe invoices as their webhooks deliver them (invoice.created/finalized/updated/paid/
-- payment_failed/voided/marked_uncollectible): one row per invoice, the newest event's state.
-- Amounts are Stripe's integer minor units of `currency`. `customer` is NULL while the invoice
-- names no known tollgate customer; it is found then through `stripe_customer`'s link.
-- `attempt_count` > 0 on an open invoice: a payment was tried and failed.
CREATE TABLE invoices (
    id                 text PRIMARY KEY,
    customer           text,
    stripe_customer    text,
    subscription       text,
    number             text,
    status             text NOT NULL,
    currency           text NOT NULL,
    amount_due         bigint NOT NULL,
    amount_paid        bigint NOT NULL,
    amount_remaining   bigint NOT NULL,
    total              bigint NOT NULL,
    period_start       timestamptz,
    period_end         timestamptz,
    attempt_count      bigint NOT NULL DEFAULT 0,
    hosted_invoice_url text,
    created            timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL
);
CREATE INDEX invoices_customer ON invoices (customer, created, id);
CREATE INDEX invoices_unlinked ON invoices (stripe_customer) WHERE customer IS NULL;
