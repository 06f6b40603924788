//! What one ADS client holds of one type: resource name -> version.
//!
//! A wildcard client that was sent every change holds exactly what a
//! snapshot has. Spelling that out as a map per client and type (12,500
//! entries each, for 100 clients) made the server hash every name for
//! every client on the first sync, and diff against those maps after.
//! Instead the state is a `base`, a snapshot's map of the type (shared with
//! the snapshot, so a pointer), and an `overlay` of where the client
//! differs from it (a named subscription, a resume with
//! `initial_resource_versions`, an unsubscribe). Every question is still
//! answered per resource, exactly as with a plain map; the stream re-bases
//! whenever it knows the client caught up with a snapshot, so a first sync
//! records its state with a pointer and staying in sync is a pointer swap
//! per snapshot.

use std::collections::HashMap;
use std::sync::Arc;

use crate::translate::Named;

#[derive(Default)]
pub(crate) struct Known {
    /// The resources of snapshot `base_generation` the client was in sync
    /// with (`None`: nothing, e.g. a new stream).
    base: Option<Arc<Named>>,
    base_generation: u64,
    /// Where the client differs from `base`: `Some(v)` it holds version
    /// `v`, `None` it holds nothing of that name. Never an entry that
    /// agrees with `base`, so an empty overlay means "exactly `base`".
    overlay: HashMap<Arc<str>, Option<u64>>,
}

impl Known {
    /// What a resuming client says it holds.
    pub fn from_versions(versions: impl Iterator<Item = (Arc<str>, u64)>) -> Known {
        Known {
            base: None,
            base_generation: 0,
            overlay: versions.map(|(k, v)| (k, Some(v))).collect(),
        }
    }

    fn base_version(&self, name: &str) -> Option<u64> {
        self.base.as_ref()?.get(name).map(|r| r.hash)
    }

    /// The version of `name` the client holds.
    pub fn get(&self, name: &str) -> Option<u64> {
        match self.overlay.get(name) {
            Some(v) => *v,
            None => self.base_version(name),
        }
    }

    /// The client now holds `version` of `name`.
    pub fn insert(&mut self, name: Arc<str>, version: u64) {
        if self.base_version(&name) == Some(version) {
            self.overlay.remove(&name);
        } else {
            self.overlay.insert(name, Some(version));
        }
    }

    /// The client no longer holds `name`; whether it did.
    pub fn remove(&mut self, name: &Arc<str>) -> bool {
        let had = self.get(name).is_some();
        if self.base_version(name).is_some() {
            self.overlay.insert(name.clone(), None);
        } else {
            self.overlay.remove(&**name);
        }
        had
    }

    /// Every name the client holds.
    pub fn names(&self) -> impl Iterator<Item = &Arc<str>> {
        let base = self.base.as_deref();
        let from_base = base
            .into_iter()
            .flat_map(|b| b.keys())
            .filter(|k| !matches!(self.overlay.get(*k), Some(None)));
        let only_overlay = self
            .overlay
            .iter()
            .filter(move |(k, v)| v.is_some() && !base.is_some_and(|b| b.contains_key(*k)))
            .map(|(k, _)| k);
        from_base.chain(only_overlay)
    }

