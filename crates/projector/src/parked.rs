//! Parked (poison) streams. An event a projection cannot apply — it does not decode, its type is
//! unknown to the stream type the projection owns, its upcaster fails, or the read store
//! refuses the apply for that document (a script error such as WRONGTYPE) — parks the stream
//! for that projection: the events before it are applied, the park is recorded in the read
//! store with the version and the reason, and every other stream (and the stream's other
//! projections) keeps flowing. Later changes of the stream fail at the same event again and are
//! passed over for that projection, until an operator retries the stream (after a fix) or skips
//! the event.
//!
//! A skip is explicit and recorded forever with its reason and time: the projection treats that
//! event as a no-op (an empty batch that moves the version past it). [`Projector::sync`] honours
//! skips whenever an event fails; rebuild and verify honour them through
//! [`Projector::skipped_versions`].

use crate::ops::{ParkedStream, RetryOutcome};
use crate::sync::Synced;
use crate::{ProjectError, Projector};
use esq_domain::StreamId;
use esq_eventstore::{now_us, ChangeFeed, EventStore};
use esq_readstore::{Coordination, ReadStore};
use serde_json::json;

/// Skip records read per page while collecting a stream's skipped versions.
const SKIP_PAGE: usize = 100;

impl<E: EventStore, F: ChangeFeed, R: ReadStore + Coordination> Projector<E, F, R> {
    fn parked_set(&self, projection: &str) -> String {
        format!("{}:parked:{projection}", self.config.checkpoint_prefix)
    }

    fn skipped_set(&self, projection: &str) -> String {
        format!("{}:skipped:{projection}", self.config.checkpoint_prefix)
    }

    /// Fails with [`ProjectError::UnknownProjection`] unless `name` is one of this projector's.
    fn known_projection(&self, name: &str) -> Result<(), ProjectError> {
        if self.projections.iter().any(|p| p.name() == name) {
            Ok(())
        } else {
            Err(ProjectError::UnknownProjection(name.to_owned()))
        }
    }

    /// Records that `projection` stopped applying `stream` at `version`, and why. A stream
    /// parked again at the same version keeps its first record (and time).
    pub(crate) async fn park(
        &self,
        projection: &str,
        stream: &StreamId,
        version: u64,
        reason: &str,
    ) -> Result<(), ProjectError> {
        let set = self.parked_set(projection);
        let key = stream.to_string();
        if let Some(existing) = self.read.get_record(&set, &key).await? {
            if parse_parked(projection, &existing).is_some_and(|p| p.version == version) {
                return Ok(());
            }
        }
        tracing::warn!(projection, %stream, version, reason, "stream parked: an event cannot be applied");
        let record = json!({
            "kind": stream.kind,
            "id": stream.id,
            "version": version,
            "reason": reason,
            "at": now_us(),
        });
        self.read
            .put_record(&set, &key, &record.to_string())
            .await?;
        Ok(())
    }

