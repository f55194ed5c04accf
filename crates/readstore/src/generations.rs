//! Generations of a projection's read model, and the namespaces their keys live in.
//!
//! Every projection (`cart2`, `book`, …, a *logical* name) keeps its documents and indexes in
//! the namespace of a *generation*: generation `n ≥ 1` lives in namespace `<projection>:g<n>`
//! (Redis keys `<prefix>:<projection>:g<n>:{<doc id>}`, the hash tag still on the doc id);
//! generation 0 is the un-generationed layout from before generations existed (namespace
//! `<projection>`), which an upgrade rebuilds into generation 1 and then deletes.
//!
//! The [`GenerationRecord`] of a projection says which generation queries read (`active`), which
//! one a rebuild is filling (`building`), and which ones wait for their keys to be deleted
//! (`retired`). It is one value in the read store, changed only by compare-and-set
//! ([`ReadStore::swap_generations`]), so a swap of the active generation is one atomic write.
//! Readers map a logical name to its active namespace through a [`Resolver`], which caches the
//! answer for at most [`Resolver::TTL`].

use crate::{ReadError, ReadStore};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The namespace of `generation` of `projection` (0: the pre-generation layout).
pub fn namespace(projection: &str, generation: u32) -> String {
    if generation == 0 {
        projection.to_owned()
    } else {
        format!("{projection}:g{generation}")
    }
}

/// The namespace of derived projection `derived` that follows `source_namespace`, a namespace
/// of its source projection `source`: a derived projection's targets live in the generation of
/// its source (`book:g3` → `authors:g3`, `book` → `authors`), so building, swapping and
/// deleting a generation of the source does the same to its derived projections.
pub fn derived_namespace(source: &str, source_namespace: &str, derived: &str) -> String {
    match source_namespace.strip_prefix(source) {
        Some(generation) => format!("{derived}{generation}"),
        None => derived.to_owned(),
    }
}

/// Which generations of one projection exist and what each is for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationRecord {
    /// The generation queries read; `None` until the first build finished.
    pub active: Option<u32>,
    /// The generation a rebuild is filling; projectors write to it too (before the active one).
    pub building: Option<u32>,
    /// Generations no longer read, whose keys are being deleted.
    #[serde(default)]
    pub retired: Vec<u32>,
    /// The read-model layout the active generation was built with (a projector of a newer
    /// layout rebuilds).
    #[serde(default)]
    pub layout: u32,
    /// An operator asked for a rebuild that has not started yet.
    #[serde(default)]
    pub requested: bool,
    /// The highest generation number ever used (so numbers are never reused).
    #[serde(default)]
    pub last: u32,
}

impl GenerationRecord {
    /// The namespaces a projector writes to, in order: the building one first, then the active
    /// one — so that whenever the active document shows version `v`, the building one shows at
    /// least `v`, and a swap never takes a document back in time.
    pub fn targets(&self, projection: &str) -> Vec<String> {
        let mut out = Vec::with_capacity(2);
        if let Some(b) = self.building {
            out.push(namespace(projection, b));
        }
        if let Some(a) = self.active {
            if Some(a) != self.building {
                out.push(namespace(projection, a));
            }
        }
        out
    }

    /// The namespace queries read, if any generation is active.
    pub fn active_namespace(&self, projection: &str) -> Option<String> {
        self.active.map(|a| namespace(projection, a))
    }

