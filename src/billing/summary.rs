//! The billing summary of one calendar month (`GET /admin/billing/summary?period=2026-11`):
//! customers per plan and status, MRR, overage, invoices, new and churned customers, renewals
//! and trials ending, customers near or over their limits.
//!
//! Two kinds of figures, named as such in the answer (`sources`): **Stripe's** (invoices: what
//! Stripe billed and collected, from its invoice webhooks, integer minor units of each
//! currency) and **tollgate's estimate** (everything else: MRR from the plans' configured
//! `price_micros` and the stored subscription statuses; overage from the ledger's usage of the
//! month priced by each customer's current plan; limits against the plan's `included`). Money of
//! tollgate's is integer micros per currency; sums are exact (i128, refused past i64).
//!
//! Owns: these definitions. Must not touch: HTTP (`admin::billing`), writes of any kind.

use crate::config::{Config, Quota};
use crate::entitle::{plan_of, Status};
use crate::ledger::{Ledger, LedgerError, UsageGroupBy, UsageQuery};
use chrono::{DateTime, Datelike, Duration, NaiveDate, Utc};
use serde::Serialize;
use std::collections::BTreeMap;

/// A calendar month, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Month {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl Month {
    /// `YYYY-MM`.
    pub fn parse(s: &str) -> Option<Month> {
        let (y, m) = s.split_once('-')?;
        if y.len() != 4 || m.len() != 2 {
            return None;
        }
        let (y, m): (i32, u32) = (y.parse().ok()?, m.parse().ok()?);
        let start = NaiveDate::from_ymd_opt(y, m, 1)?;
        let end = if m == 12 {
            NaiveDate::from_ymd_opt(y + 1, 1, 1)?
        } else {
            NaiveDate::from_ymd_opt(y, m + 1, 1)?
        };
        Some(Month {
            start: start.and_hms_opt(0, 0, 0)?.and_utc(),
            end: end.and_hms_opt(0, 0, 0)?.and_utc(),
        })
    }

    /// The month `t` is in.
    pub fn of(t: DateTime<Utc>) -> Month {
        Month::parse(&format!("{:04}-{:02}", t.year(), t.month()))
            .unwrap_or(Month { start: t, end: t })
    }

    fn label(&self) -> String {
        format!("{:04}-{:02}", self.start.year(), self.start.month())
    }
}

