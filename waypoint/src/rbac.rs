//! L7 (and L4) authorization, with Envoy's RBAC filter semantics as Istio
//! uses them: the filters run in order; a matching DENY policy denies; an
//! ALLOW filter denies unless one of its policies matches.
//!
//! A policy matches when any of its permissions (what is asked) and any of
//! its principals (who asks) match. The caller is the peer of the inbound
//! HBONE connection: its SPIFFE identity is the principal.

use http::{HeaderMap, Method, Uri};

use crate::config::matcher::{HeaderMatch, StringMatcher};
use crate::config::model::RbacAction;
use ztunnel::identity::Identity;

#[derive(Clone, Debug)]
pub struct RbacFilter {
    pub action: RbacAction,
    pub policies: Vec<(String, RbacPolicy)>,
}

#[derive(Clone, Debug, Default)]
pub struct RbacPolicy {
    pub permissions: Vec<Permission>,
    pub principals: Vec<Principal>,
}

#[derive(Clone, Debug, Default)]
pub struct Permission {
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<StringMatcher>,
    pub not_paths: Vec<StringMatcher>,
    pub headers: Vec<HeaderMatch>,
    pub destination_ports: Vec<u16>,
}

#[derive(Clone, Debug, Default)]
pub struct Principal {
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
}

/// What a request looks like to authorization. For opaque TCP there is
/// no request: `http` is `None` and only principals and ports count.
pub struct AuthzRequest<'a> {
    pub source: Option<&'a Identity>,
    pub destination_port: u16,
    pub http: Option<(&'a Method, &'a Uri, &'a HeaderMap)>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Why, naming the policy.
    Deny(String),
}

pub fn authorize(filters: &[RbacFilter], req: &AuthzRequest<'_>) -> Decision {
    for f in filters {
        let matched = f.policies.iter().find(|(_, p)| p.matches(req));
        match (f.action, matched) {
            (RbacAction::Deny, Some((name, _))) => {
                return Decision::Deny(format!("denied by DENY policy {name}"))
            }
            (RbacAction::Allow, None) => {
                return Decision::Deny("no ALLOW policy matched".into());
            }
            _ => {}
        }
    }
    Decision::Allow
}

impl RbacPolicy {
    fn matches(&self, req: &AuthzRequest<'_>) -> bool {
        let perm = self.permissions.is_empty() || self.permissions.iter().any(|p| p.matches(req));
        let princ = self.principals.is_empty() || self.principals.iter().any(|p| p.matches(req));
        perm && princ
    }
}

impl Permission {
    fn matches(&self, req: &AuthzRequest<'_>) -> bool {
        if !self.destination_ports.is_empty()
            && !self.destination_ports.contains(&req.destination_port)
        {
            return false;
        }
        let http_fields = !self.methods.is_empty()
            || !self.not_methods.is_empty()
            || !self.paths.is_empty()
            || !self.not_paths.is_empty()
            || !self.headers.is_empty();
        let Some((method, uri, headers)) = req.http else {
            // L7 conditions never match a TCP connection (Istio's rule:
            // such a rule cannot be enforced at L4).
            return !http_fields;
        };
        let path = uri.path();
        let in_list = |l: &[String]| l.iter().any(|m| m.eq_ignore_ascii_case(method.as_str()));
        (self.methods.is_empty() || in_list(&self.methods))
            && !in_list(&self.not_methods)
            && (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(path)))
            && !self.not_paths.iter().any(|p| p.matches(path))
            && self.headers.iter().all(|h| h.matches(method, uri, headers))
    }
}

impl Principal {
    fn matches(&self, req: &AuthzRequest<'_>) -> bool {
        let id = req.source.map(ToString::to_string);
        let ns = req.source.map(|s| s.namespace.as_str());
        let principal_in = |l: &[String]| {
            id.as_deref()
                .is_some_and(|id| l.iter().any(|p| principal_matches(p, id)))
        };
        let ns_in = |l: &[String]| ns.is_some_and(|ns| l.iter().any(|n| n == ns));
        (self.principals.is_empty() || principal_in(&self.principals))
            && !principal_in(&self.not_principals)
            && (self.namespaces.is_empty() || ns_in(&self.namespaces))
            && !ns_in(&self.not_namespaces)
    }
}

