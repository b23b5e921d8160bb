//! Routing: `(method, path)` → the configured route, via one radix tree (matchit) per method plus
//! one for `*`. Built once per config version; lookups allocate nothing.
//!
//! Owns: the `"METHOD /path/{param}"` match syntax and conflict detection. Must not touch: costs,
//! plans or anything per customer (a route is found before we know who is calling).

use crate::config::Route;
use http::Method;

/// A parsed `match` string: `"GET /signals/{symbol}"`, `"* /health"`, `"POST /v1/{*rest}"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchSpec {
    /// `None` matches any method (`*`).
    pub method: Option<Method>,
    pub path: String,
}

impl MatchSpec {
    pub fn parse(s: &str) -> Result<MatchSpec, String> {
        let (method, path) = s
            .trim()
            .split_once(' ')
            .ok_or_else(|| format!("expected \"METHOD /path\", got {s:?}"))?;
        let path = path.trim();
        if !path.starts_with('/') {
            return Err(format!("path must start with '/', got {path:?}"));
        }
        let method = match method {
            "*" => None,
            m => {
                const KNOWN: [&str; 9] = [
                    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT",
                ];
                if !KNOWN.contains(&m) {
                    return Err(format!(
                        "unknown method {m:?} (use an upper-case HTTP method or *)"
                    ));
                }
                Some(Method::from_bytes(m.as_bytes()).map_err(|e| e.to_string())?)
            }
        };
        Ok(MatchSpec {
            method,
            path: path.to_string(),
        })
    }
}

impl std::fmt::Display for MatchSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.method {
            Some(m) => write!(f, "{m} {}", self.path),
            None => write!(f, "* {}", self.path),
        }
    }
}

/// Route lookup table. Values are indexes into the config's `routes`.
#[derive(Debug, Clone, Default)]
pub struct Router {
    by_method: Vec<(Method, matchit::Router<usize>)>,
    any: matchit::Router<usize>,
}

// === impl Router ===

impl Router {
    /// Builds the table, or returns every `(route index, message)` that conflicts.
    pub fn build(routes: &[Route]) -> Result<Router, Vec<(usize, String)>> {
        let mut router = Router::default();
        let mut conflicts = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            let tree = match &r.spec.method {
                None => &mut router.any,
                Some(m) => match router.by_method.iter().position(|(x, _)| x == m) {
                    Some(p) => &mut router.by_method[p].1,
                    None => {
                        router.by_method.push((m.clone(), matchit::Router::new()));
                        let last = router.by_method.len() - 1;
                        &mut router.by_method[last].1
                    }
                },
            };
            if let Err(e) = tree.insert(r.spec.path.clone(), i) {
                let msg = match e {
                    matchit::InsertError::Conflict { with } => {
                        let other = routes
                            .iter()
                            .position(|o| o.spec.method == r.spec.method && o.spec.path == with)
                            .map(|j| format!(" (routes[{j}])"))
                            .unwrap_or_default();
                        if with == r.spec.path {
                            format!("duplicate route {}{other}", r.spec)
                        } else {
                            format!("{} conflicts with {with:?}{other}", r.spec)
                        }
                    }
                    other => format!("invalid path {:?}: {other}", r.spec.path),
                };
                conflicts.push((i, msg));
            }
        }
        if conflicts.is_empty() {
            Ok(router)
        } else {
            Err(conflicts)
        }
    }

    /// The route index for a request, method-specific routes first, then `*` routes.
    pub fn find(&self, method: &Method, path: &str) -> Option<usize> {
        if let Some((_, tree)) = self.by_method.iter().find(|(m, _)| m == method) {
            if let Ok(m) = tree.at(path) {
                return Some(*m.value);
            }
        }
        self.any.at(path).ok().map(|m| *m.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn config(routes: &str) -> Result<Config, crate::config::ConfigErrors> {
        Config::from_toml(&format!(
            r#"
            [auth]
            algorithms = ["HS256"]
            secret_env = "X"
            [upstreams.u]
            targets = ["127.0.0.1:1"]
            [meters.api_calls]
            [plans.free]
            default = true
            quotas.api_calls = {{ included = 10 }}
            {routes}"#
        ))
    }

    /// Method-specific routes win over `*`, params and catch-alls match, unknown paths miss.
    #[test]
    fn finds_routes_by_method_then_any() {
        let c = config(
            r#"
            [[routes]]
            match = "GET /signals/{symbol}"
            upstream = "u"
            [[routes]]
            match = "* /signals/{symbol}"
            upstream = "u"
            [[routes]]
            match = "POST /v1/{*rest}"
            upstream = "u"
            "#,
        )
        .expect("valid");
        let r = Router::build(&c.routes).expect("builds");
        assert_eq!(r.find(&Method::GET, "/signals/AAPL"), Some(0));
        assert_eq!(r.find(&Method::DELETE, "/signals/AAPL"), Some(1));
        assert_eq!(r.find(&Method::POST, "/v1/a/b/c"), Some(2));
        assert_eq!(r.find(&Method::GET, "/v1/a"), None);
        assert_eq!(r.find(&Method::GET, "/nope"), None);
    }

    /// The same method and path twice is refused with both route indexes named.
    #[test]
    fn duplicate_routes_are_refused() {
        let e = config(
            r#"
            [[routes]]
            match = "GET /a"
            upstream = "u"
            [[routes]]
            name = "again"
            match = "GET /a"
            upstream = "u"
            "#,
        )
        .expect_err("duplicate");
        assert_eq!(
            e.to_string(),
            "routes[1].match: duplicate route GET /a (routes[0])"
        );
    }
}
