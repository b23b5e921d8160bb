//! Stripe invoices (`invoices`), one row per invoice with the state of the newest event that
//! carried it: written order-safe (an older event never overwrites a newer one), read per
//! customer newest first in pages. An invoice that names no known customer is stored with
//! `customer` NULL and is read as the customer's once its Stripe customer is linked.
//!
//! Must not touch: customers' entitlements (invoice events that change a status go through the
//! Stripe upsert in `customers`).

use chrono::{DateTime, Utc};

use super::dialect::{Backend, ReadRow, Time};
use super::{LedgerError, SqlLedger};

/// One invoice as Stripe last described it. Amounts are integer minor units of `currency`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceRecord {
    /// Stripe's id (`in_…`).
    pub id: String,
    /// The tollgate customer; `None` while no link or metadata names one.
    pub customer: Option<String>,
    pub stripe_customer: Option<String>,
    pub subscription: Option<String>,
    pub number: Option<String>,
    /// `draft`, `open`, `paid`, `uncollectible`, `void`.
    pub status: String,
    /// Lowercase ISO 4217.
    pub currency: String,
    pub amount_due: i64,
    pub amount_paid: i64,
    pub amount_remaining: i64,
    pub total: i64,
    /// Payment attempts Stripe made (an open invoice with attempts failed to be paid).
    pub attempt_count: i64,
    pub period_start: Option<DateTime<Utc>>,
    pub period_end: Option<DateTime<Utc>>,
    pub hosted_invoice_url: Option<String>,
    /// The invoice's `created`.
    pub created: DateTime<Utc>,
    /// The `created` of the event that carried this state (the order of writes).
    pub updated_at: DateTime<Utc>,
}

const UPSERT: &str = "INSERT INTO invoices (id, customer, stripe_customer, subscription, number, \
       status, currency, amount_due, amount_paid, amount_remaining, total, period_start, \
       period_end, hosted_invoice_url, created, updated_at, attempt_count) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
     ON CONFLICT (id) DO UPDATE SET \
       customer = COALESCE(EXCLUDED.customer, invoices.customer), \
       stripe_customer = COALESCE(EXCLUDED.stripe_customer, invoices.stripe_customer), \
       subscription = COALESCE(EXCLUDED.subscription, invoices.subscription), \
       number = COALESCE(EXCLUDED.number, invoices.number), \
       status = EXCLUDED.status, currency = EXCLUDED.currency, \
       amount_due = EXCLUDED.amount_due, amount_paid = EXCLUDED.amount_paid, \
       amount_remaining = EXCLUDED.amount_remaining, total = EXCLUDED.total, \
       period_start = EXCLUDED.period_start, period_end = EXCLUDED.period_end, \
       hosted_invoice_url = COALESCE(EXCLUDED.hosted_invoice_url, invoices.hosted_invoice_url), \
       created = EXCLUDED.created, updated_at = EXCLUDED.updated_at, \
       attempt_count = EXCLUDED.attempt_count \
     WHERE invoices.updated_at <= EXCLUDED.updated_at";

/// A customer's invoices (their own, and unlinked ones of their linked Stripe customer), newest
/// first, after the cursor invoice `$2` (none: from the newest).
const OF_CUSTOMER: &str = "SELECT i.id, i.customer, i.stripe_customer, i.subscription, i.number, \
       i.status, i.currency, i.amount_due, i.amount_paid, i.amount_remaining, i.total, \
       i.period_start, i.period_end, i.hosted_invoice_url, i.created, i.updated_at, \
       i.attempt_count \
     FROM invoices i \
     WHERE (i.customer = $1 OR (i.customer IS NULL AND i.stripe_customer IN \
         (SELECT stripe_customer_id FROM stripe_customers WHERE customer = $1))) \
       AND ($2 IS NULL \
         OR i.created < (SELECT c.created FROM invoices c WHERE c.id = $2) \
         OR (i.created = (SELECT c.created FROM invoices c WHERE c.id = $2) AND i.id < $2)) \
     ORDER BY i.created DESC, i.id DESC LIMIT $3";

