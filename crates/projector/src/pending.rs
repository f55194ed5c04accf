//! TEMPORARY placeholders (work in progress on issue 8): the operator methods that
//! `esq.v1.Projections` calls, each answering "not built yet" until its module lands. Each owner
//! deletes its block here when it adds the real method; this file must be gone before issue 8 is
//! called done.

use crate::ops::{ProjectionStatus, RebuildProgress, VerifyOptions, VerifyProgress, VerifyReport};
use crate::{ProjectError, Projector};
use esq_eventstore::{ChangeFeed, EventStore};
use esq_readstore::{Coordination, ReadError, ReadStore};

fn not_built(what: &str) -> ProjectError {
    ProjectError::Read(ReadError::Internal(format!("{what} is not built yet")))
}

// generations (rebuild status and requests)
impl<E: EventStore, F: ChangeFeed, R: ReadStore + Coordination> Projector<E, F, R> {
    /// Every projection with its active generation, rebuild and parked count.
    pub async fn projections_status(&self) -> Result<Vec<ProjectionStatus>, ProjectError> {
        Err(not_built("projections_status"))
    }

    /// Asks for a rebuild of `projection` into a new generation.
    pub async fn request_rebuild(&self, projection: &str) -> Result<RebuildProgress, ProjectError> {
        Err(not_built(projection))
    }

    /// The rebuild of `projection` in progress, or the last one.
    pub async fn rebuild_progress(
        &self,
        projection: &str,
    ) -> Result<Option<RebuildProgress>, ProjectError> {
        Err(not_built(projection))
    }
}

// verify
impl<E: EventStore, F: ChangeFeed, R: ReadStore + Coordination> Projector<E, F, R> {
    /// Compares the active generation of a projection with a fold of the event store.
    pub async fn verify(
        &self,
        options: &VerifyOptions,
        progress: &(dyn Fn(VerifyProgress) + Send + Sync),
    ) -> Result<VerifyReport, ProjectError> {
        let _ = progress;
        Err(not_built(&options.projection))
    }
}
