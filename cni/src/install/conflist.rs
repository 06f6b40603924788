//! Chaining the plugin into the primary CNI's network config.
//!
//! The runtime (containerd, CRI-O, kubelet's rules) uses the lexically
//! first `*.conf`/`*.conflist`/`*.json` file of the conf dir; that is the
//! primary's. We append our entry to its `plugins`, or, for a single-plugin
//! `.conf` (or `.json`), convert it to a `.conflist` of that plugin plus
//! ours (as libcni's `ConfListFromConf` and Istio's install-cni do) and
//! remove the `.conf`. Every write is atomic.
//!
//! The bytes the primary had are kept: on uninstall, if the file is still
//! what we wrote, they are put back as they were (and the `.conf` returns);
//! if the primary rewrote the file meanwhile, only our entry is taken out.
//! A primary that rewrites its file (a CNI agent restarting, an upgrade)
//! drops our entry; [`Chain::reconcile`] notices on its next tick and
//! appends it again.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use serde_json::{Map, Value};

use super::files;

/// Our entry's `type`: the plugin binary's name in the CNI bin dir.
pub const PLUGIN_TYPE: &str = "ztunnel-cni";

/// What we did to the primary's config, to undo it.
struct Chained {
    /// The file we wrote, and its bytes.
    path: PathBuf,
    written: Vec<u8>,
    /// The primary's file before we chained in (the `.conf` when we
    /// converted one), and its bytes.
    original_path: PathBuf,
    original: Vec<u8>,
}

pub struct Chain {
    dir: PathBuf,
    entry: Value,
    chained: Option<Chained>,
}

impl Chain {
    /// `entry` is our plugin's config object, appended to the primary's list.
    pub fn new(dir: PathBuf, entry: Value) -> Self {
        Chain {
            dir,
            entry,
            chained: None,
        }
    }

    /// Makes the primary config carry our entry. `Ok(None)` while there is
    /// no primary config yet; `Ok(Some(path))` names the chained file.
    pub fn reconcile(&mut self) -> anyhow::Result<Option<PathBuf>> {
        let Some(primary) = primary_config(&self.dir)? else {
            return Ok(None);
        };
        let bytes =
            std::fs::read(&primary).with_context(|| format!("reading {}", primary.display()))?;
        if let Some(c) = &self.chained {
            if c.path == primary && c.written == bytes {
                return Ok(Some(primary));
            }
        }
        let (list, path) =
            as_list(&primary, &bytes).with_context(|| primary.display().to_string())?;
        let (without, had_ours) = without_entry(list);
        // A leftover entry (an installer killed before it could clean up)
        // is replaced, and the primary's own config is what remains.
        let original = if had_ours { to_bytes(&without)? } else { bytes };
        let mut with = without;
        plugins_mut(&mut with)?.push(self.entry.clone());
        let written = to_bytes(&with)?;
        // Another file became the primary (a lexically earlier one
        // appeared): leave the old one as it was.
        if self.chained.as_ref().is_some_and(|c| c.path != path) {
            self.uninstall()?;
        }
        files::write_atomic(&path, &written, 0o644)?;
        if path != primary {
            files::remove(&primary)?;
        }
        self.chained = Some(Chained {
            path: path.clone(),
            written,
            original_path: primary,
            original,
        });
        Ok(Some(path))
    }

    /// Takes our entry out again (see the module docs).
    pub fn uninstall(&mut self) -> anyhow::Result<()> {
        let Some(c) = self.chained.take() else {
            return Ok(());
        };
        let bytes = match std::fs::read(&c.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", c.path.display())),
        };
        if bytes == c.written {
            files::write_atomic(&c.original_path, &c.original, 0o644)?;
            if c.original_path != c.path {
                files::remove(&c.path)?;
            }
            return Ok(());
        }
        let (list, _) = as_list(&c.path, &bytes).with_context(|| c.path.display().to_string())?;
        let (without, had_ours) = without_entry(list);
        if had_ours {
            files::write_atomic(&c.path, &to_bytes(&without)?, 0o644)?;
        }
        Ok(())
    }
}

