//! Who is calling: ztunnels authenticate with a bearer token that names
//! their node (`authorization: Bearer <token>`), over TLS.
//!
//! The token file has one `<node> <token>` pair per line (`#` comments);
//! in a cluster it would be a projected service-account token checked with
//! a TokenReview, bound to the pod's node. With no token file the server
//! runs in insecure mode and believes the node a client names; say so
//! explicitly with `--insecure-no-auth`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use tonic::metadata::MetadataMap;
use tonic::Status;

#[derive(Clone, Debug, Default)]
pub struct Auth {
    /// token -> node.
    tokens: HashMap<String, String>,
}

impl Auth {
    pub fn insecure() -> Self {
        Auth::default()
    }

    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        Auth {
            tokens: pairs.into_iter().map(|(node, tok)| (tok, node)).collect(),
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
        Ok(Auth::from_pairs(pairs))
    }

    pub fn is_insecure(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The node the caller authenticated as; `None` in insecure mode.
    #[allow(clippy::result_large_err)]
    pub fn authenticate(&self, md: &MetadataMap) -> Result<Option<String>, Status> {
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
            .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <token>`"))?;
        self.tokens
            .get(tok.trim())
            .cloned()
            .map(Some)
            .ok_or_else(|| Status::unauthenticated("unknown token"))
    }
}
