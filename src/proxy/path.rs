//! One price per path: the request target normalised once, before routing, so the route that
//! prices a request and the path the upstream receives are the same string.
//!
//! Rules (RFC 3986 §6.2.2 syntax-based normalisation, plus what proxies refuse):
//! - the target must be origin-form (`/path?query`); anything else is refused;
//! - percent-escapes of unreserved characters (`A–Z a–z 0–9 - . _ ~`) are decoded, every other
//!   escape keeps its byte and gets upper-case hex;
//! - an escaped `/`, `\` or NUL, a raw `\` or `#`, a malformed escape, or a path that is not
//!   UTF-8 is refused: upstreams disagree on what these mean, so no price could be right;
//! - empty segments (`//`) are merged, `.` and `..` segments are resolved; a `..` above the root
//!   is refused;
//! - the query is left exactly as sent.
//!
//! Owns: the normalised form. Must not touch: routes, costs (letter case and trailing slashes are
//! route options, decided by the router).

use std::borrow::Cow;

/// Why a request target was refused. Each maps to the detail of a 400 `invalid-path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Not origin-form: no leading `/` (`GET export/pdf`, absolute-form, `*`).
    NotOriginForm,
    /// `%` not followed by two hex digits, or a path that is not UTF-8.
    BadEscape,
    /// `%2F`, `%5C`, `%00`, a raw `\` or `#`.
    Separator,
    /// A `..` segment that climbs above `/`.
    AboveRoot,
}

impl PathError {
    pub fn detail(self) -> &'static str {
        match self {
            PathError::NotOriginForm => "the request target must be a path starting with '/'",
            PathError::BadEscape => "the path holds a malformed percent-escape or is not UTF-8",
            PathError::Separator => "the path holds an encoded '/', '\\' or NUL, a '\\' or a '#'",
            PathError::AboveRoot => "a '..' segment climbs above the root",
        }
    }
}

/// A normalised request target: `path` is what routing sees and what the upstream receives;
/// `query` is the raw query (without `?`), unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target<'a> {
    pub path: Cow<'a, str>,
    pub query: Option<&'a str>,
}

impl Target<'_> {
    /// The path was rewritten (the upstream must be sent the new one).
    pub fn changed(&self) -> bool {
        matches!(self.path, Cow::Owned(_))
    }
}

/// Normalises a raw request target (the bytes of the request line). Borrows when the path is
/// already normal, which is every path a well-behaved client sends.
pub fn normalize(raw: &[u8]) -> Result<Target<'_>, PathError> {
    let raw = std::str::from_utf8(raw).map_err(|_| PathError::BadEscape)?;
    let (path, query) = match raw.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (raw, None),
    };
    if !path.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    // Fast path: one scan; a path with no escape, no `\`/`#`, no empty or dot segment is normal.
    let b = path.as_bytes();
    let mut plain = true;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'\\' | b'#' => return Err(PathError::Separator),
            b'%' => plain = false,
            b'/' if i > 0 && b[i - 1] == b'/' => plain = false,
            b'.' if b[i - 1] == b'/' => {
                // `/.` starts a dot segment only when the segment is `.` or `..`.
                let rest = &b[i + 1..];
                let seg_end = rest.iter().position(|&x| x == b'/').unwrap_or(rest.len());
                if seg_end == 0 || (seg_end == 1 && rest[0] == b'.') {
                    plain = false;
                }
            }
            _ => {}
        }
    }
    if plain {
        return Ok(Target {
            path: Cow::Borrowed(path),
            query,
        });
    }
    Ok(Target {
        path: Cow::Owned(rewrite(path)?),
        query,
    })
}

