//! Apply notifications, for read-your-writes waits without polling.
//!
//! Every fenced apply announces the document it changed and the version it reached: the Redis
//! apply script `PUBLISH`es `<version> <document key>` on the store's applied channel
//! (`<prefix>:applied`), and the memory store calls [`AppliedFeed::notify`] itself. A reader
//! that wants a document at version `v` or later registers a [`Watch`] in the store's
//! [`AppliedFeed`] (a map of waiters keyed by document), then reads the document once; if that
//! read is short it sleeps until a notification for that document at `v` or later wakes it,
//! and reads again. A notification is only a hint to read again: what the reader returns is
//! always what the store holds.
//!
//! Nothing here is a guarantee of delivery. Pub/sub loses messages while the subscription is
//! down, so:
//! - a feed is *live* only while its subscription is up ([`AppliedFeed::set_live`]); while it is
//!   not, [`AppliedFeed::watch`] returns `None` and readers poll as they did before;
//! - after every (re)subscription the feed wakes every waiter ([`AppliedFeed::wake_all`]), so
//!   an apply whose message fell into the gap is read by the re-check;
//! - readers re-check on a coarse safety timer anyway (read-svc's `--wait-recheck-ms`), which
//!   bounds the cost of any message lost some other way (or of a generation swap, which moves
//!   the document to another key).
//!
//! Memory is bounded: a waiter is removed when it is woken, when its [`Watch`] is dropped (the
//! wait finished, its deadline passed, or the client cancelled the call) and the feed holds at
//! most [`AppliedFeed::capacity`] waiters; past that, `watch` returns `None` and the reader
//! polls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::Notify;

/// Waiters on documents, woken by apply notifications. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct AppliedFeed {
    state: Mutex<State>,
    /// How many waiters are registered (read without the lock on every apply).
    waiting: AtomicUsize,
    live: AtomicBool,
    capacity: usize,
}

#[derive(Debug, Default)]
struct State {
    /// Document key → its waiters.
    waiters: HashMap<String, Vec<Slot>>,
    next_id: u64,
}

#[derive(Debug)]
struct Slot {
    id: u64,
    min_version: u64,
    wake: Arc<Notify>,
}

impl AppliedFeed {
    /// Default bound on registered waiters.
    pub const DEFAULT_CAPACITY: usize = 100_000;

    /// A feed holding at most `capacity` waiters; `live` says whether notifications arrive from
    /// the start (the memory store's do; a Redis feed is live while subscribed).
    pub fn new(capacity: usize, live: bool) -> Self {
        Self {
            state: Mutex::new(State::default()),
            waiting: AtomicUsize::new(0),
            live: AtomicBool::new(live),
            capacity,
        }
    }

    /// The most waiters it holds at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many waiters are registered now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Whether notifications currently arrive.
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// Marks the feed live (subscribed) or not. Going live wakes every waiter: messages may
    /// have been missed while it was not.
    pub fn set_live(&self, live: bool) {
        let was = self.live.swap(live, Ordering::AcqRel);
        if live && !was {
            self.wake_all();
        }
    }

