-- Named leases: which instance does a periodic job shared by all (the Stripe reconciler), so
-- that N instances do not each list every subscription and audit the same repairs. A lease is
-- taken when it is free or its holder's time ran out.
CREATE TABLE leases (
    name   text PRIMARY KEY NOT NULL,
    holder text NOT NULL,
    until  timestamptz NOT NULL
);
