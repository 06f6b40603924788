//! Request path normalization, as Envoy's HTTP connection manager does it
//! before any filter or route sees the request: the policy and the routes
//! must judge the path the backend will act on. Without it `/x/../admin`,
//! `/%61dmin` or `//admin` would pass a DENY on `/admin` and still reach
//! `/admin` on most servers. Istio turns it on for every proxy
//! (`normalize_path`, its `BASE` default).
//!
//! In Envoy's order: escaped slashes (`%2F`, `%5C`) first, then RFC 3986
//! normalization (`normalize_path`: `\` as `/`, percent-encoded
//! unreserved characters decoded, `.` and `..` segments resolved), then
//! `merge_slashes`. The query is left as it is.

use std::borrow::Cow;

/// `HttpConnectionManager.path_with_escaped_slashes_action`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EscapedSlashes {
    #[default]
    Keep,
    Reject,
    UnescapeAndRedirect,
    UnescapeAndForward,
}

/// What a chain does to request paths.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathNormalization {
    pub normalize: bool,
    pub merge_slashes: bool,
    pub escaped_slashes: EscapedSlashes,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Normalized<'a> {
    /// The path and query to use (unchanged, or rewritten).
    Forward(Cow<'a, str>),
    /// Tell the client to ask again at this path and query (307).
    Redirect(String),
    /// A path that cannot be made safe (400).
    Reject(&'static str),
}

impl PathNormalization {
    pub fn is_noop(&self) -> bool {
        *self == Self::default()
    }

    /// Applies the chain's rules to a request's `path_and_query`.
    pub fn apply<'a>(&self, path_and_query: &'a str) -> Normalized<'a> {
        let (path, query) = match path_and_query.find('?') {
            Some(i) => path_and_query.split_at(i),
            None => (path_and_query, ""),
        };
        // `*` (OPTIONS) and the like are not paths.
        if !path.starts_with('/') {
            return Normalized::Forward(Cow::Borrowed(path_and_query));
        }
        let mut out = Cow::Borrowed(path);
        let mut redirect = false;
        if self.escaped_slashes != EscapedSlashes::Keep && has_escaped_slash(path) {
            match self.escaped_slashes {
                EscapedSlashes::Keep => {}
                EscapedSlashes::Reject => return Normalized::Reject("escaped slash in the path"),
                EscapedSlashes::UnescapeAndForward | EscapedSlashes::UnescapeAndRedirect => {
                    out = Cow::Owned(unescape_slashes(path));
                    redirect = self.escaped_slashes == EscapedSlashes::UnescapeAndRedirect;
                }
            }
        }
        // Most paths have nothing to normalize: no escape, backslash or
        // dot segment. Those skip the rebuild (this runs on every request).
        let plain = !out.contains(['%', '\\']) && !out.contains("/.");
        if self.normalize && !plain {
            match canonical(&out) {
                Some(p) => {
                    if p != out {
                        out = Cow::Owned(p);
                    }
                }
                None => return Normalized::Reject("path cannot be normalized"),
            }
        }
        if self.merge_slashes && out.contains("//") {
            out = Cow::Owned(merge_slashes(&out));
        }
        match out {
            Cow::Borrowed(_) => Normalized::Forward(Cow::Borrowed(path_and_query)),
            Cow::Owned(p) if redirect => Normalized::Redirect(format!("{p}{query}")),
            Cow::Owned(p) => Normalized::Forward(Cow::Owned(format!("{p}{query}"))),
        }
    }
}

fn has_escaped_slash(path: &str) -> bool {
    path.as_bytes().windows(3).any(|w| {
        w[0] == b'%'
            && matches!(
                (w[1], w[2].to_ascii_lowercase()),
                (b'2', b'f') | (b'5', b'c')
            )
    })
}

fn unescape_slashes(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            match (b[i + 1], b[i + 2].to_ascii_lowercase()) {
                (b'2', b'f') => {
                    out.push(b'/');
                    i += 3;
                    continue;
                }
                (b'5', b'c') => {
                    out.push(b'\\');
                    i += 3;
                    continue;
                }
                _ => {}
            }
        }
        out.push(b[i]);
        i += 1;
    }
    // Only ASCII was replaced by ASCII: still UTF-8.
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