    /// Registers a waiter for document `key` at version `min_version` or later; `None` when the
    /// feed is not live or full (the caller polls instead). Register *before* reading the
    /// document, so that an apply between the read and the wait still wakes it.
    pub fn watch(self: &Arc<Self>, key: String, min_version: u64) -> Option<Watch> {
        if !self.is_live() {
            return None;
        }
        let wake = Arc::new(Notify::new());
        let id = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if self.waiting.load(Ordering::Acquire) >= self.capacity {
                return None;
            }
            let id = state.next_id;
            state.next_id += 1;
            state.waiters.entry(key.clone()).or_default().push(Slot {
                id,
                min_version,
                wake: Arc::clone(&wake),
            });
            self.waiting.fetch_add(1, Ordering::AcqRel);
            id
        };
        Some(Watch {
            feed: Arc::clone(self),
            key,
            id,
            wake,
        })
    }

    /// Whether anyone waits (a cheap check before building a key to notify).
    pub fn has_waiters(&self) -> bool {
        self.waiting() > 0
    }

    /// Document `key` reached `version`: wakes (and removes) exactly its waiters whose
    /// `min_version` is at most `version`.
    pub fn notify(&self, key: &str, version: u64) {
        if !self.has_waiters() {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(slots) = state.waiters.get_mut(key) else {
            return;
        };
        let before = slots.len();
        slots.retain(|s| {
            let reached = s.min_version <= version;
            if reached {
                s.wake.notify_one();
            }
            !reached
        });
        let woken = before - slots.len();
        if slots.is_empty() {
            state.waiters.remove(key);
        }
        self.waiting.fetch_sub(woken, Ordering::AcqRel);
    }

    /// Parses a message of the Redis apply script (`<version> <document key>`) and notifies it;
    /// anything else is ignored.
    pub fn notify_message(&self, message: &str) {
        if let Some((version, key)) = message.split_once(' ') {
            if let Ok(version) = version.parse() {
                self.notify(key, version);
            }
        }
    }

    /// Wakes (and removes) every waiter, so each reads its document again.
    pub fn wake_all(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        for slot in state.waiters.drain().flat_map(|(_, slots)| slots) {
            slot.wake.notify_one();
            self.waiting.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn remove(&self, key: &str, id: u64) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(slots) = state.waiters.get_mut(key) else {
            return;
        };
        if let Some(at) = slots.iter().position(|s| s.id == id) {
            slots.swap_remove(at);
            self.waiting.fetch_sub(1, Ordering::AcqRel);
        }
        if slots.is_empty() {
            state.waiters.remove(key);
        }
    }
}

/// One registered waiter. Dropping it unregisters it.
#[derive(Debug)]
pub struct Watch {
    feed: Arc<AppliedFeed>,
    key: String,
    id: u64,
    wake: Arc<Notify>,
}

impl Watch {
    /// Resolves once a notification reached this waiter's version, or the feed woke everyone.
    /// A wake that came before this call is not lost.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.feed.remove(&self.key, self.id);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn is_woken(w: &Watch) -> bool {
        tokio::time::timeout(Duration::from_millis(0), w.woken())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn wakes_exactly_the_waiters_whose_version_is_reached() {
        let feed = Arc::new(AppliedFeed::new(10, true));
        let at3 = feed.watch("a".into(), 3).unwrap();
        let at5 = feed.watch("a".into(), 5).unwrap();
        let other = feed.watch("b".into(), 1).unwrap();
        assert_eq!(feed.waiting(), 3);
        feed.notify("a", 2);
        assert!(!is_woken(&at3).await, "version 2 does not reach 3");
        feed.notify_message("4 a");
        assert!(is_woken(&at3).await);
        assert!(!is_woken(&at5).await, "version 4 does not reach 5");
        assert!(!is_woken(&other).await, "another document");
        assert_eq!(feed.waiting(), 2, "the woken waiter is removed");
        feed.notify_message("garbage");
        feed.notify_message("x a");
        feed.notify("a", 9);
        assert!(is_woken(&at5).await);
        assert_eq!(feed.waiting(), 1);
    }

    #[tokio::test]
    async fn dropped_waiters_are_freed_and_the_bound_holds() {
        let feed = Arc::new(AppliedFeed::new(2, true));
        let a = feed.watch("a".into(), 1).unwrap();
        let b = feed.watch("a".into(), 1).unwrap();
        assert!(feed.watch("c".into(), 1).is_none(), "full");
        drop(a);
        assert_eq!(feed.waiting(), 1);
        let c = feed.watch("c".into(), 1).unwrap();
        drop(b);
        drop(c);
        assert_eq!(feed.waiting(), 0);
        assert!(
            feed.state.lock().unwrap().waiters.is_empty(),
            "no empty entries kept"
        );
    }

    #[tokio::test]
    async fn going_live_wakes_everyone_and_a_dead_feed_registers_nobody() {
        let feed = Arc::new(AppliedFeed::new(10, true));
        let a = feed.watch("a".into(), 7).unwrap();
        let b = feed.watch("b".into(), 7).unwrap();
        feed.set_live(false);
        assert!(feed.watch("c".into(), 1).is_none(), "not live: poll");
        feed.set_live(true);
        assert!(is_woken(&a).await && is_woken(&b).await);
        assert_eq!(feed.waiting(), 0);
    }
}