/// The slow path: decode, resolve and re-join the segments.
fn rewrite(path: &str) -> Result<String, PathError> {
    let mut segments: Vec<String> = Vec::new();
    let mut trailing = false;
    let raw_segments: Vec<&str> = path[1..].split('/').collect();
    let last = raw_segments.len() - 1;
    for (i, raw) in raw_segments.iter().enumerate() {
        let seg = decode_segment(raw)?;
        match seg.as_str() {
            "" => {
                // `//` merges; a final empty segment is a trailing slash.
                if i == last {
                    trailing = true;
                }
            }
            "." => trailing = i == last,
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing = i == last;
            }
            _ => {
                segments.push(seg);
                trailing = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing || segments.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// Decodes unreserved escapes, upper-cases the others, refuses separators.
fn decode_segment(raw: &str) -> Result<String, PathError> {
    let b = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            // Copy up to the next escape in one go (keeps multi-byte UTF-8 intact).
            let next = raw[i..].find('%').map_or(b.len(), |p| i + p);
            out.push_str(&raw[i..next]);
            i = next;
            continue;
        }
        let hex = |c: u8| (c as char).to_digit(16);
        let (Some(hi), Some(lo)) = (
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadEscape);
        };
        let byte = (hi * 16 + lo) as u8;
        match byte {
            b'/' | b'\\' | 0 => return Err(PathError::Separator),
            b if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') => {
                out.push(b as char)
            }
            b => {
                out.push('%');
                out.push_str(&format!("{b:02X}"));
            }
        }
        i += 3;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> Result<String, PathError> {
        normalize(s.as_bytes()).map(|t| t.to_uri_string())
    }

    impl Target<'_> {
        fn to_uri_string(&self) -> String {
            match self.query {
                Some(q) => format!("{}?{q}", self.path),
                None => self.path.to_string(),
            }
        }
    }

    /// Normal paths are borrowed, not copied: the hot path allocates nothing.
    #[test]
    fn normal_paths_are_borrowed() {
        for p in [
            "/",
            "/signals",
            "/signals/AAPL",
            "/a.b/c..d/.e",
            "/v1/x?y=%2F&z=//",
        ] {
            let t = normalize(p.as_bytes()).expect("normal");
            assert!(!t.changed(), "{p} was rewritten");
            assert_eq!(t.to_uri_string(), p);
        }
    }

    /// Every variant from the report normalises to the one path (or is refused).
    #[test]
    fn variants_normalise_to_one_path() {
        for v in [
            "/export/%70df",
            "/export/%70%64%66",
            "//export/pdf",
            "/./export/pdf",
            "/export/./pdf",
            "/signals/../export/pdf",
            "/signals/history/../../export/pdf",
            "/%65xport/pdf",
            "/export//pdf",
            "/export/x/%2E%2E/pdf",
            "/export/x/%2e./pdf",
        ] {
            assert_eq!(norm(v).as_deref(), Ok("/export/pdf"), "{v}");
        }
        // Trailing slash and case are kept: they are route options, not normalisation.
        assert_eq!(norm("/export/pdf/").as_deref(), Ok("/export/pdf/"));
        assert_eq!(norm("/export/pdf/.").as_deref(), Ok("/export/pdf/"));
        assert_eq!(norm("/export/pdf/x/..").as_deref(), Ok("/export/pdf/"));
        assert_eq!(norm("/EXPORT/PDF").as_deref(), Ok("/EXPORT/PDF"));
        assert_eq!(norm("/..").ok(), None);
        assert_eq!(norm("//").as_deref(), Ok("/"));
        assert_eq!(norm("/a/..").as_deref(), Ok("/"));
    }

    /// Escapes that are not unreserved stay escaped, in upper-case hex; the query is untouched.
    #[test]
    fn other_escapes_are_kept() {
        assert_eq!(norm("/s/a%20b").as_deref(), Ok("/s/a%20b"));
        assert_eq!(norm("/s/%c3%a9").as_deref(), Ok("/s/%C3%A9"));
        assert_eq!(norm("/s/é/./x").as_deref(), Ok("/s/é/x"));
        assert_eq!(norm("//s?q=%2f/..//").as_deref(), Ok("/s?q=%2f/..//"));
    }

    /// What no price can be right for is refused.
    #[test]
    fn refuses_what_upstreams_disagree_on() {
        use PathError::*;
        for (v, e) in [
            ("export/pdf", NotOriginForm),
            ("x:/export/pdf", NotOriginForm),
            ("http://h/export/pdf", NotOriginForm),
            ("*", NotOriginForm),
            ("", NotOriginForm),
            ("/signals/history/..%2F..%2Fexport%2Fpdf", Separator),
            ("/export%5cpdf", Separator),
            ("/export\\pdf", Separator),
            ("/export/pdf%00", Separator),
            ("/export#/pdf", Separator),
            ("/export/%zzpdf", BadEscape),
            ("/export/pdf%4", BadEscape),
            ("/export/pdf%", BadEscape),
            ("/../export/pdf", AboveRoot),
            ("/a/../../export/pdf", AboveRoot),
            ("/%2e%2e/export/pdf", AboveRoot),
        ] {
            assert_eq!(norm(v), Err(e), "{v}");
        }
        assert_eq!(normalize(b"/\xff"), Err(BadEscape));
    }
}
