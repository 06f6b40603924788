//! The waypoint's configuration: Envoy v3 resources in spirit and in
//! shape (see [`model`] and the README), validated and compiled once per
//! change into the [`runtime::Config`] that the data path reads.
//!
//! - [`model`]: the YAML/xDS-shaped data
//! - [`validate`]: the single gate (also the xDS client's NACK check)
//! - [`runtime`]: the compiled, in-force form
//! - [`matcher`]: string/header/query matchers
//!
//! [`Store`] holds the configuration in force. [`watch_file`] polls a YAML
//! file and swaps a new configuration in when it changes; a file that
//! fails to parse or validate is logged and recorded, and the previous
//! configuration stays in force.

pub mod matcher;
pub mod model;
pub mod runtime;
pub mod validate;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use tracing::{info, warn};

pub use model::Bootstrap;
pub use runtime::Config;
pub use validate::{compile, ConfigError};

/// The configuration in force and the last rejection, if any.
pub struct Store {
    current: ArcSwap<Config>,
    last_error: Mutex<Option<String>>,
    /// False while a configuration source (xDS) has not delivered its
    /// first complete configuration; readiness waits for it.
    synced: AtomicBool,
}

impl Store {
    pub fn new(initial: Config) -> Arc<Self> {
        Arc::new(Store {
            current: ArcSwap::from_pointee(initial),
            last_error: Mutex::new(None),
            synced: AtomicBool::new(true),
        })
    }

    pub fn empty() -> Arc<Self> {
        Self::new(compile(&Bootstrap::default()).expect("the empty config is valid"))
    }

    pub fn get(&self) -> Arc<Config> {
        self.current.load_full()
    }

    /// Validates `b` and puts it in force, or keeps the current one and
    /// returns why not.
    pub fn apply(&self, b: &Bootstrap) -> Result<(), ConfigError> {
        match compile(b) {
            Ok(c) => {
                self.current.store(Arc::new(c));
                *self.last_error.lock().expect("error lock") = None;
                Ok(())
            }
            Err(e) => {
                *self.last_error.lock().expect("error lock") = Some(e.to_string());
                Err(e)
            }
        }
    }

    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    pub fn set_synced(&self, v: bool) {
        self.synced.store(v, Ordering::Release);
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("error lock").clone()
    }
}

/// Reads and parses (not yet validates) a YAML configuration file.
pub fn parse_yaml(text: &str) -> Result<Bootstrap, ConfigError> {
    serde_yaml::from_str(text).map_err(|e| ConfigError {
        path: e
            .location()
            .map(|l| format!("line {} column {}", l.line(), l.column()))
            .unwrap_or_else(|| "document".into()),
        message: e.to_string(),
    })
}

fn load(path: &Path, store: &Store) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let b = parse_yaml(&text).inspect_err(|e| {
        *store.last_error.lock().expect("error lock") = Some(e.to_string());
    })?;
    store.apply(&b)?;
    Ok(())
}

/// Loads `path` (an error here fails start-up, naming the file and field)
/// and polls it every `every`, applying changes.
pub async fn watch_file(path: PathBuf, store: Arc<Store>, every: Duration) -> anyhow::Result<()> {
    load(&path, &store).with_context(|| format!("configuration {}", path.display()))?;
    info!(file = %path.display(), "configuration loaded");
    let mut seen = std::fs::read(&path).ok();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let now = tokio::fs::read(&path).await.ok();
            if now.is_none() || now == seen {
                continue;
            }
            seen = now;
            match load(&path, &store) {
                Ok(()) => info!(file = %path.display(), "configuration reloaded"),
                Err(e) => warn!(
                    file = %path.display(),
                    error = %format!("{e:#}"),
                    "configuration rejected; the previous one stays in force"
                ),
            }
        }
    });
    Ok(())
}