/// The runtime's choice: the lexically first config file, `None` if none.
fn primary_config(dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let is_conf = [".conf", ".conflist", ".json"]
            .iter()
            .any(|ext| name.ends_with(ext));
        if is_conf && !name.starts_with('.') && e.path().is_file() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names.into_iter().next().map(|n| dir.join(n)))
}

/// The config at `path` as a plugin list, and the `.conflist` it belongs
/// in. Like libcni, only a `.conflist` holds a list; a `.conf` or `.json`
/// holds one plugin, which becomes the list's only plugin (keeping its
/// `cniVersion` and `name` for the list).
fn as_list(path: &Path, bytes: &[u8]) -> anyhow::Result<(Map<String, Value>, PathBuf)> {
    let v: Value = serde_json::from_slice(bytes).context("not JSON")?;
    let Value::Object(obj) = v else {
        bail!("not a JSON object");
    };
    if path.extension().is_some_and(|e| e == "conflist") {
        let mut list = obj;
        let plugins = plugins_mut(&mut list)?;
        if let Some(i) = plugins.iter().position(|p| !p.is_object()) {
            bail!("plugins[{i}] is not an object");
        }
        return Ok((list, path.to_path_buf()));
    }
    if !obj.get("type").is_some_and(Value::is_string) {
        bail!("a single-plugin config without a \"type\" (a plugin list belongs in a .conflist)");
    }
    let mut list = Map::new();
    for k in ["cniVersion", "name"] {
        if let Some(v) = obj.get(k) {
            list.insert(k.to_string(), v.clone());
        }
    }
    list.insert("plugins".into(), Value::Array(vec![Value::Object(obj)]));
    Ok((list, path.with_extension("conflist")))
}

fn plugins_mut(list: &mut Map<String, Value>) -> anyhow::Result<&mut Vec<Value>> {
    list.get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| anyhow!("no \"plugins\" array"))
}

/// The list without our entries, and whether there were any.
fn without_entry(mut list: Map<String, Value>) -> (Map<String, Value>, bool) {
    let mut had = false;
    if let Some(Value::Array(plugins)) = list.get_mut("plugins") {
        let before = plugins.len();
        plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
        had = plugins.len() != before;
    }
    (list, had)
}

fn to_bytes(list: &Map<String, Value>) -> anyhow::Result<Vec<u8>> {
    let mut out = serde_json::to_vec_pretty(list)?;
    out.push(b'\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn conf_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let conf = br#"{"cniVersion":"0.3.1","name":"n","type":"bridge"}
"#;
        std::fs::write(dir.path().join("10-x.conf"), conf).unwrap();
        let mut c = Chain::new(dir.path().into(), serde_json::json!({"type": PLUGIN_TYPE}));
        let p = c.reconcile().unwrap().unwrap();
        assert_eq!(p, dir.path().join("10-x.conflist"));
        assert_eq!(c.reconcile().unwrap().unwrap(), p);
        c.uninstall().unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["10-x.conf"]);
        assert_eq!(std::fs::read(dir.path().join("10-x.conf")).unwrap(), conf);
    }

    #[test]
    fn a_new_primary_takes_the_entry_over() {
        let dir = tempfile::tempdir().unwrap();
        let list = br#"{"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "ptp"}]}"#;
        std::fs::write(dir.path().join("20-old.conflist"), list).unwrap();
        let mut c = Chain::new(dir.path().into(), serde_json::json!({"type": PLUGIN_TYPE}));
        c.reconcile().unwrap();
        std::fs::write(dir.path().join("10-new.conflist"), list).unwrap();
        assert_eq!(
            c.reconcile().unwrap().unwrap(),
            dir.path().join("10-new.conflist")
        );
        assert_eq!(
            std::fs::read(dir.path().join("20-old.conflist")).unwrap(),
            list,
            "the old primary is left as it was"
        );
        c.uninstall().unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("10-new.conflist")).unwrap(),
            list
        );
    }
}
