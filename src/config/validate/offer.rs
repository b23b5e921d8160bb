//! The keys of what a plan sells and of self-service billing (issue 13): a plan's `title`,
//! `description`, `price_micros`, `currency`, `trial_days`, `public`, `stripe_price`, and
//! `[stripe]` `redirect_hosts` and `proration_behavior`.

use super::super::raw::{RawConfig, RawPlan, RawStripe};
use super::super::{Offer, Plan};
use super::Validator;
use std::collections::BTreeMap;

/// Ceiling on a plan's monthly `price_micros` (a billion a month in any currency).
const MAX_PRICE_MICROS: i64 = 1_000_000_000_000_000;

impl Validator {
    /// A plan's display and sale keys (`key` is `plans.<name>`).
    pub(super) fn offer(&mut self, key: &str, p: &RawPlan) -> Offer {
        let text = |this: &mut Self, k: &str, v: &Option<String>, max: usize| {
            let v = v.as_deref().map(str::trim).filter(|v| !v.is_empty());
            if let Some(t) = v {
                if t.chars().count() > max || t.chars().any(char::is_control) {
                    this.err(
                        format!("{key}.{k}"),
                        format!("at most {max} characters, no control characters"),
                    );
                }
            }
            v.map(String::from)
        };
        let title = text(self, "title", &p.title, 100);
        let description = text(self, "description", &p.description, 1000);
        let price_micros = p.price_micros.map(|m| {
            if !(0..=MAX_PRICE_MICROS).contains(&m) {
                self.err(
                    format!("{key}.price_micros"),
                    format!(
                        "must be from 0 to {MAX_PRICE_MICROS} (a monthly price in micros), got {m}"
                    ),
                );
            }
            m.clamp(0, MAX_PRICE_MICROS) as u64
        });
        let currency = p.currency.clone().unwrap_or_else(|| "usd".into());
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_lowercase()) {
            self.err(
                format!("{key}.currency"),
                format!("must be a lowercase ISO 4217 code such as \"usd\", got {currency:?}"),
            );
        }
        let trial_days = match p.trial_days {
            None => 0,
            Some(d @ 0..=730) => d as u32,
            Some(d) => {
                self.err(
                    format!("{key}.trial_days"),
                    format!("must be from 0 to 730 (Stripe's longest trial), got {d}"),
                );
                0
            }
        };
        let stripe_price = p.stripe_price.as_deref().map(str::trim).map(String::from);
        if let Some(price) = &stripe_price {
            if price.is_empty()
                || !price
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                self.err(
                    format!("{key}.stripe_price"),
                    format!("must be a Stripe price id such as \"price_1Pro\", got {price:?}"),
                );
            }
        }
        Offer {
            title,
            description,
            price_micros,
            currency,
            trial_days,
            public: p.public.unwrap_or(false),
            stripe_price,
        }
    }

    /// No Stripe price is two plans' `stripe_price`.
    pub(super) fn one_plan_per_price(&mut self, raw: &RawConfig) {
        let mut sold_by: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, p) in &raw.plans {
            if let Some(price) = p.stripe_price.as_deref() {
                if let Some(other) = sold_by.insert(price, name) {
                    self.err(
                        format!("plans.{name}.stripe_price"),
                        format!("{price:?} is already plan {other:?}'s price"),
                    );
                }
            }
        }
    }

    /// `[stripe.prices]` does not send a plan's own `stripe_price` to another plan.
    pub(super) fn price_of_another_plan(
        &mut self,
        price: &str,
        plan: &str,
        plans: &BTreeMap<String, Plan>,
    ) {
        let sold = plans
            .values()
            .find(|p| p.offer.stripe_price.as_deref() == Some(price));
        if let Some(other) = sold.filter(|o| o.name != plan) {
            self.err(
                format!("stripe.prices.{price}"),
                format!(
                    "maps to {plan:?}, but plan {:?} names it as its stripe_price",
                    other.name
                ),
            );
        }
    }

    /// `stripe.redirect_hosts` (lowercased) and `stripe.proration_behavior`.
    pub(super) fn self_service_keys(&mut self, s: &RawStripe) -> (Vec<String>, String) {
        let mut redirect_hosts = Vec::new();
        for (i, h) in s.redirect_hosts.iter().enumerate() {
            let h = h.trim().to_ascii_lowercase();
            let ok = !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'));
            if !ok {
                self.err(
                    format!("stripe.redirect_hosts[{i}]"),
                    format!("must be a host name (optionally with :port), got {h:?}"),
                );
            }
            redirect_hosts.push(h);
        }
        let proration_behavior = s
            .proration_behavior
            .clone()
            .unwrap_or_else(|| "create_prorations".into());
        if !matches!(
            proration_behavior.as_str(),
            "create_prorations" | "always_invoice" | "none"
        ) {
            self.err(
                "stripe.proration_behavior",
                format!(
                    "must be \"create_prorations\", \"always_invoice\" or \"none\", got {proration_behavior:?}"
                ),
            );
        }
        (redirect_hosts, proration_behavior)
    }
}
