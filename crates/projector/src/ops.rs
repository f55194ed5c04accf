//! What an operator sees of the projections and asks of them: the plain data types shared by the
//! projector's modules that produce them (generations and rebuilds, verify, parked streams,
//! shard freshness) and by `esq.v1.Projections`, which serves them over gRPC.

use esq_domain::StreamId;

/// One projection as an operator sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectionStatus {
    /// The projection's name (`cart2`, `book`, `state`, …).
    pub name: String,
    /// The generation queries read, `None` before the first build finished.
    pub active_generation: Option<u32>,
    /// The rebuild in progress or the last one, if any.
    pub rebuild: Option<RebuildProgress>,
    /// How many streams are parked for this projection.
    pub parked: u64,
    /// For a derived projection (`authors`, `sku_sales`), the projection it is derived from:
    /// its targets live in that projection's generations, so `active_generation` and
    /// `rebuild` are the source's (a rebuild of the source rebuilds it), and it parks nothing.
    pub derived_from: Option<String>,
}

/// Where a rebuild stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebuildState {
    /// Requested; no replica has started it yet.
    Requested,
    /// Folding every stream of the event store into the new generation.
    Building,
    /// The new generation is active; the old one's keys are being deleted.
    Swapped,
    /// Finished: the old generation is gone.
    Done,
    /// Given up; `error` says why. The active generation is unchanged.
    Failed,
}

/// Progress of one rebuild (a new generation built from the whole event store).
#[derive(Debug, Clone, PartialEq)]
pub struct RebuildProgress {
    /// The generation being built.
    pub generation: u32,
    /// Where it stands.
    pub state: RebuildState,
    /// Streams folded so far.
    pub streams_done: u64,
    /// Streams to fold, when known.
    pub streams_total: Option<u64>,
    /// Events folded so far.
    pub events_done: u64,
    /// Events to fold, when known.
    pub events_total: Option<u64>,
    /// When the build started (µs since the epoch); 0 while requested.
    pub started_at_us: i64,
    /// When this progress was last recorded (µs since the epoch).
    pub updated_at_us: i64,
    /// The replica running it.
    pub owner: String,
    /// Why it failed, for `Failed`.
    pub error: Option<String>,
}

impl RebuildProgress {
    /// Events per second since the start, from the recorded figures.
    pub fn rate(&self) -> f64 {
        let secs = (self.updated_at_us - self.started_at_us) as f64 / 1e6;
        if self.started_at_us > 0 && secs > 0.0 {
            self.events_done as f64 / secs
        } else {
            0.0
        }
    }

    /// Seconds left at the current rate, when the total is known and the rate is not zero.
    pub fn eta_seconds(&self) -> Option<f64> {
        let total = self.events_total?;
        let rate = self.rate();
        (rate > 0.0).then(|| total.saturating_sub(self.events_done) as f64 / rate)
    }
}

/// How fresh one change-log shard is in the read model.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardStatus {
    /// The shard.
    pub shard: u32,
    /// The projector replica holding its lease, if any.
    pub owner: Option<String>,
    /// Age of the newest change the checkpoint covers, in seconds (`None`: nothing processed).
    pub checkpoint_age_seconds: Option<f64>,
    /// Changes in the shard's log after the checkpoint (at most one poll page is counted).
    pub changes_behind: u64,
    /// How long the oldest unprocessed change has waited, in seconds (0 when none waits).
    pub seconds_behind: f64,
    /// When this status was recorded (µs since the epoch).
    pub updated_at_us: i64,
}

/// A stream a projection stopped applying because one of its events cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedStream {
    /// The projection that parked it.
    pub projection: String,
    /// The stream.
    pub stream: StreamId,
    /// The version of the event that could not be applied.
    pub version: u64,
    /// Why (decode error, upcaster failure, read store script error, …).
    pub reason: String,
    /// When it was parked (µs since the epoch).
    pub parked_at_us: i64,
}

/// What a retry of a parked stream came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryOutcome {
    /// The stream applies now and is no longer parked.
    Resumed,
    /// It still fails: parked again with this reason.
    StillParked(String),
    /// The stream was not parked for that projection.
    NotParked,
}

/// What `verify` compares and whether it repairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyOptions {
    /// The projection to verify.
    pub projection: String,
    /// How many differences to report in full (the counts cover all).
    pub examples: usize,
    /// Re-project the streams whose documents differ.
    pub repair: bool,
}

/// Progress of a running verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VerifyProgress {
    /// Streams folded and compared so far.
    pub streams_done: u64,
    /// Streams to compare, when known.
    pub streams_total: Option<u64>,
}

/// One difference between the read model and a fold of the event store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Missing (the fold has it, the read model not), extra, or different.
    pub kind: DifferenceKind,
    /// The document (or `index <name>` for an index entry).
    pub doc_id: String,
    /// Human-readable detail: the fields that differ, with expected and actual values.
    pub detail: String,
}

/// The kinds of [`Difference`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DifferenceKind {
    /// In the fold, not in the read model.
    Missing,
    /// In the read model, not in the fold.
    Extra,
    /// In both, with different fields.
    Different,
}

/// The outcome of a verify.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VerifyReport {
    /// The projection verified.
    pub projection: String,
    /// The generation compared (the active one).
    pub generation: u32,
    /// Streams folded.
    pub streams_checked: u64,
    /// Documents and index entries compared.
    pub docs_checked: u64,
    /// Counts by kind.
    pub missing: u64,
    /// Documents or entries only in the read model.
    pub extra: u64,
    /// Documents with different fields.
    pub different: u64,
    /// Streams re-projected by `repair`.
    pub repaired: u64,
    /// The first differences, at most `VerifyOptions::examples`.
    pub examples: Vec<Difference>,
}

impl VerifyReport {
    /// Whether the read model equals the fold.
    pub fn is_clean(&self) -> bool {
        self.missing + self.extra + self.different == 0
    }
}
