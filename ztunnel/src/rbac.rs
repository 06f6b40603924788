//! L4 authorization with Istio's semantics.
//!
//! A connection to a workload is checked against every policy that applies
//! to it (global, its namespace's, and those selecting it):
//! any matching DENY denies; otherwise, if ALLOW policies exist, one of
//! them must match; with none, the connection is allowed.
//!
//! A policy matches when any of its rules matches; a rule when all of its
//! clauses match; a clause when any of its matches matches; a match when
//! every field it sets matches (any value of the field) and no value of any
//! `not*` field does. A policy without rules matches nothing, so an ALLOW
//! policy with no rules denies everything, as in Istio.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::identity::Identity;
use crate::state::Workload;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scope {
    Global,
    Namespace,
    WorkloadSelector,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Authorization {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub clauses: Vec<Clause>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Clause {
    pub matches: Vec<Match>,
}

/// One set of conditions. Principals accept Istio's forms: exact,
/// `prefix*`, `*suffix` and `*` (any authenticated peer); with or without
/// the `spiffe://` scheme. Service accounts are `namespace/name`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Match {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_source_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
}

/// The facts about one connection that policy looks at.
#[derive(Clone, Debug)]
pub struct Connection {
    /// `None` for plaintext connections (no verified peer).
    pub src_identity: Option<Identity>,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied, with the reason (the policy that decided, or "no ALLOW
    /// policy matched").
    Deny(String),
}

impl Authorization {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn applies_to(&self, w: &Workload) -> bool {
        match self.scope {
            Scope::Global => true,
            Scope::Namespace => self.namespace == w.namespace,
            Scope::WorkloadSelector => w.authorization_policies.contains(&self.key()),
        }
    }

    pub fn matches(&self, c: &Connection) -> bool {
        self.rules
            .iter()
            .any(|r| !r.clauses.is_empty() && r.clauses.iter().all(|cl| cl.matches_conn(c)))
    }
}

impl Clause {
    fn matches_conn(&self, c: &Connection) -> bool {
        self.matches.iter().any(|m| m.matches(c))
    }
}

fn principal_matches(pattern: &str, id: &Option<Identity>) -> bool {
    let Some(id) = id else { return false };
    let full = id.to_string();
    let principal = full.strip_prefix("spiffe://").unwrap_or(&full);
    let pattern = pattern.strip_prefix("spiffe://").unwrap_or(pattern);
    if pattern == "*" {
        true
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        principal.starts_with(prefix)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        principal.ends_with(suffix)
    } else {
        principal == pattern
    }
}

fn namespace_matches(ns: &str, id: &Option<Identity>) -> bool {
    id.as_ref().is_some_and(|id| id.namespace == ns)
}

fn service_account_matches(sa: &str, id: &Option<Identity>) -> bool {
    id.as_ref().is_some_and(|id| match sa.split_once('/') {
        Some((ns, name)) => id.namespace == ns && id.service_account == name,
        None => id.service_account == sa,
    })
}

/// A positive field matches when empty or when any value matches; a negative
/// field matches when no value matches.
fn field<T>(values: &[T], pred: impl Fn(&T) -> bool) -> bool {
    values.is_empty() || values.iter().any(pred)
}

fn not_field<T>(values: &[T], pred: impl Fn(&T) -> bool) -> bool {
    !values.iter().any(pred)
}

impl Match {
    pub fn matches(&self, c: &Connection) -> bool {
        let id = &c.src_identity;
        field(&self.principals, |p| principal_matches(p, id))
            && not_field(&self.not_principals, |p| principal_matches(p, id))
            && field(&self.namespaces, |n| namespace_matches(n, id))
            && not_field(&self.not_namespaces, |n| namespace_matches(n, id))
            && field(&self.service_accounts, |s| service_account_matches(s, id))
            && not_field(&self.not_service_accounts, |s| {
                service_account_matches(s, id)
            })
            && field(&self.source_ips, |n| n.contains(&c.src_ip))
            && not_field(&self.not_source_ips, |n| n.contains(&c.src_ip))
            && field(&self.destination_ips, |n| n.contains(&c.dst_ip))
            && not_field(&self.not_destination_ips, |n| n.contains(&c.dst_ip))
            && field(&self.destination_ports, |p| *p == c.dst_port)
            && not_field(&self.not_destination_ports, |p| *p == c.dst_port)
    }
}

/// Decides a connection against the policies that apply to its destination.
pub fn authorize<'a>(
    policies: impl IntoIterator<Item = &'a Authorization>,
    c: &Connection,
) -> Decision {
    let mut saw_allow = false;
    let mut allowed = false;
    for p in policies {
        match p.action {
            Action::Deny if p.matches(c) => {
                return Decision::Deny(format!("denied by policy {}", p.key()))
            }
            Action::Deny => {}
            Action::Allow => {
                saw_allow = true;
                allowed = allowed || p.matches(c);
            }
        }
    }
    if saw_allow && !allowed {
        Decision::Deny("no ALLOW policy matched".into())
    } else {
        Decision::Allow
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(sa: Option<&str>, port: u16) -> Connection {
        Connection {
            src_identity: sa.map(|sa| Identity::new("cluster.local", "default", sa)),
            src_ip: "10.0.0.1".parse().unwrap(),
            dst_ip: "10.0.0.2".parse().unwrap(),
            dst_port: port,
        }
    }

    fn policy(action: Action, m: Match) -> Authorization {
        Authorization {
            name: "p".into(),
            namespace: "default".into(),
            scope: Scope::Namespace,
            action,
            rules: vec![Rule {
                clauses: vec![Clause { matches: vec![m] }],
            }],
        }
    }

    #[test]
    fn no_policies_allow() {
        assert_eq!(authorize([], &conn(None, 80)), Decision::Allow);
    }

    #[test]
    fn deny_wins_over_allow() {
        let allow = policy(
            Action::Allow,
            Match {
                principals: vec!["*".into()],
                ..Default::default()
            },
        );
        let deny = policy(
            Action::Deny,
            Match {
                destination_ports: vec![80],
                ..Default::default()
            },
        );
        assert!(matches!(
            authorize([&allow, &deny], &conn(Some("a"), 80)),
            Decision::Deny(_)
        ));
        assert_eq!(
            authorize([&allow, &deny], &conn(Some("a"), 81)),
            Decision::Allow
        );
    }

    #[test]
    fn allow_requires_a_match() {
        let allow = policy(
            Action::Allow,
            Match {
                principals: vec!["cluster.local/ns/default/sa/client".into()],
                ..Default::default()
            },
        );
        assert_eq!(
            authorize([&allow], &conn(Some("client"), 1)),
            Decision::Allow
        );
        assert!(matches!(
            authorize([&allow], &conn(Some("other"), 1)),
            Decision::Deny(_)
        ));
        // Plaintext has no principal.
        assert!(matches!(
            authorize([&allow], &conn(None, 1)),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn negations_and_patterns() {
        let m = Match {
            principals: vec!["spiffe://cluster.local/ns/default/*".into()],
            not_service_accounts: vec!["default/bad".into()],
            not_source_ips: vec!["10.9.0.0/16".parse().unwrap()],
            ..Default::default()
        };
        assert!(m.matches(&conn(Some("good"), 1)));
        assert!(!m.matches(&conn(Some("bad"), 1)));
        let mut c = conn(Some("good"), 1);
        c.src_ip = "10.9.1.1".parse().unwrap();
        assert!(!m.matches(&c));
        let suffix = Match {
            principals: vec!["*/sa/good".into()],
            ..Default::default()
        };
        assert!(suffix.matches(&conn(Some("good"), 1)));
        assert!(!suffix.matches(&conn(Some("bad"), 1)));
    }

    #[test]
    fn empty_allow_policy_denies_all() {
        let mut p = policy(Action::Allow, Match::default());
        p.rules.clear();
        assert!(matches!(
            authorize([&p], &conn(Some("a"), 1)),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn clauses_are_anded() {
        let p = Authorization {
            rules: vec![Rule {
                clauses: vec![
                    Clause {
                        matches: vec![Match {
                            namespaces: vec!["default".into()],
                            ..Default::default()
                        }],
                    },
                    Clause {
                        matches: vec![Match {
                            destination_ports: vec![8080],
                            ..Default::default()
                        }],
                    },
                ],
            }],
            ..policy(Action::Allow, Match::default())
        };
        assert!(p.matches(&conn(Some("x"), 8080)));
        assert!(!p.matches(&conn(Some("x"), 80)));
    }
}