/// Invoices created in [$1, $2), summed per currency, status and whether a payment failed.
const TOTALS: &str = "SELECT currency, status, \
       CAST(CASE WHEN attempt_count > 0 THEN 1 ELSE 0 END AS BIGINT) AS failed, \
       COUNT(*) AS invoices, CAST(SUM(amount_due) AS BIGINT) AS amount_due, \
       CAST(SUM(amount_paid) AS BIGINT) AS amount_paid, \
       CAST(SUM(amount_remaining) AS BIGINT) AS amount_remaining \
     FROM invoices WHERE created >= $1 AND created < $2 \
     GROUP BY currency, status, CASE WHEN attempt_count > 0 THEN 1 ELSE 0 END \
     ORDER BY currency, status, failed";

/// One group of [`InvoiceLedger::invoice_totals`]. Amounts in minor units of `currency`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceTotal {
    pub currency: String,
    pub status: String,
    /// A payment was attempted (and, for an open invoice, failed).
    pub attempted: bool,
    pub invoices: i64,
    pub amount_due: i64,
    pub amount_paid: i64,
    pub amount_remaining: i64,
}

/// Stripe invoices.
#[async_trait::async_trait]
pub trait InvoiceLedger: Send + Sync {
    /// Invoices created in `[from, to)`, summed per currency, status and attempted.
    async fn invoice_totals(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<InvoiceTotal>, LedgerError>;
    /// Stores `inv` unless a newer event's state is stored (`updated_at`); a known customer or
    /// number is never replaced by an unknown one. Says whether it was written.
    async fn record_invoice(&self, inv: &InvoiceRecord) -> Result<bool, LedgerError>;
    /// Up to `limit` of `customer`'s invoices, newest first, after the invoice `after`.
    async fn invoices(
        &self,
        customer: &str,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<InvoiceRecord>, LedgerError>;
}

fn from_row<R: ReadRow>(r: &R) -> Result<InvoiceRecord, sqlx::Error> {
    Ok(InvoiceRecord {
        id: r.col("id")?,
        customer: r.col("customer")?,
        stripe_customer: r.col("stripe_customer")?,
        subscription: r.col("subscription")?,
        number: r.col("number")?,
        status: r.col("status")?,
        currency: r.col("currency")?,
        amount_due: r.col("amount_due")?,
        amount_paid: r.col("amount_paid")?,
        amount_remaining: r.col("amount_remaining")?,
        total: r.col("total")?,
        attempt_count: r.col("attempt_count")?,
        period_start: r.opt_time("period_start")?,
        period_end: r.opt_time("period_end")?,
        hosted_invoice_url: r.col("hosted_invoice_url")?,
        created: r.time("created")?,
        updated_at: r.time("updated_at")?,
    })
}

#[async_trait::async_trait]
impl<DB: Backend> InvoiceLedger for SqlLedger<DB> {
    async fn invoice_totals(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<InvoiceTotal>, LedgerError> {
        let op = "invoice_totals";
        let rows = DB::sql(TOTALS)
            .bind(Time(from))
            .bind(Time(to))
            .fetch_all(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        rows.iter()
            .map(|r| {
                Ok(InvoiceTotal {
                    currency: r.col("currency")?,
                    status: r.col("status")?,
                    attempted: r.col::<i64>("failed")? == 1,
                    invoices: r.col("invoices")?,
                    amount_due: r.col("amount_due")?,
                    amount_paid: r.col("amount_paid")?,
                    amount_remaining: r.col("amount_remaining")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(LedgerError::query(op))
    }

    async fn record_invoice(&self, inv: &InvoiceRecord) -> Result<bool, LedgerError> {
        let written = DB::sql(UPSERT)
            .bind(inv.id.as_str())
            .bind(inv.customer.as_deref())
            .bind(inv.stripe_customer.as_deref())
            .bind(inv.subscription.as_deref())
            .bind(inv.number.as_deref())
            .bind(inv.status.as_str())
            .bind(inv.currency.as_str())
            .bind(inv.amount_due)
            .bind(inv.amount_paid)
            .bind(inv.amount_remaining)
            .bind(inv.total)
            .bind(inv.period_start.map(Time))
            .bind(inv.period_end.map(Time))
            .bind(inv.hosted_invoice_url.as_deref())
            .bind(Time(inv.created))
            .bind(Time(inv.updated_at))
            .bind(inv.attempt_count)
            .execute(self.pool())
            .await
            .map_err(LedgerError::query("record_invoice"))?;
        Ok(written == 1)
    }

    async fn invoices(
        &self,
        customer: &str,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<InvoiceRecord>, LedgerError> {
        let op = "invoices";
        let rows = DB::sql(OF_CUSTOMER)
            .bind(customer)
            .bind(after)
            .bind(limit)
            .fetch_all(self.pool())
            .await
            .map_err(LedgerError::query(op))?;
        rows.iter()
            .map(from_row)
            .collect::<Result<_, sqlx::Error>>()
            .map_err(LedgerError::query(op))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::Duration;

    use super::*;
    use crate::ledger::test_support::{contract, t0};
    use crate::ledger::Ledger;

    fn invoice(id: &str, customer: Option<&str>, created: DateTime<Utc>) -> InvoiceRecord {
        InvoiceRecord {
            id: id.into(),
            customer: customer.map(String::from),
            stripe_customer: Some("cus_1".into()),
            subscription: Some("sub_1".into()),
            number: Some(format!("N-{id}")),
            status: "open".into(),
            currency: "usd".into(),
            amount_due: 4900,
            amount_paid: 0,
            amount_remaining: 4900,
            total: 4900,
            attempt_count: 0,
            period_start: Some(created),
            period_end: Some(created + Duration::days(30)),
            hosted_invoice_url: Some("https://invoice.stripe.com/i/x".into()),
            created,
            updated_at: created,
        }
    }

    async fn check_invoices(ledger: Arc<dyn Ledger>) {
        let t = t0();
        let open = invoice("in_1", Some("acme"), t);
        assert!(ledger.record_invoice(&open).await.expect("open"));
        let paid = InvoiceRecord {
            status: "paid".into(),
            amount_paid: 4900,
            amount_remaining: 0,
            updated_at: t + Duration::seconds(5),
            ..open.clone()
        };
        assert!(ledger.record_invoice(&paid).await.expect("paid"));
        // A late, older event (finalized after paid) changes nothing.
        let late = InvoiceRecord {
            customer: None,
            updated_at: t + Duration::seconds(2),
            ..open.clone()
        };
        assert!(!ledger.record_invoice(&late).await.expect("late"));
        let got = ledger.invoices("acme", None, 10).await.expect("read");
        assert_eq!(got, vec![paid.clone()]);

        // Unlinked invoices of the customer's Stripe customer count once it is linked.
        let unlinked = invoice("in_2", None, t + Duration::days(30));
        assert!(ledger.record_invoice(&unlinked).await.expect("unlinked"));
        assert_eq!(
            ledger.invoices("acme", None, 10).await.expect("read").len(),
            1
        );
        ledger
            .link_stripe_customer("acme", "cus_1", "admin")
            .await
            .expect("link");
        let both = ledger.invoices("acme", None, 10).await.expect("read");
        assert_eq!(
            both.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            ["in_2", "in_1"],
            "newest first"
        );
        // Pages: the cursor is the last id of the page before.
        let p1 = ledger.invoices("acme", None, 1).await.expect("p1");
        let p2 = ledger
            .invoices("acme", Some(&p1[0].id), 1)
            .await
            .expect("p2");
        let p3 = ledger
            .invoices("acme", Some(&p2[0].id), 1)
            .await
            .expect("p3");
        assert_eq!((p1[0].id.as_str(), p2[0].id.as_str()), ("in_2", "in_1"));
        assert!(p3.is_empty());
        assert!(ledger
            .invoices("other", None, 10)
            .await
            .expect("other")
            .is_empty());

        // Totals of the invoices created in a range, by currency, status and attempted.
        let failed = InvoiceRecord {
            currency: "eur".into(),
            attempt_count: 2,
            ..invoice("in_3", None, t + Duration::days(1))
        };
        assert!(ledger.record_invoice(&failed).await.expect("failed"));
        let totals = ledger
            .invoice_totals(t, t + Duration::days(2))
            .await
            .expect("totals");
        let total = |currency: &str, status: &str, attempted: bool| InvoiceTotal {
            currency: currency.into(),
            status: status.into(),
            attempted,
            invoices: 1,
            amount_due: 4900,
            amount_paid: if status == "paid" { 4900 } else { 0 },
            amount_remaining: if status == "paid" { 0 } else { 4900 },
        };
        assert_eq!(
            totals,
            vec![total("eur", "open", true), total("usd", "paid", false)],
            "in_2 is created after the range"
        );
    }

    contract!(
        "invoices are stored order-safe and read per customer, newest first, in pages.",
        check_invoices,
        pg_invoices,
        sqlite_invoices
    );
}