    fn encode(&self) -> String {
        // A plain struct of numbers and flags: serialising cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The generation record of `projection`, with the raw text it was read from (for
/// [`swap_record`]); `None` if the projection has none yet.
pub async fn read_record<R: ReadStore>(
    store: &R,
    projection: &str,
) -> Result<Option<(GenerationRecord, String)>, ReadError> {
    let Some(raw) = store.generations(projection).await? else {
        return Ok(None);
    };
    let record = serde_json::from_str(&raw).map_err(|e| {
        ReadError::Internal(format!("generation record of {projection}: {e}: {raw}"))
    })?;
    Ok(Some((record, raw)))
}

/// Replaces the record of `projection` with `new` if it still is `expected` (the raw text from
/// [`read_record`], `None`: no record). Returns whether it was replaced.
pub async fn swap_record<R: ReadStore>(
    store: &R,
    projection: &str,
    expected: Option<&str>,
    new: &GenerationRecord,
) -> Result<bool, ReadError> {
    store
        .swap_generations(projection, expected, &new.encode())
        .await
}

/// Changes the record of `projection` by `change` (given the current record, or the default for
/// none), retrying on concurrent changes; `change` returns false to leave it as it is. Returns
/// the record afterwards.
pub async fn update_record<R: ReadStore>(
    store: &R,
    projection: &str,
    mut change: impl FnMut(&mut GenerationRecord) -> bool,
) -> Result<GenerationRecord, ReadError> {
    for _ in 0..64 {
        let current = read_record(store, projection).await?;
        let (mut record, raw) = match current {
            Some((record, raw)) => (record, Some(raw)),
            None => (GenerationRecord::default(), None),
        };
        if !change(&mut record) {
            return Ok(record);
        }
        if swap_record(store, projection, raw.as_deref(), &record).await? {
            return Ok(record);
        }
    }
    Err(ReadError::Internal(format!(
        "generation record of {projection} keeps changing under us"
    )))
}

/// Maps logical projection names to the namespace of their active generation, caching each
/// answer for at most [`Resolver::TTL`], so a swap is followed within that time without a
/// restart. A projection with no record yet reads the pre-generation namespace (generation 0):
/// during an upgrade, queries keep reading the old keys until the first generation is swapped in.
pub struct Resolver<R> {
    store: Arc<R>,
    cache: Mutex<HashMap<String, (String, Instant)>>,
}

impl<R> std::fmt::Debug for Resolver<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

impl<R: ReadStore> Resolver<R> {
    /// How long an answer is reused. Deleting a retired generation waits well past this.
    pub const TTL: Duration = Duration::from_millis(500);

    /// A resolver reading records from `store`.
    pub fn new(store: Arc<R>) -> Self {
        Self {
            store,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The store it reads from.
    pub fn store(&self) -> &Arc<R> {
        &self.store
    }

    /// The namespace queries of `projection` read now.
    pub async fn active(&self, projection: &str) -> Result<String, ReadError> {
        let now = Instant::now();
        {
            let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((ns, at)) = cache.get(projection) {
                if now.duration_since(*at) < Self::TTL {
                    return Ok(ns.clone());
                }
            }
        }
        let ns = match read_record(self.store.as_ref(), projection).await? {
            // No generation active (a lost read model being rebuilt): the old namespace, which
            // is empty then — queries never read a half-built generation.
            Some((record, _)) => record
                .active_namespace(projection)
                .unwrap_or_else(|| namespace(projection, 0)),
            None => namespace(projection, 0),
        };
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(projection.to_owned(), (ns.clone(), now));
        Ok(ns)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::memory::MemoryStore;

    #[test]
    fn namespaces() {
        assert_eq!(namespace("cart2", 0), "cart2");
        assert_eq!(namespace("cart2", 3), "cart2:g3");
        let r = GenerationRecord {
            active: Some(2),
            building: Some(3),
            ..Default::default()
        };
        assert_eq!(r.targets("book"), vec!["book:g3", "book:g2"]);
        assert_eq!(
            GenerationRecord::default().targets("book"),
            Vec::<String>::new()
        );
    }

    #[tokio::test]
    async fn resolver_follows_a_swap_within_its_ttl() {
        let store = Arc::new(MemoryStore::new());
        let resolver = Resolver::new(Arc::clone(&store));
        assert_eq!(resolver.active("cart2").await.unwrap(), "cart2");
        update_record(store.as_ref(), "cart2", |r| {
            r.active = Some(1);
            r.last = 1;
            true
        })
        .await
        .unwrap();
        let deadline = Instant::now() + Resolver::<MemoryStore>::TTL * 4;
        loop {
            if resolver.active("cart2").await.unwrap() == "cart2:g1" {
                break;
            }
            assert!(Instant::now() < deadline, "swap not followed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
