//! The offered plans (`GET /_tollgate/plans`): every `public = true` plan with what it includes
//! (quotas, rate, features) and what it costs, by rank, built once per config version. The body without
//! a caller is the same bytes on every instance with the same config, so its `ETag` (a hash of
//! the body) lets clients and caches revalidate cheaply.
//!
//! Owns: this JSON shape. Must not touch: entitlements (the caller's current plan is passed in).

use crate::config::{Config, Plan, Quota};
use serde::Serialize;
use sha2::Digest;

/// The catalog of one config version.
#[derive(Debug, Clone)]
pub struct Catalog {
    plans: Vec<Offered>,
    /// The body without a caller, and its ETag.
    anonymous: (bytes::Bytes, String),
}

#[derive(Debug, Clone, Serialize)]
struct Offered {
    name: String,
    title: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    /// `null` for a plan with no price (free).
    price: Option<Price>,
    trial_days: u32,
    /// A checkout can subscribe to it (it names a Stripe price, and Stripe is configured).
    purchasable: bool,
    /// The plan unknown customers get.
    default: bool,
    features: Vec<String>,
    rate: Option<Rate>,
    quotas: Vec<Included>,
    /// Only with a caller's token: this is the caller's plan.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    current: bool,
}

#[derive(Debug, Clone, Serialize)]
struct Price {
    amount_micros: u64,
    currency: String,
    interval: &'static str,
}

#[derive(Debug, Clone, Serialize)]
struct Rate {
    per_minute: u32,
    burst: u32,
}

#[derive(Debug, Clone, Serialize)]
struct Included {
    meter: String,
    /// `null` when unlimited.
    included: Option<u64>,
    unlimited: bool,
    /// `deny` (the call is refused past `included`) or `allow` (billed per unit).
    overage: &'static str,
    /// Price of one unit past `included`, in micros of the plan's currency.
    #[serde(skip_serializing_if = "Option::is_none")]
    unit_price_micros: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    plans: &'a [Offered],
    /// The caller's plan (also when it is not offered), only with a token.
    #[serde(skip_serializing_if = "Option::is_none")]
    current_plan: Option<&'a str>,
}

// === impl Catalog ===

impl Catalog {
    pub fn new(config: &Config) -> Catalog {
        // Cheapest first, as a pricing page shows them: by rank, then name.
        let mut public: Vec<&Plan> = config.plans.values().filter(|p| p.offer.public).collect();
        public.sort_by(|a, b| (a.rank, &a.name).cmp(&(b.rank, &b.name)));
        let plans: Vec<Offered> = public.into_iter().map(|p| offered(config, p)).collect();
        let anonymous = render(&plans, None);
        Catalog { plans, anonymous }
    }

    /// The body and its ETag; with `current` (the caller's plan), that plan is marked.
    pub fn body(&self, current: Option<&str>) -> (bytes::Bytes, String) {
        match current {
            None => self.anonymous.clone(),
            Some(name) => {
                let mut plans = self.plans.clone();
                for p in &mut plans {
                    p.current = p.name == name;
                }
                render(&plans, Some(name))
            }
        }
    }
}

fn render(plans: &[Offered], current_plan: Option<&str>) -> (bytes::Bytes, String) {
    let json = serde_json::to_vec(&Body {
        plans,
        current_plan,
    })
    .unwrap_or_default();
    let digest = sha2::Sha256::digest(&json);
    let etag = format!(
        "\"{}\"",
        digest[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    (bytes::Bytes::from(json), etag)
}

fn offered(config: &Config, p: &Plan) -> Offered {
    let o = &p.offer;
    Offered {
        name: p.name.clone(),
        title: o.title.clone().unwrap_or_else(|| p.name.clone()),
        description: o.description.clone(),
        price: o.price_micros.map(|m| Price {
            amount_micros: m,
            currency: o.currency.clone(),
            interval: "month",
        }),
        trial_days: o.trial_days,
        purchasable: o.stripe_price.is_some() && config.stripe.is_some(),
        default: config.default_plan.as_deref() == Some(p.name.as_str()),
        features: p.features.iter().cloned().collect(),
        rate: p.rate.map(|r| Rate {
            per_minute: r.per_minute,
            burst: r.burst,
        }),
        quotas: p
            .quotas
            .iter()
            .map(|(meter, q)| {
                let (overage, unit_price_micros) = match *q {
                    Quota::Unlimited => ("allow", None),
                    Quota::Limited {
                        overage,
                        unit_price_micros,
                        ..
                    } => (
                        if overage { "allow" } else { "deny" },
                        overage.then_some(unit_price_micros),
                    ),
                };
                Included {
                    meter: meter.clone(),
                    included: q.included(),
                    unlimited: q.included().is_none(),
                    overage,
                    unit_price_micros,
                }
            })
            .collect(),
        current: false,
    }
}
