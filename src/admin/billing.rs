//! The billing part of the admin API (issue 13), behind the admin bearer token:
//! `GET /admin/customers/{id}/invoices?limit=&after=` (the customer's Stripe invoices as the
//! webhooks stored them, newest first, in pages; the same pages `GET /_tollgate/invoices` serves
//! the customer).
//!
//! Owns: these HTTP shapes. Must not touch: how invoices are stored (`stripe::webhook`,
//! `ledger`), the page itself (`billing::service::invoice_page`), the error mapping
//! (`admin::error`).

use crate::admin::error::{AdminError, Problem, Unknown};
use crate::admin::extract::CustomerId;
use crate::admin::AdminState;
use crate::billing::service::invoice_page;
use crate::billing::{BillingError, InvoicePage};
use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use std::collections::HashMap;

/// The routes, merged into the admin router.
pub(crate) fn routes() -> Router<AdminState> {
    Router::new().route("/admin/customers/{id}/invoices", get(invoices))
}

/// A customer's invoices, newest first. 404 only for a customer tollgate knows nothing of (no
/// entitlement, no Stripe link, no invoice).
#[utoipa::path(
    get,
    path = "/admin/customers/{id}/invoices",
    tag = "customers",
    params(
        ("id" = String, Path, description = "the customer id"),
        ("limit" = Option<i64>, Query, description = "invoices per page, 1-100 (default 20)"),
        ("after" = Option<String>, Query, description = "the `next` of the page before"),
    ),
    responses(
        (status = 200, description = "one page of invoices; amounts in Stripe's integer minor units", body = InvoicePage),
        (status = 400, description = "`invalid-customer-id`, or `invalid-query`: a bad `limit` or `after`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`unknown-customer`: no entitlement, no Stripe link, no invoice", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the ledger is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub(crate) async fn invoices(
    State(s): State<AdminState>,
    CustomerId(id): CustomerId,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<InvoicePage>, AdminError> {
    let limit = super::extract::limit(&q, 20, 100)?;
    let page = invoice_page(&*s.ledger, &id, q.get("after").cloned(), limit)
        .await
        .map_err(|e| match e {
            BillingError::Ledger(e) => AdminError::LedgerUnavailable(e),
            other => AdminError::InvalidQuery(other.to_string()),
        })?;
    if page.invoices.is_empty()
        && s.ledger.get_customer(&id).await?.is_none()
        && s.ledger.stripe_link(Some(&id), None).await?.is_none()
    {
        return Err(AdminError::unknown_customer(&id, Unknown::Ever));
    }
    Ok(Json(page))
}
