//! The admin API's OpenAPI document (issue 4, must-show 4): `GET /admin/openapi.json` is OpenAPI
//! 3.x, documents every route the admin router serves with exactly the methods it serves, and
//! its schemas match what the handlers send.
//!
//! "Every route the router serves" is found without utoipa: every `.route("…", get(…).put(…))`
//! in `src/` is read from the source, and each one is then probed on a running admin listener
//! (an `/admin/` route answers 401 without a token where an unknown one answers 404; a method a
//! path does not serve answers 405). A route added without a `#[utoipa::path]` in
//! `openapi::AdminApi` fails `documents_exactly_the_served_routes`.

use crate::support::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Methods a `MethodRouter` can be built with (`axum::routing::{get, post, …}` and the chained
/// `.get(…)`, `.post(…)`, …). `any` is listed so that a route using it fails loudly (it has no
/// OpenAPI method).
const ROUTING_FNS: &[&str] = &[
    "get", "post", "put", "patch", "delete", "head", "options", "trace", "any",
];

/// Methods probed for 405 on every documented path (HEAD is left out: axum answers it for GET).
const PROBED: &[&str] = &["GET", "PUT", "POST", "PATCH", "DELETE"];

type Routes = BTreeSet<(String, String)>;

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The text inside a call's parentheses, `s` starting just after the `(`; string literals are
/// skipped so their brackets do not count.
fn call_args(s: &str) -> &str {
    let (mut depth, mut in_str, mut escaped) = (1, false, false);
    for (i, c) in s.char_indices() {
        match (in_str, c) {
            (true, _) if escaped => escaped = false,
            (true, '\\') => escaped = true,
            (true, '"') => in_str = false,
            (true, _) => {}
            (false, '"') => in_str = true,
            (false, '(') => depth += 1,
            (false, ')') => {
                depth -= 1;
                if depth == 0 {
                    return &s[..i];
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced call: {s:.80}");
}

/// The routing functions called in a `MethodRouter` expression: identifiers of
/// [`ROUTING_FNS`] directly followed by `(`, outside string literals.
fn routing_calls(expr: &str) -> Vec<String> {
    let (mut out, mut ident, mut in_str, mut escaped) = (Vec::new(), String::new(), false, false);
    for c in expr.chars() {
        if in_str {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_str = false,
                _ => {}
            }
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' {
            ident.push(c);
            continue;
        }
        if c == '(' && ROUTING_FNS.contains(&ident.as_str()) {
            out.push(ident.to_uppercase());
        }
        ident.clear();
        in_str = c == '"';
    }
    out
}

/// Every (METHOD, path) registered with `.route("…", …)` in `src/`, outside unit tests and the
/// demo upstream: what the admin router serves, read independently of utoipa.
fn routes_in_source() -> Routes {
    let mut files = Vec::new();
    rs_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let mut out = Routes::new();
    for f in files {
        // `tollgate demo`'s stand-in upstream: its own router, on its own port.
        if f.ends_with("demo.rs") {
            continue;
        }
        // A `tests/` folder under `src/` is a `#[cfg(test)] mod tests;` (unit tests that may
        // stand up routers of their own, e.g. a JWKS server); nothing in it is served.
        if f.strip_prefix(Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
            .is_ok_and(|rel| rel.components().any(|c| c.as_os_str() == "tests"))
        {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        // Unit tests may build routers of their own (e.g. a JWKS stand-in).
        let code: String = text
            .split("#[cfg(test)]")
            .next()
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        for other in [".nest(", ".nest_service(", ".route_service(", ".fallback("] {
            assert!(
                !code.contains(other),
                "{}: routes added with {other} are invisible to this test; teach it them",
                f.display()
            );
        }
        let mut rest = code.as_str();
        while let Some(i) = rest.find(".route(") {
            rest = &rest[i + ".route(".len()..];
            // `Router::route(path, method_router)` has two arguments, the first a literal here;
            // `ctx.route(&snap)`, `metrics.route("(unmatched)")` are not routers.
            let Some(lit) = rest.trim_start().strip_prefix('"') else {
                continue;
            };
            let args = call_args(rest);
            let path = lit.split('"').next().unwrap().to_string();
            let Some(comma) = args.find(',') else {
                continue;
            };
            let methods = routing_calls(&args[comma..]);
            assert!(!methods.is_empty(), "{}: no method for {path}", f.display());
            for m in methods {
                out.insert((m, path.clone()));
            }
        }
    }
    out
}

/// (METHOD, path) of every operation in the document.
fn documented(doc: &Value) -> Routes {
    let mut out = Routes::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if [
                "get", "put", "post", "patch", "delete", "head", "options", "trace",
            ]
            .contains(&method.as_str())
            {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

/// A concrete URL path for a templated one.
fn concrete(path: &str) -> String {
    path.replace("{id}", "openapi-probe")
        .replace("{name}", "openapi-probe")
        .replace("{version}", "1")
}

async fn send(tg: &Tollgate, method: &str, path: &str, token: Option<&str>) -> reqwest::Response {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = tg.client.request(m, tg.admin_url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

async fn fetch_doc(tg: &Tollgate) -> Value {
    let r = send(tg, "GET", "/admin/openapi.json", Some(ADMIN_TOKEN)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    r.json().await.unwrap()
}

/// `value`'s keys are properties of schema `name`, and every required property is there.
fn assert_fits(doc: &Value, name: &str, value: &Value) {
    let schema = &doc["components"]["schemas"][name];
    let props: BTreeSet<&str> = schema["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("schema {name} has no properties: {schema}"))
        .keys()
        .map(String::as_str)
        .collect();
    let keys: BTreeSet<&str> = value
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert!(
        keys.is_subset(&props),
        "{name}: sent {keys:?}, documented {props:?}"
    );
    for r in schema["required"].as_array().into_iter().flatten() {
        assert!(
            keys.contains(r.as_str().unwrap()),
            "{name}: {r} is required but was not sent"
        );
    }
}

/// Every `$ref` in `v`.
fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                out.push(r);
            }
            m.values().for_each(|v| refs(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

/// The document is OpenAPI 3.x named after the crate, behind the admin token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_behind_the_admin_token() {
    let up = Upstream::start().await;
    let tg = Tollgate::start(&base_config(up.addr), Backend::Embedded).await;
    for token in [None, Some("not-the-admin-token")] {
        let r = send(&tg, "GET", "/admin/openapi.json", token).await;
        let (status, ty, _) = problem(r).await;
        assert_eq!(
            (status, ty.as_str()),
            (401, "urn:tollgate:problem:admin-unauthorized"),
            "{token:?}"
        );
    }
    let doc = fetch_doc(&tg).await;
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );
    assert_eq!(doc["info"]["title"], "tollgate admin API");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    let scheme = &doc["components"]["securitySchemes"]["admin_token"];
    assert_eq!(
        (scheme["type"].as_str(), scheme["scheme"].as_str()),
        (Some("http"), Some("bearer"))
    );
}

/// The document lists exactly the (method, path) pairs the router serves, each probed live: every
/// `/admin/` operation answers 401 without a token (an unknown path answers 404), the public ones
/// answer, and every method a path does not document answers 405.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_exactly_the_served_routes() {
    let served = routes_in_source();
    assert!(
        served.len() >= 20,
        "the source scan found too little: {served:?}"
    );
    let up = Upstream::start().await;
    let tg = Tollgate::start(&base_config(up.addr), Backend::Embedded).await;
    let doc = fetch_doc(&tg).await;
    let documented = documented(&doc);
    let missing: Vec<_> = served.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "served but not documented (add a #[utoipa::path] and list it in openapi::AdminApi): \
         {missing:?}\ndocumented but not served: {extra:?}"
    );

    for (method, path) in &documented {
        let url = concrete(path);
        let r = send(&tg, method, &url, None).await;
        let status = r.status().as_u16();
        if path.starts_with("/admin/") {
            let (status, ty, _) = problem(r).await;
            assert_eq!(
                (status, ty.as_str()),
                (401, "urn:tollgate:problem:admin-unauthorized"),
                "{method} {url}"
            );
            let op = &doc["paths"][path][method.to_lowercase()];
            assert_eq!(
                op["security"][0]["admin_token"],
                serde_json::json!([]),
                "{method} {path}"
            );
            assert!(op["responses"]["401"].is_object(), "{method} {path}");
        } else {
            // Served: not the router's 405; a 404 here is the handler's problem (no Stripe).
            assert_ne!(status, 405, "{method} {url}");
            if status == 404 {
                problem(r).await;
            }
        }
        let op = &doc["paths"][path][method.to_lowercase()];
        for code in op["responses"].as_object().unwrap().keys() {
            // `/readyz`'s 503 is its readiness body; every other error is a problem.
            let error = code.starts_with('4') || code.starts_with('5');
            if error && !(path == "/readyz" && code == "503") {
                let content = &op["responses"][code]["content"];
                assert!(
                    content["application/problem+json"]["schema"]["$ref"].is_string(),
                    "{method} {path} {code}: errors are documented as problem+json"
                );
            }
        }
    }
    let paths: BTreeSet<&str> = documented.iter().map(|(_, p)| p.as_str()).collect();
    for path in paths {
        for m in PROBED {
            if !documented.contains(&(m.to_string(), path.to_string())) {
                let r = send(&tg, m, &concrete(path), Some(ADMIN_TOKEN)).await;
                assert_eq!(r.status(), 405, "{m} {path} is served but not documented");
            }
        }
    }
    // The probe tells a served route from an unknown one.
    for token in [None, Some(ADMIN_TOKEN)] {
        let r = send(&tg, "GET", "/admin/no-such-route", token).await;
        assert_eq!(r.status(), 404);
    }
}

/// The body schemas exist, every `$ref` resolves, and what the handlers send fits what is
/// documented (customer PUT body and answer, customer view, readiness, problem details).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_match_the_handlers() {
    let up = Upstream::start().await;
    let tg = Tollgate::start(&base_config(up.addr), Backend::Embedded).await;
    let doc = fetch_doc(&tg).await;
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(all.len() > 30, "{all:?}");
    for r in all {
        let name = r.strip_prefix("#/components/schemas/").unwrap();
        assert!(schemas.contains_key(name), "dangling $ref {r}");
    }

    let put = &doc["paths"]["/admin/customers/{id}"]["put"];
    assert_eq!(
        put["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/CustomerPut"
    );
    assert_eq!(
        put["responses"]["400"]["content"]["application/problem+json"]["schema"]["$ref"],
        "#/components/schemas/Problem"
    );
    let body: BTreeSet<&str> = schemas["CustomerPut"]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        body,
        BTreeSet::from([
            "plan",
            "status",
            "period_start",
            "period_end",
            "suspended",
            "status_since",
            "cancel_at_period_end",
            "trial_end"
        ])
    );
    let problem_props: BTreeSet<&str> = schemas["Problem"]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        problem_props,
        BTreeSet::from(["type", "title", "status", "detail"])
    );
    assert!(schemas["InvalidConfig"]["properties"]["errors"].is_object());

    let r = tg
        .put_customer(
            "acme",
            serde_json::json!({"plan": "pro", "suspended": false}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_fits(&doc, "Entitlement", &r.json().await.unwrap());
    let r = send(&tg, "GET", "/admin/customers/acme", Some(ADMIN_TOKEN)).await;
    assert_eq!(r.status(), 200);
    assert_fits(&doc, "CustomerView", &r.json().await.unwrap());
    let r = send(&tg, "GET", "/readyz", None).await;
    assert_eq!(r.status(), 200);
    assert_fits(&doc, "Readiness", &r.json().await.unwrap());
    let r = send(&tg, "GET", "/admin/config", Some(ADMIN_TOKEN)).await;
    assert_fits(&doc, "ConfigView", &r.json().await.unwrap());
    let r = send(&tg, "GET", "/admin/customers/nobody", Some(ADMIN_TOKEN)).await;
    let (status, _, body) = problem(r).await;
    assert_eq!(status, 404);
    assert_fits(&doc, "Problem", &body);
    let r = tg
        .put_customer(
            "acme",
            serde_json::json!({"plan": "no-such-plan", "color": 1}),
        )
        .await;
    let (status, _, body) = problem(r).await;
    assert_eq!(status, 400);
    assert_fits(&doc, "Problem", &body);
}

/// Errors no handler wrote are problem+json too: an unknown path (404), a wrong method (405,
/// `Allow` kept), and an admin body over axum's 2 MB limit (413).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_errors_are_problems() {
    let up = Upstream::start().await;
    let tg = Tollgate::start(&base_config(up.addr), Backend::Embedded).await;
    let r = tg
        .client
        .get(tg.admin_url("/no/such/path"))
        .send()
        .await
        .unwrap();
    let (status, ty, _) = problem(r).await;
    assert_eq!(
        (status, ty.as_str()),
        (404, "urn:tollgate:problem:not-found")
    );
    let r = tg
        .client
        .delete(tg.admin_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("allow").is_some(), "{:?}", r.headers());
    let (status, ty, _) = problem(r).await;
    assert_eq!(
        (status, ty.as_str()),
        (405, "urn:tollgate:problem:method-not-allowed")
    );
    let r = tg
        .client
        .put(tg.admin_url("/admin/customers/big"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body(format!("{{\"plan\":\"{}\"}}", "x".repeat(3 * 1024 * 1024)))
        .send()
        .await
        .unwrap();
    let (status, ty, _) = problem(r).await;
    assert_eq!(
        (status, ty.as_str()),
        (413, "urn:tollgate:problem:body-too-large")
    );
}
