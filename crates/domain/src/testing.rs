//! Test helpers shared by the domain's unit tests: recording decided events as a store would.

use crate::aggregate::{self, Aggregate, Folded};
use crate::{DomainError, NewEvent, RecordedEvent, StreamId};

/// Records `events` at the end of `history`, as an event store would, with a recorded time
/// derived from the version so that tests can predict it.
pub fn record(stream: &StreamId, history: &mut Vec<RecordedEvent>, events: Vec<NewEvent>) {
    for e in events {
        let version = history.len() as u64 + 1;
        history.push(RecordedEvent {
            stream: stream.clone(),
            version,
            event_id: e.event_id,
            event_type: e.event_type,
            schema_version: e.schema_version,
            content_type: e.content_type,
            data: e.data,
            metadata: e.metadata,
            recorded_at_us: recorded_at(version),
        });
    }
}

/// The recorded time [`record`] gives the event at `version`.
pub fn recorded_at(version: u64) -> i64 {
    1_700_000_000_000_000 + version as i64
}

/// A test's event stream: loads the aggregate from its history and runs commands against it.
pub struct Given<A: Aggregate> {
    /// The stream the events belong to.
    pub stream: StreamId,
    /// Every event recorded so far.
    pub history: Vec<RecordedEvent>,
    /// The aggregate's document folded from `history`.
    pub folded: Folded,
    /// The aggregate read from `folded`.
    pub state: A,
}

impl<A: Aggregate> Given<A> {
    /// An empty stream with the given id.
    pub fn new(id: &str) -> Self {
        Self {
            stream: StreamId::new(A::KIND, id).expect("test stream ids are valid"),
            history: Vec::new(),
            folded: Folded::default(),
            state: A::from_doc(&Default::default()),
        }
    }

    /// Decides `command`, records the events it produces and folds them; returns how many.
    pub fn run(&mut self, command: A::Command) -> Result<usize, DomainError> {
        let events = aggregate::decide(&self.state, &command)?;
        let n = events.len();
        self.record(events);
        Ok(n)
    }

    /// Like [`Given::run`], for commands the test expects to succeed.
    pub fn ok(mut self, command: A::Command) -> Self {
        self.run(command)
            .expect("the test's setup command succeeds");
        self
    }

    /// Records a raw event, e.g. an old schema version, and folds it.
    pub fn raw(mut self, event: NewEvent) -> Self {
        self.record(vec![event]);
        self
    }

    fn record(&mut self, events: Vec<NewEvent>) {
        let start = self.history.len();
        record(&self.stream, &mut self.history, events);
        self.folded
            .extend(&A::Projection::default(), &self.history[start..])
            .expect("the aggregate's own events fold");
        self.state = self.folded.state();
    }
}