    /// Forgets every name `keep` rejects.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        if self.names().all(|n| keep(n)) {
            return;
        }
        let held: HashMap<Arc<str>, Option<u64>> = self
            .names()
            .filter(|n| keep(n))
            .map(|n| (n.clone(), self.get(n)))
            .collect();
        self.base = None;
        self.overlay = held;
    }

    /// Whether the client holds exactly `base` of snapshot `generation`.
    pub fn in_sync_with(&self, generation: u64) -> bool {
        self.base.is_some() && self.base_generation == generation && self.overlay.is_empty()
    }

    /// The client holds exactly `res`, snapshot `generation`'s resources.
    pub fn rebase(&mut self, res: Arc<Named>, generation: u64) {
        self.base = Some(res);
        self.base_generation = generation;
        self.overlay = HashMap::new();
    }

    /// Everything the client holds, when that is exactly a base map
    /// (`None`: the overlay has entries; an empty map: holds nothing).
    pub fn as_base(&self) -> Option<&Named> {
        static EMPTY: Named = Named::new();
        if !self.overlay.is_empty() {
            return None;
        }
        Some(self.base.as_deref().unwrap_or(&EMPTY))
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.names().count()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::translate::Resource;

    fn snapshot(entries: &[(&str, u64)]) -> Arc<Named> {
        Arc::new(
            entries
                .iter()
                .map(|(n, h)| {
                    let name: Arc<str> = Arc::from(*n);
                    let r = Resource {
                        name: name.clone(),
                        hash: *h,
                        type_url: "t",
                        value: Default::default(),
                        any: Default::default(),
                        delta: Default::default(),
                    };
                    (name, Arc::new(r))
                })
                .collect(),
        )
    }

    fn state(k: &Known) -> BTreeMap<String, u64> {
        let by_names: BTreeMap<String, u64> = k
            .names()
            .map(|n| (n.to_string(), k.get(n).expect("a held name has a version")))
            .collect();
        assert_eq!(by_names.len(), k.len(), "a name listed twice");
        by_names
    }

    /// Random operations on `Known` and on a plain map agree at every step,
    /// across re-bases onto other snapshots.
    #[test]
    fn behaves_as_a_plain_map() {
        let names = ["a", "b", "c", "d", "e", "f"];
        let snaps = [
            snapshot(&[("a", 1), ("b", 2), ("c", 3)]),
            snapshot(&[("b", 2), ("c", 4), ("d", 5), ("e", 6)]),
            snapshot(&[]),
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut k = Known::default();
        let mut plain: BTreeMap<String, u64> = BTreeMap::new();
        for step in 0..5_000 {
            let name: Arc<str> = Arc::from(names[next(names.len() as u64) as usize]);
            match next(5) {
                0 => {
                    let v = next(7);
                    k.insert(name.clone(), v);
                    plain.insert(name.to_string(), v);
                }
                1 => assert_eq!(
                    k.remove(&name),
                    plain.remove(&*name).is_some(),
                    "step {step}"
                ),
                2 => {
                    let drop = next(names.len() as u64) as usize;
                    k.retain(|n| n != names[drop]);
                    plain.remove(names[drop]);
                }
                3 if next(4) == 0 => {
                    let s = next(snaps.len() as u64) as usize;
                    k.rebase(snaps[s].clone(), s as u64);
                    assert!(k.in_sync_with(s as u64));
                    plain = snaps[s]
                        .values()
                        .map(|r| (r.name.to_string(), r.hash))
                        .collect();
                }
                _ => assert_eq!(k.get(&name), plain.get(&*name).copied(), "step {step}"),
            }
            assert_eq!(state(&k), plain, "step {step}");
            if let Some(b) = k.as_base() {
                let b: BTreeMap<String, u64> =
                    b.values().map(|r| (r.name.to_string(), r.hash)).collect();
                assert_eq!(b, plain, "step {step}: as_base");
            }
        }
    }

    #[test]
    fn resume_then_rebase() {
        let mut k = Known::from_versions([(Arc::from("a"), 1), (Arc::from("z"), 9)].into_iter());
        assert!(k.as_base().is_none());
        assert_eq!(k.get("z"), Some(9));
        k.rebase(snapshot(&[("a", 1)]), 7);
        assert!(k.in_sync_with(7) && !k.in_sync_with(6));
        assert_eq!(k.get("z"), None);
        k.insert(Arc::from("a"), 2);
        assert!(!k.in_sync_with(7));
        k.insert(Arc::from("a"), 1);
        assert!(k.in_sync_with(7), "back to the base version");
    }
}