fn unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 section 6.2.2 on a path: `\` read as `/`, percent-encoded
/// unreserved characters decoded (other escapes kept, in upper case),
/// then `.` and `..` segments removed (5.2.4), never above the root.
/// `None` for a malformed escape.
fn canonical(path: &str) -> Option<String> {
    let b = path.as_bytes();
    let mut decoded: Vec<u8> = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let (h, l) = (hex(*b.get(i + 1)?)?, hex(*b.get(i + 2)?)?);
                let c = h << 4 | l;
                if unreserved(c) {
                    decoded.push(c);
                } else {
                    decoded.extend([
                        b'%',
                        b[i + 1].to_ascii_uppercase(),
                        b[i + 2].to_ascii_uppercase(),
                    ]);
                }
                i += 3;
            }
            b'\\' => {
                decoded.push(b'/');
                i += 1;
            }
            c => {
                decoded.push(c);
                i += 1;
            }
        }
    }
    // Segments after the leading `/`; a trailing `.` or `..` leaves a
    // trailing slash, as RFC 3986's algorithm does.
    let mut segments: Vec<&[u8]> = Vec::new();
    let parts: Vec<&[u8]> = decoded[1..].split(|c| *c == b'/').collect();
    let last = parts.len() - 1;
    for (n, seg) in parts.iter().enumerate() {
        match *seg {
            b"." | b".." => {
                if *seg == b".." {
                    segments.pop();
                }
                if n == last {
                    segments.push(b"");
                }
            }
            s => segments.push(s),
        }
    }
    let mut out = vec![b'/'];
    out.extend(segments.join(&b'/'));
    // Only ASCII escapes were decoded, to ASCII: still UTF-8.
    Some(String::from_utf8_lossy(&out).into_owned())
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn istio() -> PathNormalization {
        PathNormalization {
            normalize: true,
            ..Default::default()
        }
    }

    fn forward(n: &PathNormalization, p: &str) -> String {
        match n.apply(p) {
            Normalized::Forward(p) => p.into_owned(),
            other => panic!("{p}: {other:?}"),
        }
    }

    #[test]
    fn dot_segments_and_unreserved_escapes() {
        let n = istio();
        for (from, to) in [
            ("/admin", "/admin"),
            ("/x/../admin", "/admin"),
            ("/../../admin", "/admin"),
            ("/./admin/.", "/admin/"),
            ("/a/b/..", "/a/"),
            ("/%61dmin", "/admin"),
            ("/%2e%2E/admin", "/admin"),
            ("/a\\..\\admin", "/admin"),
            ("/a%20b", "/a%20b"),
            ("/a%3fb", "/a%3Fb"),
            ("/x/../admin?q=/../y", "/admin?q=/../y"),
            ("//admin", "//admin"),
            ("/", "/"),
            ("*", "*"),
        ] {
            assert_eq!(forward(&n, from), to, "{from}");
        }
        assert!(matches!(n.apply("/a%zz"), Normalized::Reject(_)));
        assert!(matches!(n.apply("/a%2"), Normalized::Reject(_)));
        // Off: untouched.
        let off = PathNormalization::default();
        assert!(off.is_noop());
        assert_eq!(forward(&off, "/x/../admin"), "/x/../admin");
    }

    #[test]
    fn merge_slashes_and_escaped_slashes() {
        let n = PathNormalization {
            merge_slashes: true,
            ..istio()
        };
        assert_eq!(forward(&n, "//admin///x"), "/admin/x");
        // Escaped slashes are kept by default, and then not path
        // separators.
        assert_eq!(forward(&n, "/a%2fb/../c"), "/c");
        assert_eq!(forward(&n, "/a%2Fb"), "/a%2Fb");
        let reject = PathNormalization {
            escaped_slashes: EscapedSlashes::Reject,
            ..n
        };
        assert!(matches!(reject.apply("/a%2Fb"), Normalized::Reject(_)));
        assert_eq!(forward(&reject, "/a/b"), "/a/b");
        let unescape = PathNormalization {
            escaped_slashes: EscapedSlashes::UnescapeAndForward,
            ..n
        };
        assert_eq!(forward(&unescape, "/x%2F..%2Fadmin"), "/admin");
        assert_eq!(forward(&unescape, "/x%5c..%5cadmin"), "/admin");
        let redirect = PathNormalization {
            escaped_slashes: EscapedSlashes::UnescapeAndRedirect,
            ..n
        };
        assert_eq!(
            redirect.apply("/a%2Fb?q"),
            Normalized::Redirect("/a/b?q".into())
        );
        assert_eq!(forward(&redirect, "/a/b?q"), "/a/b?q");
    }
}
