//! Which generations of each projection the projector writes to.
//!
//! Each projection's generation record (see [`esq_readstore::generations`]) names its active
//! generation and, during a rebuild, the generation being built. Every apply goes to the
//! building generation first, then to the active one ([`GenerationRecord::targets`]). The
//! projector reads the records at every lease renewal (every `lease_ttl / lease_renewals_per_ttl`) and keeps them in
//! [`Targets`] meanwhile; a rebuild waits a whole `lease_ttl` after registering its generation
//! before it scans the store, so that by then every live projector writes to it too.
//!
//! A projection without a record gets one here: an empty event store (a new deployment) starts
//! with generation 1 active; a read model that has old keys (the marker of the layout from
//! before generations) keeps serving them as generation 0 and asks for a rebuild; a read model
//! that lost everything (a flushed Redis) starts generation 1 empty, filled by live changes at
//! once, and asks for a rebuild that fills the rest.

use crate::{ProjectError, Projector, READ_MODEL_LAYOUT};
use esq_eventstore::{ChangeFeed, EventStore};
use esq_readstore::generations::{read_record, swap_record, GenerationRecord};
use esq_readstore::{Coordination, ReadStore};
use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

/// The namespaces each projection writes to, as last read from the generation records.
#[derive(Debug, Default)]
pub(crate) struct Targets {
    by_projection: RwLock<HashMap<String, Vec<String>>>,
}

impl Targets {
    /// The namespaces of `projection`, building first; `None` before the records were read.
    pub(crate) fn of(&self, projection: &str) -> Option<Vec<String>> {
        self.by_projection
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(projection)
            .cloned()
    }

    pub(crate) fn set(&self, projection: &str, record: &GenerationRecord) {
        let targets = record.targets(projection);
        let mut map = self
            .by_projection
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if map.get(projection) != Some(&targets) {
            tracing::info!(projection, ?targets, "projection writes to new generations");
            map.insert(projection.to_owned(), targets);
        }
    }
}

impl<E: EventStore, F: ChangeFeed, R: ReadStore + Coordination> Projector<E, F, R> {
    /// The name of the marker the layout from before generations left in the read store.
    fn legacy_marker(&self) -> String {
        format!(
            "{}:marker:{READ_MODEL_LAYOUT}",
            self.config.checkpoint_prefix
        )
    }

    /// Reads every projection's generation record into [`Targets`], creating the records that
    /// are missing (see the module docs). With `fill_in_place`, a missing record of a store
    /// that has events gets generation 1 filled from the whole event store right here, before
    /// returning — only for a projector that serves no queries yet (`esq dev` at start).
    pub async fn refresh_generations(&self, fill_in_place: bool) -> Result<(), ProjectError> {
        let mut fill = Vec::new();
        for p in &self.projections {
            let name = p.name();
            let record = match read_record(self.read.as_ref(), name).await? {
                Some((record, _)) => record,
                None => {
                    let record = self.initial_record(fill_in_place).await?;
                    if swap_record(self.read.as_ref(), name, None, &record).await? {
                        tracing::warn!(projection = name, ?record, "new generation record");
                        if record.active == Some(1) && !record.requested {
                            // Generation 1 of an empty store, or filled right here below: its
                            // derived projections are built along with it.
                            self.mark_derived_filled(name, 1).await?;
                        }
                        if fill_in_place && record.active == Some(1) && !record.requested {
                            fill.push(name);
                        }
                        record
                    } else {
                        // Another replica created it first: use theirs.
                        read_record(self.read.as_ref(), name)
                            .await?
                            .map(|(r, _)| r)
                            .unwrap_or(record)
                    }
                }
            };
            self.targets.set(name, &record);
        }
        if !fill.is_empty() {
            let streams = self.sync_all_streams().await?;
            tracing::info!(streams, projections = ?fill, "read model built from the event store");
        }
        Ok(())
    }

    async fn initial_record(&self, fill_in_place: bool) -> Result<GenerationRecord, ProjectError> {
        let first = GenerationRecord {
            active: Some(1),
            last: 1,
            layout: READ_MODEL_LAYOUT,
            ..GenerationRecord::default()
        };
        if self.read.checkpoint(&self.legacy_marker()).await?.is_some() {
            // The upgrade: the old keys keep serving while generation 1 is built.
            return Ok(GenerationRecord {
                active: Some(0),
                last: 0,
                requested: true,
                ..first
            });
        }
        let empty = self.store.list_streams(None, 1).await?.streams.is_empty();
        Ok(GenerationRecord {
            requested: !empty && !fill_in_place,
            ..first
        })
    }

    /// Brings every stream of the event store into the namespaces of [`Targets`] (ignoring
    /// leases), a page of streams and a page of events at a time.
    async fn sync_all_streams(&self) -> Result<u64, ProjectError> {
        let mut cursor = None;
        let mut streams = 0u64;
        loop {
            let page = self
                .store
                .list_streams(cursor, self.config.list_page)
                .await?;
            for stream in &page.streams {
                self.sync(stream, None).await?;
                streams += 1;
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => return Ok(streams),
            }
        }
    }
}
