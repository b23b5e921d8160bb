//! Routing: `(method, path)` → the configured route, via one radix tree (matchit) per method plus
//! one for `*`. Built once per config version; lookups of a path some route matches allocate
//! nothing. A path that only routes of other methods match is [`Found::MethodNotAllowed`] (405,
//! with those methods in `Allow`), not a miss.
//!
//! Owns: the `"METHOD /path/{param}"` match syntax and conflict detection. Must not touch: costs,
//! plans or anything per customer (a route is found before we know who is calling).

use crate::config::Route;
use http::Method;

/// The methods a route may name, in the order `Allow` lists them.
const KNOWN: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT",
];

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
    by_method: Vec<(Method, Tree)>,
    any: Tree,
}

/// One method's routes: as written, and folded (lower case, no trailing slash) to find a path
/// that differs from a route only in case or trailing slash.
#[derive(Debug, Clone, Default)]
struct Tree {
    exact: matchit::Router<usize>,
    /// Route index and whether its pattern ends in `/`.
    folded: matchit::Router<(usize, bool)>,
}

/// What a lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    Route(usize),
    /// The path differs from this route only in letter case or a trailing slash, and the route
    /// does not accept that difference. A lenient upstream would serve it as this route, so it
    /// must never be forwarded unmetered.
    NearMiss(usize),
    /// No route of this method (nor `*`) matches the path, but a route of another method does
    /// (as that route matches paths): the path is known, the method is not. [`Router::allow`]
    /// names the methods.
    MethodNotAllowed,
    None,
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
                        router.by_method.push((m.clone(), Tree::default()));
                        let last = router.by_method.len() - 1;
                        &mut router.by_method[last].1
                    }
                },
            };
            if let Err(e) = tree.exact.insert(r.spec.path.clone(), i) {
                let msg = match e {
                    matchit::InsertError::Conflict { with } => {
                        let other = other_route(routes, r, |o| o.spec.path == with);
                        if with == r.spec.path {
                            format!("duplicate route {}{other}", r.spec)
                        } else {
                            format!("{} conflicts with {with:?}{other}", r.spec)
                        }
                    }
                    other => format!("invalid path {:?}: {other}", r.spec.path),
                };
                conflicts.push((i, msg));
                continue;
            }
            let pattern = &r.spec.path;
            let trailing = pattern.len() > 1 && pattern.ends_with('/');
            if tree
                .folded
                .insert(fold(pattern).into_owned(), (i, trailing))
                .is_err()
                && (!r.case_sensitive || r.ignore_trailing_slash)
            {
                // Two routes that fold to one path: which one a folded path means is ambiguous
                // only when this one asks to match folded paths.
                let other = other_route(routes, r, |o| fold(&o.spec.path) == fold(pattern));
                conflicts.push((
                    i,
                    format!(
                        "{} differs from another route only in letter case or trailing slash{other}; \
                         it cannot also set case_sensitive = false or trailing_slash = \"ignore\"",
                        r.spec
                    ),
                ));
            }
        }
        if conflicts.is_empty() {
            Ok(router)
        } else {
            Err(conflicts)
        }
    }

    /// The route for a request's normalised path: method-specific routes first, then `*` routes;
    /// then, when neither matches as written, the route it matches folded (case, trailing
    /// slash), which is a match when that route accepts the difference. When nothing of this
    /// method matches at all, a route of another method matching the path makes it
    /// [`Found::MethodNotAllowed`].
    pub fn find(&self, routes: &[Route], method: &Method, path: &str) -> Found {
        let tree = self
            .by_method
            .iter()
            .find(|(m, _)| m == method)
            .map(|(_, t)| t);
        match lookup(routes, [tree, Some(&self.any)], path) {
            Found::None if self.methods_matching(routes, path).next().is_some() => {
                Found::MethodNotAllowed
            }
            found => found,
        }
    }

    /// The `Allow` value for a [`Found::MethodNotAllowed`] path: every method with a route that
    /// matches it (as [`Router::find`] would), comma-separated in a fixed order.
    pub fn allow(&self, routes: &[Route], path: &str) -> String {
        let mut methods: Vec<&str> = self
            .methods_matching(routes, path)
            .map(Method::as_str)
            .collect();
        methods.sort_by_key(|m| KNOWN.iter().position(|k| k == m));
        methods.join(", ")
    }

    /// The methods with a route of their own that matches `path`.
    fn methods_matching<'r>(
        &'r self,
        routes: &'r [Route],
        path: &'r str,
    ) -> impl Iterator<Item = &'r Method> + 'r {
        self.by_method
            .iter()
            .filter(move |(_, t)| matches!(lookup(routes, [Some(t), None], path), Found::Route(_)))
            .map(|(m, _)| m)
    }
}

/// [`Router::find`] in `trees` (a method's tree, then `*`'s), without the 405 check.
fn lookup(routes: &[Route], trees: [Option<&Tree>; 2], path: &str) -> Found {
    for t in trees.iter().flatten() {
        if let Ok(m) = t.exact.at(path) {
            return Found::Route(*m.value);
        }
    }
    let folded = fold(path);
    for t in trees.iter().flatten() {
        let Ok(m) = t.folded.at(&folded) else {
            continue;
        };
        let (i, pattern_trailing) = *m.value;
        let r = &routes[i];
        let path_trailing = path.len() > 1 && path.ends_with('/');
        let slash_differs = path_trailing != pattern_trailing;
        // With the slash made like the pattern's, does the path match as written?
        let same_slash: std::borrow::Cow<str> = match (path_trailing, pattern_trailing) {
            (true, false) => path[..path.len() - 1].into(),
            (false, true) => format!("{path}/").into(),
            _ => path.into(),
        };
        let case_differs = t.exact.at(&same_slash).map(|m| *m.value) != Ok(i);
        let accepted =
            (!slash_differs || r.ignore_trailing_slash) && (!case_differs || !r.case_sensitive);
        return if accepted {
            Found::Route(i)
        } else {
            Found::NearMiss(i)
        };
    }
    Found::None
}

