//! Compiled string, header and query-parameter matchers (Envoy's
//! `StringMatcher`, `HeaderMatcher`, `QueryParameterMatcher`).

use http::HeaderMap;
use regex::Regex;

/// One way of matching a string. Regexes match the whole value, as
/// Envoy's `safe_regex` does.
#[derive(Clone, Debug)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(Regex),
}

#[derive(Clone, Debug)]
pub struct StringMatcher {
    pub kind: StringMatch,
    pub ignore_case: bool,
}

impl StringMatcher {
    pub fn matches(&self, value: &str) -> bool {
        let lowered;
        let (value, pat_lower) = if self.ignore_case {
            lowered = value.to_ascii_lowercase();
            (lowered.as_str(), true)
        } else {
            (value, false)
        };
        let norm = |p: &str| {
            if pat_lower {
                p.to_ascii_lowercase()
            } else {
                p.to_string()
            }
        };
        match &self.kind {
            StringMatch::Exact(p) => value == norm(p),
            StringMatch::Prefix(p) => value.starts_with(&norm(p)),
            StringMatch::Suffix(p) => value.ends_with(&norm(p)),
            StringMatch::Contains(p) => value.contains(&norm(p)),
            StringMatch::Regex(r) => r.is_match(value),
        }
    }
}

/// Compiles a regex anchored at both ends.
pub fn full_regex(pattern: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:{pattern})$"))
}

#[derive(Clone, Debug)]
pub enum ValueMatch {
    Present(bool),
    String(StringMatcher),
}

/// A header condition; several values of one header are joined with `,`
/// before matching, as Envoy does. The pseudo-headers are the request's
/// own: `:method`, `:authority` (the URI's, else `Host`, which is where
/// HTTP/1.1 carries it), `:path` (with the query) and `:scheme`. Istio
/// writes an AuthorizationPolicy's `hosts` as an `:authority` match.
#[derive(Clone, Debug)]
pub struct HeaderMatch {
    pub name: String,
    pub value: ValueMatch,
    pub invert: bool,
}

impl HeaderMatch {
    pub fn matches(&self, method: &http::Method, uri: &http::Uri, headers: &HeaderMap) -> bool {
        let value: Option<String> = match self.name.as_str() {
            ":method" => Some(method.as_str().to_string()),
            ":authority" | "host" => {
                uri.authority().map(|a| a.as_str().to_string()).or_else(|| {
                    headers
                        .get(http::header::HOST)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                })
            }
            ":path" => uri.path_and_query().map(|p| p.as_str().to_string()),
            ":scheme" => Some(uri.scheme_str().unwrap_or("http").to_string()),
            name => {
                let vals: Vec<&str> = headers
                    .get_all(name)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                (!vals.is_empty()).then(|| vals.join(","))
            }
        };
        let m = match (&self.value, value) {
            (ValueMatch::Present(want), v) => v.is_some() == *want,
            (ValueMatch::String(s), Some(v)) => s.matches(&v),
            (ValueMatch::String(_), None) => false,
        };
        m != self.invert
    }
}

#[derive(Clone, Debug)]
pub struct QueryMatch {
    pub name: String,
    pub value: ValueMatch,
}

impl QueryMatch {
    pub fn matches(&self, query: Option<&str>) -> bool {
        let found = query
            .unwrap_or("")
            .split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
            .find(|(k, _)| *k == self.name)
            .map(|(_, v)| v);
        match (&self.value, found) {
            (ValueMatch::Present(want), f) => f.is_some() == *want,
            (ValueMatch::String(s), Some(v)) => s.matches(v),
            (ValueMatch::String(_), None) => false,
        }
    }
}
