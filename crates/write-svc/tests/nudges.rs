//! The fast path's nudges carry what the store recorded: for commands and raw appends through
//! the executor, the events a nudge message carries (after encoding and parsing) are exactly
//! what a read of those versions returns, so a projector that applies them instead of reading
//! folds the same events.

use esq_domain::aggregate::encode;
use esq_domain::cart::{Cart, CartCommand, CartEvent};
use esq_domain::{AppendResult, ExpectedVersion, NewEvent, StreamId};
use esq_eventstore::embedded::EmbeddedStore;
use esq_eventstore::{nudge_message, parse_nudge, EventStore, NudgeMessage, ReadRequest};
use esq_write_svc::commands::{CommandOptions, Executor};
use esq_write_svc::Nudge;
use std::sync::{Arc, Mutex};

fn options(command_id: &str) -> CommandOptions<'_> {
    CommandOptions {
        expected_version: None,
        command_id,
        deadline: None,
    }
}

#[tokio::test]
async fn nudges_carry_the_events_a_read_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(EmbeddedStore::open(dir.path()).expect("open"));
    let sent: Arc<Mutex<Vec<NudgeMessage>>> = Arc::default();
    let nudge: Nudge = {
        let sent = Arc::clone(&sent);
        Arc::new(
            move |stream: &StreamId, result: &AppendResult, events: &[NewEvent]| {
                let parsed = parse_nudge(&nudge_message(stream, result, events)).expect("parses");
                sent.lock().expect("lock").push(parsed);
            },
        )
    };
    let executor = Executor::new(Arc::clone(&store), Some(nudge));
    let cart = StreamId::new("cart", "nudged").expect("valid");
    let add = |sku: &str| CartCommand::AddItem {
        sku: sku.into(),
        quantity: 2,
        unit_price_cents: 150,
    };
    executor
        .execute::<Cart>(&cart, &add("a"), options("cmd-1"))
        .await
        .expect("add");
    executor
        .execute::<Cart>(&cart, &add("b"), options(""))
        .await
        .expect("add");
    // A retried command appends nothing and nudges nothing.
    executor
        .execute::<Cart>(&cart, &add("a"), options("cmd-1"))
        .await
        .expect("retry");
    let removed = |sku: &str| {
        let mut event = encode(&CartEvent::ItemRemoved {
            sku: sku.into(),
            quantity: 1,
            unit_price_cents: 150,
        });
        event.metadata.insert("source".into(), "test".into());
        event
    };
    let raw = vec![removed("b"), removed("b")];
    executor
        .append_checked::<Cart>(&cart, ExpectedVersion::Exact(2), &raw, None)
        .await
        .expect("raw append");

    let sent = sent.lock().expect("lock").clone();
    assert_eq!(
        sent.iter().map(|n| n.version).collect::<Vec<_>>(),
        vec![1, 2, 4],
        "one nudge per append"
    );
    let stored = store
        .read(&cart, ReadRequest::forwards(1, 100))
        .await
        .expect("read");
    assert_eq!(stored.len(), 4);
    let carried: Vec<_> = sent.into_iter().flat_map(|n| n.events).collect();
    assert_eq!(
        carried, stored,
        "the nudges carried every event as recorded"
    );
}