/// A path folded for the loose lookup: ASCII lower case, no trailing slash (except `/`).
fn fold(path: &str) -> std::borrow::Cow<'_, str> {
    let p = if path.len() > 1 {
        path.strip_suffix('/').unwrap_or(path)
    } else {
        path
    };
    if p.bytes().any(|b| b.is_ascii_uppercase()) {
        p.to_ascii_lowercase().into()
    } else {
        p.into()
    }
}

/// `" (routes[j])"` for the first other route with the same method that `is` picks.
fn other_route(routes: &[Route], r: &Route, is: impl Fn(&Route) -> bool) -> String {
    routes
        .iter()
        .position(|o| o.spec.method == r.spec.method && !std::ptr::eq(o, r) && is(o))
        .map(|j| format!(" (routes[{j}])"))
        .unwrap_or_default()
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
        let find = |m: Method, p: &str| r.find(&c.routes, &m, p);
        assert_eq!(find(Method::GET, "/signals/AAPL"), Found::Route(0));
        assert_eq!(find(Method::DELETE, "/signals/AAPL"), Found::Route(1));
        assert_eq!(find(Method::POST, "/v1/a/b/c"), Found::Route(2));
        assert_eq!(find(Method::GET, "/v1/a"), Found::MethodNotAllowed);
        assert_eq!(find(Method::GET, "/nope"), Found::None);
    }

    /// A path that only routes of other methods match is a wrong method, not a miss, and
    /// `Allow` names exactly those methods (as each route matches: params, case options), in
    /// a fixed order; a `*` route matches every method, so it is never a wrong method.
    #[test]
    fn wrong_method_on_a_known_path() {
        let c = config(
            r#"
            [[routes]]
            match = "POST /signals/{symbol}"
            upstream = "u"
            [[routes]]
            match = "GET /signals/{symbol}"
            upstream = "u"
            case_sensitive = false
            [[routes]]
            match = "DELETE /signals/AAPL"
            upstream = "u"
            [[routes]]
            match = "* /health"
            upstream = "u"
            "#,
        )
        .expect("valid");
        let r = Router::build(&c.routes).expect("builds");
        let find = |m: Method, p: &str| r.find(&c.routes, &m, p);
        assert_eq!(find(Method::PUT, "/signals/AAPL"), Found::MethodNotAllowed);
        assert_eq!(r.allow(&c.routes, "/signals/AAPL"), "GET, POST, DELETE");
        assert_eq!(r.allow(&c.routes, "/signals/msft"), "GET, POST");
        // Only the case-insensitive GET route takes this spelling (to POST it is a near miss).
        assert_eq!(find(Method::POST, "/SIGNALS/msft"), Found::NearMiss(0));
        assert_eq!(find(Method::PUT, "/SIGNALS/msft"), Found::MethodNotAllowed);
        assert_eq!(r.allow(&c.routes, "/SIGNALS/msft"), "GET");
        assert_eq!(find(Method::GET, "/SIGNALS/msft"), Found::Route(1));
        assert_eq!(find(Method::PATCH, "/health"), Found::Route(3));
        assert_eq!(find(Method::PUT, "/signals"), Found::None);
        assert_eq!(find(Method::PUT, "/other"), Found::None);
    }

    /// Case and trailing slash are exact by default: a path that differs from a route only in
    /// those is a near miss (never forwarded unmetered); a route can accept either difference.
    #[test]
    fn case_and_trailing_slash_are_route_options() {
        let c = config(
            r#"
            [[routes]]
            match = "GET /export/pdf"
            upstream = "u"
            [[routes]]
            match = "GET /signals/{symbol}"
            upstream = "u"
            case_sensitive = false
            [[routes]]
            match = "GET /reports/"
            upstream = "u"
            trailing_slash = "ignore"
            [[routes]]
            match = "* /Mixed"
            upstream = "u"
            case_sensitive = false
            trailing_slash = "ignore"
            "#,
        )
        .expect("valid");
        let r = Router::build(&c.routes).expect("builds");
        let find = |p: &str| r.find(&c.routes, &Method::GET, p);
        assert_eq!(find("/export/pdf"), Found::Route(0));
        assert_eq!(find("/EXPORT/PDF"), Found::NearMiss(0));
        assert_eq!(find("/export/pdf/"), Found::NearMiss(0));
        assert_eq!(find("/Export/Pdf/"), Found::NearMiss(0));
        assert_eq!(find("/SIGNALS/aapl"), Found::Route(1));
        assert_eq!(find("/signals/aapl/"), Found::NearMiss(1));
        assert_eq!(find("/reports/"), Found::Route(2));
        assert_eq!(find("/reports"), Found::Route(2));
        assert_eq!(find("/Reports"), Found::NearMiss(2));
        assert_eq!(find("/mixed/"), Found::Route(3));
        assert_eq!(find("/MIXED"), Found::Route(3));
        assert_eq!(find("/other"), Found::None);
    }

    /// Two routes that fold to the same path cannot ask to match folded paths.
    #[test]
    fn folded_twins_cannot_be_loose() {
        let e = config(
            r#"
            [[routes]]
            match = "GET /a"
            upstream = "u"
            [[routes]]
            match = "GET /A"
            upstream = "u"
            case_sensitive = false
            "#,
        )
        .expect_err("ambiguous");
        assert!(
            e.to_string().starts_with(
                "routes[1].match: GET /A differs from another route only in letter case or trailing slash (routes[0])"
            ),
            "{e}"
        );
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
