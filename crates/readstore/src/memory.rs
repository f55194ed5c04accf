//! The in-memory read store: for `esq dev` (rebuilt from the embedded log at start) and tests.
//!
//! Documents go through [`apply_to_doc`] itself, so this adapter *is* the reference semantics.
//! Locks are plain `std` locks: nothing awaits while holding one and every critical section is a
//! few map operations.

use crate::notify::{AppliedFeed, Watch};
use crate::{Doc, ReadError, ReadStore};
use esq_domain::derived::{apply_contribution, Column, Contribution};
use esq_domain::projection::{apply_to_doc, doc_version, ApplyOutcome, Batch, INDEX_PENDING_FIELD};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

/// Documents of one projection, by document id.
type Docs = HashMap<String, Doc>;
/// Indexes of one projection, by index name.
type Indexes = HashMap<String, BTreeSet<String>>;

/// A [`ReadStore`] held in process memory. Cloning is cheap and clones share the data.
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

/// The memory store's apply notifications: always live (applies call it directly).
struct Feed(Arc<AppliedFeed>);

impl Default for Feed {
    fn default() -> Self {
        Self(Arc::new(AppliedFeed::new(
            AppliedFeed::DEFAULT_CAPACITY,
            true,
        )))
    }
}

/// The key a document's waiters are registered under.
fn watch_key(projection: &str, doc_id: &str) -> String {
    format!("{projection}\u{0}{doc_id}")
}

#[derive(Default)]
struct Inner {
    /// Waiters on document versions, woken by every apply.
    feed: Feed,
    /// projection → document id → document.
    docs: RwLock<HashMap<String, Docs>>,
    /// projection → index name → members.
    indexes: RwLock<HashMap<String, Indexes>>,
    /// derived namespace → target → entries (source id → entry); the totals are in `docs`.
    entries: RwLock<HashMap<String, Docs>>,
    checkpoints: RwLock<HashMap<String, String>>,
    /// projection → generation record.
    generations: Mutex<HashMap<String, String>>,
    /// record set → key → record.
    records: RwLock<HashMap<String, BTreeMap<String, String>>>,
    /// lease name → (owner, expiry).
    leases: Mutex<HashMap<String, (String, Instant)>>,
    /// group → member → expiry.
    members: Mutex<HashMap<String, HashMap<String, Instant>>>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The waiters on document versions ([`ReadStore::watch`] registers them here; every
    /// apply wakes those it satisfies).
    pub fn applied_feed(&self) -> &Arc<AppliedFeed> {
        &self.inner.feed.0
    }

    fn apply_doc(&self, projection: &str, doc_id: &str, batch: &Batch) -> ApplyOutcome {
        let mut docs = self
            .inner
            .docs
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let outcome = if let Some(doc) = docs.get_mut(projection).and_then(|p| p.get_mut(doc_id)) {
            apply_to_doc(doc, batch)
        } else {
            // A document that nothing was applied to must stay absent (as a Redis key would),
            // so it is only inserted when the batch applies.
            let mut doc = Doc::new();
            let outcome = apply_to_doc(&mut doc, batch);
            if outcome == ApplyOutcome::Applied {
                docs.entry(projection.to_owned())
                    .or_default()
                    .insert(doc_id.to_owned(), doc);
            }
            outcome
        };
        drop(docs);
        // After the write is visible, as the Redis script publishes after its writes.
        let feed = &self.inner.feed.0;
        if outcome == ApplyOutcome::Applied && feed.has_waiters() {
            feed.notify(&watch_key(projection, doc_id), batch.last_version);
        }
        outcome
    }

    fn apply_indexes(&self, projection: &str, doc_id: &str, add: &[String], remove: &[String]) {
        if add.is_empty() && remove.is_empty() {
            return;
        }
        let mut indexes = self
            .inner
            .indexes
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let projection = indexes.entry(projection.to_owned()).or_default();
        for index in remove {
            if let Some(set) = projection.get_mut(index) {
                set.remove(doc_id);
            }
        }
        for index in add {
            projection
                .entry(index.clone())
                .or_default()
                .insert(doc_id.to_owned());
        }
    }
}

impl ReadStore for MemoryStore {
    /// Always answers: the store is this process's memory.
    async fn ping(&self) -> Result<(), ReadError> {
        Ok(())
    }

    async fn apply(
        &self,
        projection: &str,
        doc_id: &str,
        batch: &Batch,
    ) -> Result<ApplyOutcome, ReadError> {
        Ok(self.apply_doc(projection, doc_id, batch))
    }

    fn watch(&self, namespace: &str, doc_id: &str, min_version: u64) -> Option<Watch> {
        self.inner
            .feed
            .0
            .watch(watch_key(namespace, doc_id), min_version)
    }