    /// Parked streams, of one projection or of all, at most `limit`, in stream order per
    /// projection.
    pub async fn parked(
        &self,
        projection: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ParkedStream>, ProjectError> {
        let names: Vec<&str> = match projection {
            Some(name) => {
                self.known_projection(name)?;
                vec![name]
            }
            None => self.projections.iter().map(|p| p.name()).collect(),
        };
        let mut out = Vec::new();
        for name in names {
            if out.len() >= limit {
                break;
            }
            let page = self
                .read
                .records_page(&self.parked_set(name), None, limit - out.len())
                .await?;
            out.extend(page.iter().filter_map(|(_, r)| parse_parked(name, r)));
        }
        Ok(out)
    }

    /// How many streams are parked for `projection`.
    pub async fn parked_count(&self, projection: &str) -> Result<u64, ProjectError> {
        self.known_projection(projection)?;
        Ok(self.read.record_count(&self.parked_set(projection)).await?)
    }

    /// Tries a parked stream again (after a fix): re-syncs it for `projection`; it resumes if
    /// it applies now, else it is parked again with the new reason.
    pub async fn retry_parked(
        &self,
        projection: &str,
        stream: &StreamId,
    ) -> Result<RetryOutcome, ProjectError> {
        self.known_projection(projection)?;
        let set = self.parked_set(projection);
        let key = stream.to_string();
        let Some(record) = self.read.get_record(&set, &key).await? else {
            return Ok(RetryOutcome::NotParked);
        };
        self.read.delete_record(&set, &key).await?;
        if let Err(e) = self.sync_only(stream, None, Some(projection), &[]).await {
            // Not tried: it stays parked as it was.
            self.read.put_record(&set, &key, &record).await?;
            return Err(e);
        }
        Ok(match self.read.get_record(&set, &key).await? {
            Some(again) => RetryOutcome::StillParked(
                parse_parked(projection, &again).map_or(again, |p| p.reason),
            ),
            None => {
                tracing::info!(projection, %stream, "parked stream resumed");
                RetryOutcome::Resumed
            }
        })
    }

    /// Skips the parked event at `version` of `stream` for `projection`, recording why and
    /// when (forever), then re-syncs the stream for `projection`; false if the stream is not
    /// parked at that version.
    pub async fn skip_parked(
        &self,
        projection: &str,
        stream: &StreamId,
        version: u64,
        reason: &str,
    ) -> Result<bool, ProjectError> {
        self.known_projection(projection)?;
        let set = self.parked_set(projection);
        let key = stream.to_string();
        let parked = self.read.get_record(&set, &key).await?;
        if parked
            .and_then(|r| parse_parked(projection, &r))
            .is_none_or(|p| p.version != version)
        {
            return Ok(false);
        }
        let record = json!({ "version": version, "reason": reason, "at": now_us() });
        self.read
            .put_record(
                &self.skipped_set(projection),
                &skip_key(stream, version),
                &record.to_string(),
            )
            .await?;
        tracing::warn!(projection, %stream, version, reason, "event skipped by an operator");
        self.read.delete_record(&set, &key).await?;
        // Brings the stream on past the skipped event (it may park again at a later one).
        match self.sync_only(stream, None, Some(projection), &[]).await? {
            Synced::Done | Synced::Missing => {}
        }
        Ok(true)
    }

    /// The versions of `stream` an operator skipped for `projection`, in order: the events a
    /// fold for that projection treats as no-ops (sync, rebuild and verify alike).
    pub async fn skipped_versions(
        &self,
        projection: &str,
        stream: &StreamId,
    ) -> Result<Vec<u64>, ProjectError> {
        let set = self.skipped_set(projection);
        let prefix = format!("{stream}@");
        let mut after = prefix.clone();
        let mut out = Vec::new();
        loop {
            let page = self
                .read
                .records_page(&set, Some(&after), SKIP_PAGE)
                .await?;
            let full = page.len() == SKIP_PAGE;
            for (key, _) in &page {
                let Some(version) = key.strip_prefix(&prefix) else {
                    return Ok(out);
                };
                out.extend(version.parse::<u64>().ok());
            }
            match page.last() {
                Some((key, _)) if full => after.clone_from(key),
                _ => return Ok(out),
            }
        }
    }
}

/// The key of a skip: the stream, then the version zero-padded, so a stream's skips are
/// adjacent and in version order.
fn skip_key(stream: &StreamId, version: u64) -> String {
    format!("{stream}@{version:020}")
}

/// A parked-stream record, as [`ParkedStream`].
fn parse_parked(projection: &str, record: &str) -> Option<ParkedStream> {
    let r: serde_json::Value = serde_json::from_str(record).ok()?;
    Some(ParkedStream {
        projection: projection.to_owned(),
        stream: StreamId::new(r["kind"].as_str()?, r["id"].as_str()?).ok()?,
        version: r["version"].as_u64()?,
        reason: r["reason"].as_str()?.to_owned(),
        parked_at_us: r["at"].as_i64()?,
    })
}

#[cfg(test)]
mod tests {
    use crate::ops::RetryOutcome;
    use crate::testing::{cart, change, setup};
    use crate::{Config, ProjectError, Projector};
    use esq_domain::{ExpectedVersion, NewEvent};
    use esq_eventstore::{now_us, EventStore};
    use esq_readstore::ReadStore;

    fn item(schema_version: u32) -> NewEvent {
        NewEvent::json(
            "ItemAdded",
            schema_version,
            &serde_json::json!({"sku":"a","quantity":1,"unit_price_cents":3}),
        )
    }

