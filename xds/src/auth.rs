//! Who is calling. Clients (ztunnels, waypoints) send a bearer token
//! (`authorization: Bearer <token>`) over TLS; the token says which node
//! the caller runs on and whether it is a node agent or a workload:
//!
//! - **Token file** (`--tokens`): one `<node> <token>` pair per line (`#`
//!   comments). Every holder is the node agent of its node. A file with
//!   no pairs is an error, not "no authentication": only
//!   `--insecure-no-auth` turns it off.
//! - **TokenReview** (`--token-review`, feature `kube`): the caller's
//!   projected service-account token is checked with the Kubernetes API
//!   (`authentication.k8s.io/v1` TokenReview, audience `istio-ca` by
//!   default). A token bound to a pod carries the pod's node
//!   (`authentication.kubernetes.io/node-name`, Kubernetes >= 1.30). A
//!   service account listed in `--trusted-node-accounts` (Istio's
//!   `CA_TRUSTED_NODE_ACCOUNTS`, `istio-system/ztunnel`) is the node
//!   agent of that node; any other is a workload that may only ask for
//!   its own identity. Reviews are cached for a minute, so a reconnecting
//!   fleet does not make one API call per stream.
//! - **Insecure** (`--insecure-no-auth`): the server believes the node a
//!   client names.

use std::collections::HashMap;
use std::path::Path;
#[cfg(feature = "kube")]
use std::sync::Arc;

use anyhow::{bail, Context};
use tonic::metadata::MetadataMap;
use tonic::Status;

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The node it runs on.
    pub node: String,
    /// `None`: the node's agent (a ztunnel), which asks for certificates
    /// on behalf of the pods on its node. `Some`: a workload (a waypoint)
    /// with this SPIFFE identity, which may only ask for its own.
    pub identity: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Auth {
    how: How,
}

#[derive(Clone, Debug, Default)]
enum How {
    #[default]
    Insecure,
    /// token -> node.
    Tokens(HashMap<String, String>),
    #[cfg(feature = "kube")]
    TokenReview(Arc<review::Reviewer>),
}

impl Auth {
    pub fn insecure() -> Self {
        Auth::default()
    }