/// What the summary is asked for.
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    pub month: Month,
    pub now: DateTime<Utc>,
    /// Renewals and trials ending within this many days from `now`.
    pub days: u32,
    /// A customer at or above this share of a limit (and below it) is near it.
    pub near: f64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Summary {
    /// `YYYY-MM`, with its UTC bounds (`[start, end)`).
    pub period: String,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub generated_at: DateTime<Utc>,
    /// Which figures are Stripe's and which are tollgate's estimate.
    pub sources: Sources,
    /// Stored customers per plan (the stored plan, else the default plan) and status.
    pub customers: Vec<PlanStatus>,
    /// Tollgate's estimate: active and past_due customers on a plan with a `price_micros` > 0.
    pub mrr: Vec<Mrr>,
    /// Tollgate's estimate: usage of the month past `included` on plans that bill overage.
    pub overage: Vec<Overage>,
    /// Stripe's: invoices created in the month.
    pub invoices: Vec<InvoiceSums>,
    /// Customers linked to a Stripe customer during the month.
    pub new_customers: i64,
    /// Customers whose subscription became canceled during the month.
    pub churned_customers: i64,
    /// Subscriptions renewing (period ends, not canceling) within `days` of now.
    pub renewals: Upcoming,
    /// Trials ending within `days` of now.
    pub trials_ending: Upcoming,
    /// Customers at or over a limit this month, or near one.
    pub limits: Limits,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Sources {
    pub stripe: Vec<&'static str>,
    pub tollgate_estimate: Vec<&'static str>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PlanStatus {
    pub plan: String,
    pub status: String,
    pub customers: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Mrr {
    pub currency: String,
    /// Monthly recurring revenue, integer micros of `currency`.
    pub amount_micros: i64,
    pub subscriptions: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Overage {
    pub plan: String,
    pub meter: String,
    pub currency: String,
    pub units: i64,
    /// Integer micros of `currency`.
    pub amount_micros: i64,
    pub customers: i64,
}

#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct InvoiceSums {
    pub currency: String,
    /// Amounts in Stripe's integer minor units of `currency` (cents for usd).
    pub paid: i64,
    pub paid_amount: i64,
    pub open: i64,
    /// What is still due on open invoices that no payment was tried on yet.
    pub open_amount: i64,
    /// Open invoices whose payment was tried and failed.
    pub failed: i64,
    pub failed_amount: i64,
    pub uncollectible: i64,
    pub uncollectible_amount: i64,
    pub void: i64,
    pub draft: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Upcoming {
    pub days: u32,
    pub customers: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Limits {
    /// At or past `included` on some limited meter.
    pub over: i64,
    /// At or past `near` of `included` on some meter, and over none.
    pub near: i64,
    pub near_ratio: f64,
}

/// Why a summary could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SummaryError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("a sum does not fit in 64 bits: {0}")]
    Overflow(&'static str),
}

fn fit(v: i128, what: &'static str) -> Result<i64, SummaryError> {
    i64::try_from(v).map_err(|_| SummaryError::Overflow(what))
}

/// Computes the summary from the ledger and the config in force.
pub async fn summary(
    ledger: &dyn Ledger,
    config: &Config,
    ask: Ask,
) -> Result<Summary, SummaryError> {
    let customers = ledger.all_customers().await?;
    let stored: BTreeMap<&str, &crate::entitle::Entitlement> =
        customers.iter().map(|(id, e)| (id.as_str(), e)).collect();
    let in_month =
        |t: Option<DateTime<Utc>>| t.is_some_and(|t| t >= ask.month.start && t < ask.month.end);
    let soon = |t: Option<DateTime<Utc>>| {
        t.is_some_and(|t| t >= ask.now && t < ask.now + Duration::days(i64::from(ask.days)))
    };

    let mut by_plan: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut mrr: BTreeMap<String, (i128, i64)> = BTreeMap::new();
    let (mut churned, mut renewals, mut trials) = (0i64, 0i64, 0i64);
    for (_, e) in &customers {
        let plan = plan_of(config, Some(e));
        let name = plan.map_or_else(|| "(none)".to_string(), |p| p.name.clone());
        *by_plan
            .entry((name, e.status.as_str().to_string()))
            .or_default() += 1;
        if matches!(e.status, Status::Active | Status::PastDue) {
            let priced = plan.and_then(|p| p.offer.price_micros.filter(|m| *m > 0).map(|m| (p, m)));
            if let Some((p, price)) = priced {
                let m = mrr.entry(p.offer.currency.clone()).or_default();
                m.0 += i128::from(price);
                m.1 += 1;
            }
        }
        if e.status == Status::Canceled && in_month(e.status_since) {
            churned += 1;
        }
        let live = matches!(
            e.status,
            Status::Active | Status::Trialing | Status::PastDue
        );
        if live && !e.cancel_at_period_end && soon(e.period_end) {
            renewals += 1;
        }
        if e.status == Status::Trialing && soon(e.trial_end) {
            trials += 1;
        }
    }

    // The month's usage per customer and meter, priced by the customer's current plan.
    let usage = ledger
        .usage_report(
            &UsageQuery {
                from: ask.month.start,
                to: ask.month.end,
                customer: None,
                meter: None,
                route: None,
                group_by: UsageGroupBy::Customer,
            },
            0,
            0,
        )
        .await?;
    let mut overage: BTreeMap<(String, String, String), (i128, i128, i64)> = BTreeMap::new();
    // Per customer with usage on a limited meter: (at or past a limit, at or past `near` of one).
    let mut limits: BTreeMap<&str, (bool, bool)> = BTreeMap::new();
    for g in &usage {
        let Some(plan) = plan_of(config, stored.get(g.key.as_str()).copied()) else {
            continue;
        };
        let Some(Quota::Limited {
            included,
            overage: billed,
            unit_price_micros,
        }) = plan.quotas.get(&g.meter).copied()
        else {
            continue;
        };
        let used = u64::try_from(g.units).unwrap_or(0);
        let state = limits.entry(g.key.as_str()).or_default();
        if included > 0 {
            state.0 |= used >= included;
            state.1 |= used as f64 >= ask.near * included as f64;
        }
        if billed && used > included {
            let units = i128::from(used - included);
            let o = overage
                .entry((
                    plan.name.clone(),
                    g.meter.clone(),
                    plan.offer.currency.clone(),
                ))
                .or_default();
            o.0 += units;
            o.1 += units * i128::from(unit_price_micros);
            o.2 += 1;
        }
    }
    let over_customers = limits.values().filter(|(over, _)| *over).count() as i64;
    // Near: some meter at or past the share, and no meter over.
    let near_customers = limits
        .values()
        .filter(|(over, near)| !over && *near)
        .count() as i64;

    let mut invoices: BTreeMap<String, InvoiceSums> = BTreeMap::new();
    for t in ledger
        .invoice_totals(ask.month.start, ask.month.end)
        .await?
    {
        let s = invoices
            .entry(t.currency.clone())
            .or_insert_with(|| InvoiceSums {
                currency: t.currency.clone(),
                ..Default::default()
            });
        let add = |count: &mut i64, amount: &mut i64, v: i64| -> Result<(), SummaryError> {
            *count += t.invoices;
            *amount = amount
                .checked_add(v)
                .ok_or(SummaryError::Overflow("invoice amounts"))?;
            Ok(())
        };
        match (t.status.as_str(), t.attempted) {
            ("paid", _) => add(&mut s.paid, &mut s.paid_amount, t.amount_paid)?,
            ("open", true) => add(&mut s.failed, &mut s.failed_amount, t.amount_remaining)?,
            ("open", false) => add(&mut s.open, &mut s.open_amount, t.amount_remaining)?,
            ("uncollectible", _) => add(
                &mut s.uncollectible,
                &mut s.uncollectible_amount,
                t.amount_remaining,
            )?,
            ("void", _) => s.void += t.invoices,
            _ => s.draft += t.invoices,
        }
    }

    Ok(Summary {
        period: ask.month.label(),
        period_start: ask.month.start,
        period_end: ask.month.end,
        generated_at: ask.now,
        sources: Sources {
            stripe: vec!["invoices"],
            tollgate_estimate: vec![
                "customers",
                "mrr",
                "overage",
                "new_customers",
                "churned_customers",
                "renewals",
                "trials_ending",
                "limits",
            ],
        },
        customers: by_plan
            .into_iter()
            .map(|((plan, status), customers)| PlanStatus {
                plan,
                status,
                customers,
            })
            .collect(),
        mrr: mrr
            .into_iter()
            .map(|(currency, (amount, subscriptions))| {
                Ok(Mrr {
                    currency,
                    amount_micros: fit(amount, "mrr")?,
                    subscriptions,
                })
            })
            .collect::<Result<_, SummaryError>>()?,
        overage: overage
            .into_iter()
            .map(|((plan, meter, currency), (units, amount, customers))| {
                Ok(Overage {
                    plan,
                    meter,
                    currency,
                    units: fit(units, "overage units")?,
                    amount_micros: fit(amount, "overage amount")?,
                    customers,
                })
            })
            .collect::<Result<_, SummaryError>>()?,
        invoices: invoices.into_values().collect(),
        new_customers: ledger
            .stripe_links_made(ask.month.start, ask.month.end)
            .await?,
        churned_customers: churned,
        renewals: Upcoming {
            days: ask.days,
            customers: renewals,
        },
        trials_ending: Upcoming {
            days: ask.days,
            customers: trials,
        },
        limits: Limits {
            over: over_customers,
            near: near_customers,
            near_ratio: ask.near,
        },
    })
}

/// The summary as CSV: `section,plan,status,meter,currency,figure,value`, one line per figure.
pub fn csv(s: &Summary) -> String {
    let mut out = String::from("section,plan,status,meter,currency,figure,value\n");
    let mut line = |section: &str,
                    plan: &str,
                    status: &str,
                    meter: &str,
                    currency: &str,
                    figure: &str,
                    value: String| {
        let q = |v: &str| {
            if v.contains([',', '"', '\n']) {
                format!("\"{}\"", v.replace('"', "\"\""))
            } else {
                v.to_string()
            }
        };
        out.push_str(&format!(
            "{},{},{},{},{},{},{}\n",
            q(section),
            q(plan),
            q(status),
            q(meter),
            q(currency),
            q(figure),
            value
        ));
    };
    for c in &s.customers {
        line(
            "customers",
            &c.plan,
            &c.status,
            "",
            "",
            "customers",
            c.customers.to_string(),
        );
    }
    for m in &s.mrr {
        line(
            "mrr",
            "",
            "",
            "",
            &m.currency,
            "amount_micros",
            m.amount_micros.to_string(),
        );
        line(
            "mrr",
            "",
            "",
            "",
            &m.currency,
            "subscriptions",
            m.subscriptions.to_string(),
        );
    }
    for o in &s.overage {
        line(
            "overage",
            &o.plan,
            "",
            &o.meter,
            &o.currency,
            "units",
            o.units.to_string(),
        );
        line(
            "overage",
            &o.plan,
            "",
            &o.meter,
            &o.currency,
            "amount_micros",
            o.amount_micros.to_string(),
        );
    }
    for i in &s.invoices {
        for (figure, v) in [
            ("paid", i.paid),
            ("paid_amount", i.paid_amount),
            ("open", i.open),
            ("open_amount", i.open_amount),
            ("failed", i.failed),
            ("failed_amount", i.failed_amount),
            ("uncollectible", i.uncollectible),
            ("uncollectible_amount", i.uncollectible_amount),
            ("void", i.void),
            ("draft", i.draft),
        ] {
            line("invoices", "", "", "", &i.currency, figure, v.to_string());
        }
    }
    line(
        "customers",
        "",
        "",
        "",
        "",
        "new",
        s.new_customers.to_string(),
    );
    line(
        "customers",
        "",
        "",
        "",
        "",
        "churned",
        s.churned_customers.to_string(),
    );
    line(
        "renewals",
        "",
        "",
        "",
        "",
        "customers",
        s.renewals.customers.to_string(),
    );
    line(
        "trials_ending",
        "",
        "",
        "",
        "",
        "customers",
        s.trials_ending.customers.to_string(),
    );
    line("limits", "", "", "", "", "over", s.limits.over.to_string());
    line("limits", "", "", "", "", "near", s.limits.near.to_string());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_parse_to_their_utc_bounds() {
        let m = Month::parse("2026-12").expect("a month");
        assert_eq!(m.start.to_rfc3339(), "2026-12-01T00:00:00+00:00");
        assert_eq!(m.end.to_rfc3339(), "2027-01-01T00:00:00+00:00");
        assert_eq!(
            Month::parse("2026-02").expect("a month").end.to_rfc3339(),
            "2026-03-01T00:00:00+00:00"
        );
        for bad in ["2026-13", "2026-1", "26-01", "2026/01", "", "2026-00"] {
            assert!(Month::parse(bad).is_none(), "{bad}");
        }
        assert_eq!(Month::of(m.start + Duration::days(3)), m);
    }
}