    async fn update_indexes(
        &self,
        projection: &str,
        doc_id: &str,
        add: &[String],
        remove: &[String],
        marker: &str,
    ) -> Result<(), ReadError> {
        self.apply_indexes(projection, doc_id, add, remove);
        let mut docs = self
            .inner
            .docs
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(doc) = docs.get_mut(projection).and_then(|p| p.get_mut(doc_id)) {
            if doc.get(INDEX_PENDING_FIELD).map(String::as_str) == Some(marker) {
                doc.remove(INDEX_PENDING_FIELD);
            }
        }
        Ok(())
    }

    async fn contribute(
        &self,
        namespace: &str,
        target: &str,
        columns: &[Column],
        c: &Contribution,
    ) -> Result<bool, ReadError> {
        // Lock order: documents, then entries (the only place that takes both).
        let mut docs = self
            .inner
            .docs
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let mut entries = self
            .inner
            .entries
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let target_entries = entries
            .entry(namespace.to_owned())
            .or_default()
            .entry(target.to_owned())
            .or_default();
        let totals = docs
            .entry(namespace.to_owned())
            .or_default()
            .entry(target.to_owned())
            .or_default();
        let applied = apply_contribution(totals, target_entries, columns, c);
        // Like a Redis hash, a document that holds nothing does not exist.
        if totals.is_empty() {
            docs.get_mut(namespace).map(|p| p.remove(target));
        }
        Ok(applied)
    }

    async fn clear_field_if(
        &self,
        namespace: &str,
        doc_id: &str,
        field: &str,
        value: &str,
    ) -> Result<(), ReadError> {
        let mut docs = self
            .inner
            .docs
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(doc) = docs.get_mut(namespace).and_then(|p| p.get_mut(doc_id)) {
            if doc.get(field).map(String::as_str) == Some(value) {
                doc.remove(field);
            }
        }
        Ok(())
    }

    async fn get(&self, projection: &str, doc_id: &str) -> Result<Option<Doc>, ReadError> {
        let docs = self
            .inner
            .docs
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(docs.get(projection).and_then(|p| p.get(doc_id)).cloned())
    }

    async fn version(&self, projection: &str, doc_id: &str) -> Result<u64, ReadError> {
        let docs = self
            .inner
            .docs
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(docs
            .get(projection)
            .and_then(|p| p.get(doc_id))
            .map_or(0, doc_version))
    }

