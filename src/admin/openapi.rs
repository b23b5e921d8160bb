//! The admin listener's OpenAPI 3.1 document, derived from the handlers' own `#[utoipa::path]`
//! annotations and their body types' `ToSchema`, served at `GET /admin/openapi.json`.
//!
//! Every `/admin/*` route is behind the admin router's token check (`require_token`), so the
//! bearer requirement and its 401 are added here, once, to every operation under `/admin/` (see
//! [`AdminAuth`]) rather than repeated on each annotation; `tests/openapi.rs` checks on a running
//! listener that each of those operations really answers 401 without the token.
//!
//! Owns: the list of documented operations and the document's info and security. Must not
//! touch: the shapes (the handler modules'), the problem body (`proxy::respond::Problem`). A
//! route added to the admin router must be added to `paths(...)` below; `tests/openapi.rs`
//! fails until it is.

use crate::admin::error::{AdminError, Problem};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use std::sync::LazyLock;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as Document, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};

/// Name of the bearer security scheme in `components.securitySchemes`.
const SECURITY_SCHEME: &str = "admin_token";

/// The admin API's document. `info.version` is the crate's (`CARGO_PKG_VERSION`).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "tollgate admin API",
        description = "The admin listener of tollgate: health, metrics, live config, customers, \
            usage reports, alerts and Stripe. Everything under `/admin/` needs \
            `Authorization: Bearer $TOLLGATE_ADMIN_TOKEN` (the env var named by \
            `admin.token_env`); errors are `application/problem+json` (RFC 9457).",
    ),
    paths(
        crate::admin::healthz,
        crate::admin::readyz,
        crate::admin::metrics,
        serve,
        crate::admin::config::get_config,
        crate::admin::config::put_config,
        crate::admin::config::list_versions,
        crate::admin::config::get_version,
        crate::admin::config::rollback,
        crate::admin::config::patch_route,
        crate::admin::config::patch_plan,
        crate::admin::config::audit,
        crate::admin::customers::put_customer,
        crate::admin::customers::get_customer,
        crate::admin::customers::list_customers,
        crate::admin::customers::suspend,
        crate::admin::customers::resume,
        crate::admin::customers::credit,
        crate::admin::billing::create_customer,
        crate::admin::billing::change_subscription,
        crate::admin::billing::end_subscription,
        crate::admin::billing::invoices,
        crate::admin::billing::summary,
        crate::admin::ingest::events,
        crate::admin::ingest::check,
        crate::admin::ingest::commit,
        crate::admin::ingest::release,
        crate::admin::usage::usage,
        crate::admin::alerts::delivery_log,
        crate::admin::stripe::sync,
        crate::admin::stripe::unmatched,
        crate::admin::stripe::link,
        crate::admin::stripe::portal_session,
        crate::admin::stripe::resolve_report,
        crate::admin::webhook::receive,
    ),
    components(schemas(Problem)),
    modifiers(&AdminAuth),
    tags(
        (name = "health", description = "liveness, readiness (no token), Prometheus metrics (the metrics token when admin.metrics_token_env is set)"),
        (name = "config", description = "live config: versions, changes, rollback, audit log"),
        (name = "customers", description = "entitlements, usage this period, suspension, credits"),
        (name = "usage", description = "usage reports from the ledger"),
        (name = "alerts", description = "threshold-alert delivery log"),
        (name = "stripe", description = "Stripe reconciliation, customer links, portal, webhooks"),
        (name = "meta", description = "this document"),
    ),
)]
pub(crate) struct AdminApi;

/// Adds the bearer scheme, and to every operation under `/admin/` the bearer requirement and
/// its 401 `admin-unauthorized` problem.
struct AdminAuth;

// === impl AdminAuth ===

impl Modify for AdminAuth {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            SECURITY_SCHEME,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "the admin token: the value of the env var named by `admin.token_env`",
                    ))
                    .build(),
            ),
        );
        let unauthorized = ResponseBuilder::new()
            .description("`admin-unauthorized`: no admin token, or a wrong one")
            .content(
                "application/problem+json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build();
        let requirement = SecurityRequirement::new::<_, _, &str>(SECURITY_SCHEME, []);
        for (path, item) in doc.paths.paths.iter_mut() {
            if !path.starts_with("/admin/") {
                continue;
            }
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.options,
                &mut item.head,
                &mut item.patch,
                &mut item.trace,
            ]
            .into_iter()
            .flatten()
            {
                op.security = Some(vec![requirement.clone()]);
                op.responses
                    .responses
                    .insert("401".into(), unauthorized.clone().into());
            }
        }
    }
}

/// The document as JSON, built once.
static DOCUMENT: LazyLock<Result<String, String>> =
    LazyLock::new(|| AdminApi::openapi().to_json().map_err(|e| e.to_string()));

/// This document (OpenAPI 3.1). Behind the admin token like the rest of `/admin/`: it maps the
/// whole operator surface, which is no business of anyone without the token.
#[utoipa::path(
    get,
    path = "/admin/openapi.json",
    tag = "meta",
    responses((status = 200, description = "the OpenAPI document", body = Object, content_type = "application/json")),
)]
pub(crate) async fn serve() -> Result<Response, AdminError> {
    let json = DOCUMENT
        .as_ref()
        .map_err(|e| AdminError::OpenapiUnavailable(e.clone()))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], json.as_str()).into_response())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The document serializes, names itself and the crate version, and every `/admin/`
    /// operation carries the bearer requirement and a 401 while the public ones carry neither.
    #[test]
    fn document_serializes() {
        let json = AdminApi::openapi().to_pretty_json().unwrap();
        let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        assert_eq!(doc["info"]["title"], "tollgate admin API");
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(
            doc["components"]["securitySchemes"][SECURITY_SCHEME]["scheme"],
            "bearer"
        );
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths.len() >= 20, "{:?}", paths.keys());
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                let secured = op.get("security").is_some();
                let has_401 = op["responses"].get("401").is_some();
                let admin = path.starts_with("/admin/");
                assert_eq!(
                    (secured, has_401),
                    (admin, admin),
                    "{method} {path}: security/401 must be exactly on /admin/ operations"
                );
            }
        }
        assert!(DOCUMENT.is_ok());
    }
}