/// Istio's principal forms, with or without `spiffe://`: exact,
/// `prefix*`, `*suffix`, `*`.
fn principal_matches(pattern: &str, id: &str) -> bool {
    let id = id.strip_prefix("spiffe://").unwrap_or(id);
    let pattern = pattern.strip_prefix("spiffe://").unwrap_or(pattern);
    if pattern == "*" {
        true
    } else if let Some(p) = pattern.strip_suffix('*') {
        id.starts_with(p)
    } else if let Some(s) = pattern.strip_prefix('*') {
        id.ends_with(s)
    } else {
        id == pattern
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn principals() {
        let id = "spiffe://cluster.local/ns/a/sa/b";
        assert!(principal_matches("cluster.local/ns/a/sa/b", id));
        assert!(principal_matches("cluster.local/ns/a/*", id));
        assert!(principal_matches("*/sa/b", id));
        assert!(principal_matches("*", id));
        assert!(!principal_matches("cluster.local/ns/x/sa/b", id));
    }

    #[test]
    fn deny_then_allow() {
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let deny = RbacFilter {
            action: RbacAction::Deny,
            policies: vec![(
                "no-admin".into(),
                RbacPolicy {
                    permissions: vec![Permission {
                        paths: vec![StringMatcher {
                            kind: crate::config::matcher::StringMatch::Prefix("/admin".into()),
                            ignore_case: false,
                        }],
                        ..Default::default()
                    }],
                    principals: vec![],
                },
            )],
        };
        let h = HeaderMap::new();
        let (admin, public): (Uri, Uri) =
            ("/admin/x?a=1".parse().unwrap(), "/public".parse().unwrap());
        let req = |u| AuthzRequest {
            source: Some(&id),
            destination_port: 80,
            http: Some((&Method::GET, u, &h)),
        };
        let filters = [deny];
        assert!(matches!(
            authorize(&filters, &req(&admin)),
            Decision::Deny(_)
        ));
        assert_eq!(authorize(&filters, &req(&public)), Decision::Allow);
    }

    /// Istio writes `to.operation.hosts` as an `:authority` header match:
    /// HTTP/2 carries it in the URI, HTTP/1.1 as `Host`.
    #[test]
    fn hosts_match_the_authority() {
        use crate::config::matcher::{StringMatch, ValueMatch};
        let deny = RbacFilter {
            action: RbacAction::Deny,
            policies: vec![(
                "no-admin-host".into(),
                RbacPolicy {
                    permissions: vec![Permission {
                        headers: vec![HeaderMatch {
                            name: ":authority".into(),
                            value: ValueMatch::String(StringMatcher {
                                kind: StringMatch::Prefix("admin.example.com".into()),
                                ignore_case: true,
                            }),
                            invert: false,
                        }],
                        ..Default::default()
                    }],
                    principals: vec![],
                },
            )],
        };
        let filters = [deny];
        let decide = |uri: &str, host: Option<&str>| {
            let uri: Uri = uri.parse().unwrap();
            let mut h = HeaderMap::new();
            if let Some(host) = host {
                h.insert(http::header::HOST, host.parse().unwrap());
            }
            authorize(
                &filters,
                &AuthzRequest {
                    source: None,
                    destination_port: 80,
                    http: Some((&Method::GET, &uri, &h)),
                },
            )
        };
        assert!(matches!(
            decide("/", Some("Admin.example.com")),
            Decision::Deny(_)
        ));
        assert!(matches!(
            decide("http://admin.example.com:8080/x", None),
            Decision::Deny(_)
        ));
        assert_eq!(decide("/", Some("shop.example.com")), Decision::Allow);
        assert_eq!(decide("http://shop.example.com/", None), Decision::Allow);
    }
}
