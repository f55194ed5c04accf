//! Every read of the read model: documents and index pages of a projection by its logical name,
//! from the namespace of its active generation ([`Resolver`], so a swap is followed without a
//! restart), and read-your-writes: wait until a document reaches a version, within a deadline.

use crate::Config;
use esq_domain::projection::doc_version;
use esq_readstore::generations::Resolver;
use esq_readstore::{Doc, ReadError, ReadStore};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tonic::Status;

/// Shared access to the read store for all query services.
pub(crate) struct Reader<R> {
    resolver: Arc<Resolver<R>>,
    config: Config,
}

impl<R> Clone for Reader<R> {
    fn clone(&self) -> Self {
        Self {
            resolver: Arc::clone(&self.resolver),
            config: self.config.clone(),
        }
    }
}

/// The one mapping from read-store errors to statuses.
pub(crate) fn status_from_read(e: ReadError) -> Status {
    match e {
        ReadError::Unavailable(cause) => {
            tracing::warn!(%cause, "read store unavailable");
            Status::unavailable("read store unavailable; retry later")
        }
        ReadError::Internal(cause) => {
            tracing::error!(%cause, "read store internal error");
            Status::internal("internal error")
        }
    }
}

impl<R: ReadStore> Reader<R> {
    pub(crate) fn new(store: Arc<R>, config: Config) -> Self {
        Self {
            resolver: Arc::new(Resolver::new(store)),
            config,
        }
    }

    /// The store behind the resolver (for reads in a namespace resolved already).
    pub(crate) fn store(&self) -> &Arc<R> {
        self.resolver.store()
    }

    /// The namespace queries of derived projection `d` read now: the one of its source's
    /// active generation (a derived projection follows its source's generations).
    pub(crate) async fn derived_namespace(
        &self,
        d: &dyn esq_domain::derived::Derived,
    ) -> Result<String, Status> {
        let source = self
            .resolver
            .active(d.source())
            .await
            .map_err(status_from_read)?;
        Ok(esq_readstore::generations::derived_namespace(
            d.source(),
            &source,
            d.name(),
        ))
    }

    /// Document `doc_id` of `projection` (a logical name) as its active generation holds it.
    pub(crate) async fn get(&self, projection: &str, doc_id: &str) -> Result<Option<Doc>, Status> {
        let namespace = self
            .resolver
            .active(projection)
            .await
            .map_err(status_from_read)?;
        self.get_in(&namespace, doc_id).await
    }

    /// Document `doc_id` of `namespace` (resolved already): one round trip.
    async fn get_in(&self, namespace: &str, doc_id: &str) -> Result<Option<Doc>, Status> {
        esq_runtime::metrics::store()
            .time("read", "get", self.resolver.store().get(namespace, doc_id))
            .await
            .map_err(status_from_read)
    }

    /// A page of index `index` of `projection` (a logical name) in its active generation.
    pub(crate) async fn index_page(
        &self,
        projection: &str,
        index: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, Status> {
        let namespace = self
            .resolver
            .active(projection)
            .await
            .map_err(status_from_read)?;
        esq_runtime::metrics::store()
            .time(
                "read",
                "index_page",
                self.resolver
                    .store()
                    .index_page(&namespace, index, after, limit),
            )
            .await
            .map_err(status_from_read)
    }

    /// The document once its version is at least `min_version`; DEADLINE_EXCEEDED once the
    /// call's deadline (or the server maximum) has passed.
    ///
    /// One read when the document is there already (the common case, and every read without
    /// `min_version`). Otherwise the wait registers with the store's apply notifications
    /// ([`ReadStore::watch`]) *before* each further read, so no apply slips between the read
    /// and the wait, and sleeps until a notification for this document at `min_version` or
    /// later, or the safety re-check (`config.wait_recheck`: a lost message, a resubscription or
    /// a generation swap costs at most that), or the deadline. Without live notifications (the
    /// subscription is down, or the waiter bound is reached) it polls with a short backoff.
    pub(crate) async fn get_at_least(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        projection: &str,
        doc_id: &str,
        min_version: u64,
    ) -> Result<Option<Doc>, Status> {
        let resolve = || async {
            // Resolved on every round, so a wait that spans a swap ends on the new generation.
            self.resolver
                .active(projection)
                .await
                .map_err(status_from_read)
        };
        let namespace = resolve().await?;
        let doc = self.get_in(&namespace, doc_id).await?;
        let mut version = doc.as_ref().map_or(0, doc_version);
        if version >= min_version {
            if min_version > 0 {
                esq_runtime::metrics::read().min_version_wait(true, Duration::ZERO);
            }
            return Ok(doc);
        }
        let budget = metadata
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map_or(self.config.max_wait, |d| d.min(self.config.max_wait));
        // Answer a little before the client's deadline, so it gets DEADLINE_EXCEEDED with our
        // explanation rather than cancelling the call itself.
        let budget = budget.saturating_sub((budget / 5).min(Duration::from_millis(50)));
        let started = Instant::now();
        let deadline = started + budget;
        let mut pause = Duration::from_millis(1);
        let mut watch = None;
        // The first round registers and reads again at once: no pause unless polling.
        let mut first = true;
        loop {
            let now = Instant::now();
            if now >= deadline {
                esq_runtime::metrics::read().min_version_wait(false, started.elapsed());
                return Err(Status::deadline_exceeded(format!(
                    "the read model of {doc_id} is at version {version}; min_version {min_version} \
                     was not reached within {budget:?}"
                )));
            }
            match &watch {
                _ if first => first = false,
                Some(w) => {
                    let w: &esq_readstore::notify::Watch = w;
                    let recheck = self.config.wait_recheck.min(deadline - now);
                    let _ = tokio::time::timeout(recheck, w.woken()).await;
                }
                None => {
                    tokio::time::sleep(pause.min(deadline - now)).await;
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
            }
            let namespace = resolve().await?;
            // Registered before the read (and dropped, freeing it, when the wait ends).
            watch = self.resolver.store().watch(&namespace, doc_id, min_version);
            let doc = self.get_in(&namespace, doc_id).await?;
            version = doc.as_ref().map_or(0, doc_version);
            if version >= min_version {
                esq_runtime::metrics::read().min_version_wait(true, started.elapsed());
                return Ok(doc);
            }
        }
    }
}

/// Parses a `grpc-timeout` header value (`<digits><unit>`, unit one of H M S m u n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
        assert_eq!(parse_grpc_timeout("10q"), None);
    }
}
