-- Alerts survive a restart: the instance delivering an alert holds it until `lease_until`
-- (renewed at every attempt, released on a clean stop); an undelivered alert whose lease has
-- run out is taken over by any instance (at start and every minute) and its retries go on.
-- `period_end` completes the payload of a resumed alert.
ALTER TABLE alert_deliveries ADD COLUMN lease_until INTEGER;
ALTER TABLE alert_deliveries ADD COLUMN period_end INTEGER;