    async fn index_page(
        &self,
        projection: &str,
        index: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, ReadError> {
        let indexes = self
            .inner
            .indexes
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(set) = indexes.get(projection).and_then(|p| p.get(index)) else {
            return Ok(Vec::new());
        };
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(set
            .range::<str, _>((lower, Bound::Unbounded))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn generations(&self, projection: &str) -> Result<Option<String>, ReadError> {
        let records = self
            .inner
            .generations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(records.get(projection).cloned())
    }

    async fn swap_generations(
        &self,
        projection: &str,
        expected: Option<&str>,
        new: &str,
    ) -> Result<bool, ReadError> {
        let mut records = self
            .inner
            .generations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if records.get(projection).map(String::as_str) != expected {
            return Ok(false);
        }
        records.insert(projection.to_owned(), new.to_owned());
        Ok(true)
    }

    /// Drops the namespace's maps in one go (memory is not shared with other processes, so
    /// there is nothing to batch for).
    async fn delete_namespace(&self, namespace: &str) -> Result<u64, ReadError> {
        let docs = self
            .inner
            .docs
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(namespace)
            .map_or(0, |d| d.len());
        let indexes = self
            .inner
            .indexes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(namespace)
            .map_or(0, |i| i.len());
        // A derived target's entries go with it.
        let entries = self
            .inner
            .entries
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(namespace)
            .map_or(0, |e| e.len());
        Ok((docs + indexes + entries) as u64)
    }

    async fn delete_doc(&self, namespace: &str, doc_id: &str) -> Result<(), ReadError> {
        let mut docs = self
            .inner
            .docs
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(docs) = docs.get_mut(namespace) {
            docs.remove(doc_id);
        }
        Ok(())
    }

    async fn index_contains(
        &self,
        namespace: &str,
        index: &str,
        doc_id: &str,
    ) -> Result<bool, ReadError> {
        let indexes = self
            .inner
            .indexes
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(indexes
            .get(namespace)
            .and_then(|p| p.get(index))
            .is_some_and(|set| set.contains(doc_id)))
    }

    /// Pages in id order; the cursor is the last id of the page.
    async fn doc_ids_page(
        &self,
        namespace: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<String>, Option<String>), ReadError> {
        let limit = limit.max(1);
        let docs = self
            .inner
            .docs
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(docs) = docs.get(namespace) else {
            return Ok((Vec::new(), None));
        };
        let mut page: Vec<&String> = docs
            .keys()
            .filter(|id| cursor.is_none_or(|c| id.as_str() > c))
            .collect();
        page.sort_unstable();
        let more = page.len() > limit;
        page.truncate(limit);
        let ids: Vec<String> = page.into_iter().cloned().collect();
        let next = if more { ids.last().cloned() } else { None };
        Ok((ids, next))
    }

    async fn checkpoint(&self, name: &str) -> Result<Option<String>, ReadError> {
        let checkpoints = self
            .inner
            .checkpoints
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(checkpoints.get(name).cloned())
    }

    async fn save_checkpoint(&self, name: &str, position: &str) -> Result<(), ReadError> {
        let mut checkpoints = self
            .inner
            .checkpoints
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        match checkpoints.get_mut(name) {
            Some(saved) => position.clone_into(saved),
            None => {
                checkpoints.insert(name.to_owned(), position.to_owned());
            }
        }
        Ok(())
    }

    async fn put_record(&self, set: &str, key: &str, record: &str) -> Result<(), ReadError> {
        let mut records = self
            .inner
            .records
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        records
            .entry(set.to_owned())
            .or_default()
            .insert(key.to_owned(), record.to_owned());
        Ok(())
    }

    async fn get_record(&self, set: &str, key: &str) -> Result<Option<String>, ReadError> {
        let records = self
            .inner
            .records
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(records.get(set).and_then(|s| s.get(key)).cloned())
    }

    async fn delete_record(&self, set: &str, key: &str) -> Result<bool, ReadError> {
        let mut records = self
            .inner
            .records
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(records.get_mut(set).and_then(|s| s.remove(key)).is_some())
    }

    async fn records_page(
        &self,
        set: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, String)>, ReadError> {
        let records = self
            .inner
            .records
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(set) = records.get(set) else {
            return Ok(Vec::new());
        };
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(set
            .range::<str, _>((lower, Bound::Unbounded))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    async fn record_count(&self, set: &str) -> Result<u64, ReadError> {
        let records = self
            .inner
            .records
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(records.get(set).map_or(0, |s| s.len() as u64))
    }
}

impl crate::Coordination for MemoryStore {
    async fn acquire_lease(
        &self,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<bool, ReadError> {
        let now = Instant::now();
        let mut leases = self
            .inner
            .leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match leases.get_mut(name) {
            Some((holder, expiry)) if holder != owner && *expiry > now => Ok(false),
            Some((holder, expiry)) => {
                owner.clone_into(holder);
                *expiry = now + ttl;
                Ok(true)
            }
            None => {
                leases.insert(name.to_owned(), (owner.to_owned(), now + ttl));
                Ok(true)
            }
        }
    }

    async fn release_lease(&self, name: &str, owner: &str) -> Result<bool, ReadError> {
        let mut leases = self
            .inner
            .leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let ours = leases
            .get(name)
            .is_some_and(|(holder, expiry)| holder == owner && *expiry > Instant::now());
        if ours {
            leases.remove(name);
        }
        Ok(ours)
    }

    async fn heartbeat(
        &self,
        group: &str,
        member: &str,
        ttl: Duration,
    ) -> Result<usize, ReadError> {
        let now = Instant::now();
        let mut groups = self
            .inner
            .members
            .lock()
            .map_err(|_| ReadError::Internal("member map poisoned".into()))?;
        let members = groups.entry(group.to_owned()).or_default();
        members.insert(member.to_owned(), now + ttl);
        members.retain(|_, expiry| *expiry > now);
        Ok(members.len())
    }

    async fn leave(&self, group: &str, member: &str) -> Result<(), ReadError> {
        let mut groups = self
            .inner
            .members
            .lock()
            .map_err(|_| ReadError::Internal("member map poisoned".into()))?;
        if let Some(members) = groups.get_mut(group) {
            members.remove(member);
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::Coordination;

    #[tokio::test]
    async fn contract() {
        crate::contract::run_all(&MemoryStore::new(), "mem").await;
    }

    #[tokio::test]
    async fn leases() {
        let store = MemoryStore::new();
        let ttl = Duration::from_secs(30);
        assert!(store.acquire_lease("shard-1", "a", ttl).await.unwrap());
        assert!(!store.acquire_lease("shard-1", "b", ttl).await.unwrap());
        assert!(
            store.acquire_lease("shard-1", "a", ttl).await.unwrap(),
            "renewal"
        );
        assert!(!store.release_lease("shard-1", "b").await.unwrap());
        assert!(store.release_lease("shard-1", "a").await.unwrap());
        assert!(store.acquire_lease("shard-1", "b", ttl).await.unwrap());

        let short = Duration::from_millis(20);
        assert!(store.acquire_lease("shard-2", "a", short).await.unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            store.acquire_lease("shard-2", "b", ttl).await.unwrap(),
            "expired"
        );
        assert!(!store.release_lease("shard-2", "a").await.unwrap());
    }
}