    /// `(node, token)` pairs. Never insecure: with no pairs nobody gets
    /// in (only [`Auth::insecure`] believes callers unchecked).
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        let tokens: HashMap<_, _> = pairs.into_iter().map(|(node, tok)| (tok, node)).collect();
        Auth {
            how: How::Tokens(tokens),
        }
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading token file {}", path.display()))?;
        let mut pairs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(node), Some(tok), None) => pairs.push((node.to_string(), tok.to_string())),
                _ => bail!("{}:{}: expected `<node> <token>`", path.display(), i + 1),
            }
        }
        if pairs.is_empty() {
            // A file emptied by mistake must not turn authentication off.
            bail!(
                "token file {} holds no `<node> <token>` lines; \
                 use --insecure-no-auth to run without authentication",
                path.display()
            );
        }
        Ok(Auth::from_pairs(pairs))
    }

    /// Kubernetes TokenReview through `client` (see the module docs).
    #[cfg(feature = "kube")]
    pub fn token_review(
        client: kube::Client,
        audience: String,
        trusted_node_accounts: Vec<String>,
        trust_domain: String,
    ) -> Self {
        Auth {
            how: How::TokenReview(Arc::new(review::Reviewer::new(
                client,
                audience,
                trusted_node_accounts,
                trust_domain,
            ))),
        }
    }

    pub fn is_insecure(&self) -> bool {
        matches!(self.how, How::Insecure)
    }

    /// Who the caller is; `None` in insecure mode.
    pub async fn authenticate(&self, md: &MetadataMap) -> Result<Option<Caller>, Status> {
        if self.is_insecure() {
            return Ok(None);
        }
        let header = md
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing authorization: Bearer <token>"))?
            .to_str()
            .map_err(|_| Status::unauthenticated("authorization header is not text"))?;
        let tok = header
            .strip_prefix("Bearer ")
            .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <token>`"))?
            .trim();
        match &self.how {
            How::Insecure => Ok(None),
            How::Tokens(tokens) => tokens
                .get(tok)
                .map(|node| {
                    Some(Caller {
                        node: node.clone(),
                        identity: None,
                    })
                })
                .ok_or_else(|| Status::unauthenticated("unknown token")),
            #[cfg(feature = "kube")]
            How::TokenReview(r) => r.review(tok).await.map(Some),
        }
    }
}

#[cfg(feature = "kube")]
mod review {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
    use kube::api::{Api, PostParams};
    use tonic::Status;
    use tracing::warn;

    use super::Caller;

    /// How long a successful review is believed.
    const CACHE_TTL: Duration = Duration::from_secs(60);
    /// Reviews kept at most; the cache is emptied when full.
    const CACHE_MAX: usize = 10_000;
    /// The extra field a pod-bound token's review carries its node in.
    const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

    pub struct Reviewer {
        client: kube::Client,
        audience: String,
        /// `namespace/service-account` of node agents.
        node_accounts: Vec<String>,
        trust_domain: String,
        cache: Mutex<HashMap<String, (Caller, Instant)>>,
    }

    impl std::fmt::Debug for Reviewer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Reviewer")
                .field("audience", &self.audience)
                .field("node_accounts", &self.node_accounts)
                .finish_non_exhaustive()
        }
    }

    impl Reviewer {
        pub fn new(
            client: kube::Client,
            audience: String,
            node_accounts: Vec<String>,
            trust_domain: String,
        ) -> Self {
            Reviewer {
                client,
                audience,
                node_accounts,
                trust_domain,
                cache: Mutex::new(HashMap::new()),
            }
        }

        pub async fn review(&self, token: &str) -> Result<Caller, Status> {
            if let Some(c) = self.cached(token) {
                return Ok(c);
            }
            let tr = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.to_string()),
                    audiences: Some(vec![self.audience.clone()]),
                },
                ..Default::default()
            };
            let done = Api::<TokenReview>::all(self.client.clone())
                .create(&PostParams::default(), &tr)
                .await
                .map_err(|e| {
                    warn!(error = %e, "TokenReview failed");
                    Status::unavailable(format!("cannot review the token: {e}"))
                })?;
            let caller = self.caller(done)?;
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
            cache.insert(token.to_string(), (caller.clone(), Instant::now()));
            Ok(caller)
        }

        fn cached(&self, token: &str) -> Option<Caller> {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache
                .get(token)
                .filter(|(_, at)| at.elapsed() < CACHE_TTL)
                .map(|(c, _)| c.clone())
        }

        /// The caller a finished review describes.
        #[allow(clippy::result_large_err)]
        fn caller(&self, done: TokenReview) -> Result<Caller, Status> {
            let st = done.status.unwrap_or_default();
            if st.authenticated != Some(true) {
                return Err(Status::unauthenticated(format!(
                    "token rejected by the Kubernetes API: {}",
                    st.error.as_deref().unwrap_or("not authenticated")
                )));
            }
            if !st
                .audiences
                .as_ref()
                .is_none_or(|a| a.contains(&self.audience))
            {
                return Err(Status::unauthenticated(format!(
                    "token is not for audience {:?}",
                    self.audience
                )));
            }
            let user = st.user.unwrap_or_default();
            let name = user.username.unwrap_or_default();
            let Some((ns, sa)) = name
                .strip_prefix("system:serviceaccount:")
                .and_then(|r| r.split_once(':'))
            else {
                return Err(Status::unauthenticated(format!(
                    "token is for {name:?}, not a service account"
                )));
            };
            let node = user
                .extra
                .as_ref()
                .and_then(|e| e.get(NODE_NAME_EXTRA))
                .and_then(|v| v.first())
                .filter(|n| !n.is_empty())
                .ok_or_else(|| {
                    Status::unauthenticated(format!(
                        "token of {ns}/{sa} is not bound to a pod on a node (needs a projected \
                         service-account token, Kubernetes >= 1.30)"
                    ))
                })?;
            let account = format!("{ns}/{sa}");
            let identity = (!self.node_accounts.contains(&account))
                .then(|| format!("spiffe://{}/ns/{ns}/sa/{sa}", self.trust_domain));
            Ok(Caller {
                node: node.clone(),
                identity,
            })
        }
    }

    #[cfg(test)]
    mod tests {
        #![allow(clippy::unwrap_used)]
        use std::convert::Infallible;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;

        use bytes::Bytes;
        use http_body_util::{BodyExt, Full};
        use hyper::service::service_fn;
        use hyper_util::rt::{TokioExecutor, TokioIo};
        use tonic::Code;

        use super::*;

        /// A Kubernetes API that reviews tokens: `ztunnel-<node>` is
        /// istio-system/ztunnel on that node, `wp` demo/wp on node-b,
        /// `unbound` a token without a node, `down` makes it answer 500;
        /// anything else is not authenticated. Counts the reviews.
        async fn api_server() -> (String, Arc<AtomicUsize>) {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", l.local_addr().unwrap());
            let hits = Arc::new(AtomicUsize::new(0));
            let h = hits.clone();
            tokio::spawn(async move {
                loop {
                    let (s, _) = l.accept().await.unwrap();
                    let h = h.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                            let h = h.clone();
                            async move {
                                h.fetch_add(1, Ordering::SeqCst);
                                let path = req.uri().path().to_string();
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let tr: serde_json::Value = serde_json::from_slice(&body).unwrap();
                                let tok = tr["spec"]["token"].as_str().unwrap_or("").to_string();
                                let aud = tr["spec"]["audiences"][0].as_str().unwrap().to_string();
                                let user = |ns: &str, sa: &str, node: Option<&str>| {
                                    let mut u = serde_json::json!({
                                        "username": format!("system:serviceaccount:{ns}:{sa}"),
                                    });
                                    if let Some(n) = node {
                                        u["extra"] = serde_json::json!({ NODE_NAME_EXTRA: [n] });
                                    }
                                    serde_json::json!({
                                        "authenticated": true, "user": u, "audiences": [aud],
                                    })
                                };
                                let status = if let Some(n) = tok.strip_prefix("ztunnel-") {
                                    user("istio-system", "ztunnel", Some(n))
                                } else if tok == "wp" {
                                    user("demo", "wp", Some("node-b"))
                                } else if tok == "unbound" {
                                    user("demo", "job", None)
                                } else {
                                    serde_json::json!({"authenticated": false, "error": "invalid bearer token"})
                                };
                                let code = if tok == "down" { 500 } else { 201 };
                                assert_eq!(path, "/apis/authentication.k8s.io/v1/tokenreviews");
                                let out = serde_json::json!({
                                    "apiVersion": "authentication.k8s.io/v1",
                                    "kind": "TokenReview",
                                    "spec": tr["spec"],
                                    "status": status,
                                });
                                Ok::<_, Infallible>(
                                    hyper::Response::builder()
                                        .status(code)
                                        .header("content-type", "application/json")
                                        .body(Full::new(Bytes::from(out.to_string())))
                                        .unwrap(),
                                )
                            }
                        });
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(s), svc)
                            .await;
                    });
                }
            });
            (url, hits)
        }

        async fn reviewer() -> (Reviewer, Arc<AtomicUsize>) {
            let (url, hits) = api_server().await;
            let cfg = kube::Config::new(url.parse().unwrap());
            let client = kube::Client::try_from(cfg).unwrap();
            let r = Reviewer::new(
                client,
                "istio-ca".into(),
                vec!["istio-system/ztunnel".into()],
                "cluster.local".into(),
            );
            (r, hits)
        }

        #[tokio::test]
        async fn node_agents_workloads_and_refusals() {
            let (r, hits) = reviewer().await;
            assert_eq!(
                r.review("ztunnel-node-a").await.unwrap(),
                Caller {
                    node: "node-a".into(),
                    identity: None
                }
            );
            assert_eq!(
                r.review("wp").await.unwrap(),
                Caller {
                    node: "node-b".into(),
                    identity: Some("spiffe://cluster.local/ns/demo/sa/wp".into())
                }
            );
            // Cached: no second API call.
            let n = hits.load(Ordering::SeqCst);
            r.review("ztunnel-node-a").await.unwrap();
            assert_eq!(hits.load(Ordering::SeqCst), n);
            let e = r.review("unbound").await.unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated);
            assert!(
                e.message().contains("not bound to a pod"),
                "{}",
                e.message()
            );
            let e = r.review("forged").await.unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated);
            assert!(
                e.message().contains("invalid bearer token"),
                "{}",
                e.message()
            );
            // The API failing is not the caller's fault: UNAVAILABLE, and
            // nothing is cached.
            let e = r.review("down").await.unwrap_err();
            assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
            let n = hits.load(Ordering::SeqCst);
            assert!(r.review("forged").await.is_err());
            assert_eq!(hits.load(Ordering::SeqCst), n + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn md(v: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", v.parse().unwrap());
        m
    }

    #[tokio::test]
    async fn token_file_callers_are_node_agents() {
        let a = Auth::from_pairs([("node-1".to_string(), "s3cret".to_string())]);
        assert_eq!(
            a.authenticate(&md("Bearer s3cret")).await.unwrap(),
            Some(Caller {
                node: "node-1".into(),
                identity: None
            })
        );
        for bad in ["Bearer nope", "Basic s3cret"] {
            let e = a.authenticate(&md(bad)).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad}");
        }
        assert!(a.authenticate(&MetadataMap::new()).await.is_err());
        assert_eq!(
            Auth::insecure()
                .authenticate(&MetadataMap::new())
                .await
                .unwrap(),
            None
        );
    }

    #[test]
    fn a_token_file_without_tokens_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        for text in ["", "\n  \n", "# node-1 s3cret\n  # more\n"] {
            let p = dir.path().join("tokens");
            std::fs::write(&p, text).unwrap();
            let e = format!("{:#}", Auth::load(&p).unwrap_err());
            assert!(e.contains(&p.display().to_string()), "{text:?}: {e}");
            assert!(e.contains("no `<node> <token>`"), "{text:?}: {e}");
        }
        let p = dir.path().join("tokens");
        std::fs::write(&p, "# agents\nnode-1 s3cret\n").unwrap();
        assert!(!Auth::load(&p).unwrap().is_insecure());
    }

    #[tokio::test]
    async fn no_pairs_lets_nobody_in() {
        let a = Auth::from_pairs([]);
        assert!(!a.is_insecure());
        let e = a.authenticate(&md("Bearer anything")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(a.authenticate(&MetadataMap::new()).await.is_err());
    }
}