    #[tokio::test]
    async fn a_poison_event_parks_its_stream_for_that_projection_and_the_rest_flows() {
        let (_dir, store, feed, read) = setup(1).await;
        let p = Projector::new(store.clone(), feed.clone(), read.clone(), Config::default());
        p.refresh_generations(false).await.expect("generations");
        // Event 2 of cart "bad" is at a schema version no upcaster knows (appended through the
        // event store directly, as an old or foreign writer could).
        store
            .append(
                &cart("bad"),
                ExpectedVersion::NoStream,
                &[item(2), item(9), item(2)],
            )
            .await
            .expect("append");
        let mut changes = vec![(0, change(cart("bad"), 3, now_us()))];
        for i in 0..5 {
            let id = format!("good{i}");
            store
                .append(&cart(&id), ExpectedVersion::NoStream, &[item(2)])
                .await
                .expect("append");
            changes.push((0, change(cart(&id), 1, now_us())));
        }
        feed.changes.lock().expect("lock").extend(changes);
        assert!(!p.poll_shard(0).await.expect("poll"));
        // Every other stream flows, and the checkpoint moves on.
        assert_eq!(
            read.checkpoint("projector:shard:0")
                .await
                .expect("cp")
                .as_deref(),
            Some("5")
        );
        for i in 0..5 {
            assert_eq!(
                read.version("cart2:g1", &format!("good{i}"))
                    .await
                    .expect("v"),
                1
            );
        }
        // The cart projection holds the bad stream before the poison; the generic state view
        // (which reads any JSON object) goes on.
        assert_eq!(read.version("cart2:g1", "bad").await.expect("v"), 1);
        assert_eq!(read.version("state:g1", "cart:bad").await.expect("v"), 3);
        let parked = p.parked(None, 10).await.expect("parked");
        assert_eq!(parked.len(), 1, "{parked:?}");
        let first = parked[0].clone();
        assert_eq!(
            (first.projection.as_str(), &first.stream, first.version),
            ("cart2", &cart("bad"), 2)
        );
        assert!(first.reason.contains("schema"), "{}", first.reason);
        assert_eq!(p.parked_count("cart2").await.expect("count"), 1);
        assert_eq!(p.parked_count("book").await.expect("count"), 0);
        assert!(matches!(
            p.parked_count("nope").await,
            Err(ProjectError::UnknownProjection(_))
        ));
        // A later change of the parked stream is passed over for that projection only.
        store
            .append(&cart("bad"), ExpectedVersion::Exact(3), &[item(2)])
            .await
            .expect("append");
        feed.changes
            .lock()
            .expect("lock")
            .push((0, change(cart("bad"), 4, now_us())));
        p.poll_shard(0).await.expect("poll");
        assert_eq!(
            read.checkpoint("projector:shard:0")
                .await
                .expect("cp")
                .as_deref(),
            Some("6")
        );
        assert_eq!(read.version("cart2:g1", "bad").await.expect("v"), 1);
        assert_eq!(read.version("state:g1", "cart:bad").await.expect("v"), 4);
        assert_eq!(p.parked(Some("cart2"), 10).await.expect("parked"), [first]);

        // Retrying without a fix parks it again; a skip of another version is refused.
        assert!(matches!(
            p.retry_parked("cart2", &cart("bad")).await.expect("retry"),
            RetryOutcome::StillParked(reason) if reason.contains("schema")
        ));
        assert!(!p
            .skip_parked("cart2", &cart("bad"), 3, "wrong one")
            .await
            .expect("skip"));
        // Skipping the poison event: a no-op for that projection, recorded forever.
        assert!(p
            .skip_parked("cart2", &cart("bad"), 2, "bad data from the import")
            .await
            .expect("skip"));
        assert_eq!(read.version("cart2:g1", "bad").await.expect("v"), 4);
        let doc = read
            .get("cart2:g1", "bad")
            .await
            .expect("get")
            .expect("doc");
        assert_eq!(
            esq_domain::cart::CartView::from_doc(&doc).items[0].quantity,
            3,
            "events 1, 3 and 4 applied; 2 skipped"
        );
        assert_eq!(p.parked_count("cart2").await.expect("count"), 0);
        assert_eq!(
            p.skipped_versions("cart2", &cart("bad"))
                .await
                .expect("skips"),
            [2]
        );
        assert!(p
            .skipped_versions("cart2", &cart("ba"))
            .await
            .expect("skips")
            .is_empty());
        assert_eq!(
            p.retry_parked("cart2", &cart("bad")).await.expect("retry"),
            RetryOutcome::NotParked
        );
        // A rebuild from scratch honours the skip.
        let fresh = esq_readstore::memory::MemoryStore::new();
        let q = Projector::new(
            store.clone(),
            feed.clone(),
            std::sync::Arc::new(fresh.clone()),
            Config::default(),
        );
        fresh
            .put_record(
                "projector:skipped:cart2",
                &format!("{}@{:020}", cart("bad"), 2),
                "{}",
            )
            .await
            .expect("put");
        q.catch_up().await.expect("rebuild");
        assert_eq!(fresh.version("cart2:g1", "bad").await.expect("v"), 4);
        assert_eq!(q.parked_count("cart2").await.expect("count"), 0);
    }
}
