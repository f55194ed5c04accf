//! The shopping cart: add and remove priced items, then check out once.

use crate::aggregate::{decode_event, Aggregate};
use crate::ids::validate_id;
use crate::projection::{doc_version, Changes, Doc, FieldOp, Projection};
use crate::{DomainError, RecordedEvent};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The stream type of carts.
pub const KIND: &str = "cart";
/// Most units one command may add or remove.
pub const MAX_QUANTITY: i64 = 1_000_000;
/// Highest unit price accepted, in cents.
pub const MAX_UNIT_PRICE_CENTS: i64 = 100_000_000;

/// What a client may ask a cart to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CartCommand {
    /// Put `quantity` units of `sku` in the cart at `unit_price_cents` each.
    AddItem {
        /// The product.
        sku: String,
        /// Units to add, 1..=[`MAX_QUANTITY`].
        quantity: i64,
        /// Price of one unit, 0..=[`MAX_UNIT_PRICE_CENTS`].
        unit_price_cents: i64,
    },
    /// Take `quantity` units of `sku` out of the cart.
    RemoveItem {
        /// The product.
        sku: String,
        /// Units to remove, 1..=[`MAX_QUANTITY`].
        quantity: i64,
    },
    /// Close the cart for good.
    Checkout,
}

impl CartCommand {
    /// Checks the command's fields, independently of any cart.
    pub fn validate(&self) -> Result<(), DomainError> {
        match self {
            Self::AddItem {
                sku,
                quantity,
                unit_price_cents,
            } => {
                validate_id("sku", sku)?;
                validate_quantity(*quantity)?;
                if !(0..=MAX_UNIT_PRICE_CENTS).contains(unit_price_cents) {
                    return Err(DomainError::invalid(
                        "unit_price_cents",
                        format!("must be between 0 and {MAX_UNIT_PRICE_CENTS}"),
                    ));
                }
                Ok(())
            }
            Self::RemoveItem { sku, quantity } => {
                validate_id("sku", sku)?;
                validate_quantity(*quantity)
            }
            Self::Checkout => Ok(()),
        }
    }
}

fn validate_quantity(quantity: i64) -> Result<(), DomainError> {
    if quantity <= 0 {
        Err(DomainError::invalid("quantity", "must be greater than 0"))
    } else if quantity > MAX_QUANTITY {
        Err(DomainError::invalid(
            "quantity",
            format!("must be at most {MAX_QUANTITY}"),
        ))
    } else {
        Ok(())
    }
}

/// What happened to a cart, at the current schema of each event type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", content = "data")]
pub enum CartEvent {
    /// Units of a product went into the cart (schema v2; v1 had `qty` and no price).
    ItemAdded {
        /// The product.
        sku: String,
        /// Units added.
        quantity: i64,
        /// Price of one unit, in cents.
        unit_price_cents: i64,
    },
    /// Units of a product came out of the cart.
    ItemRemoved {
        /// The product.
        sku: String,
        /// Units removed.
        quantity: i64,
        /// The line's unit price, so that readers can adjust totals without history.
        unit_price_cents: i64,
    },
    /// The cart was checked out; nothing changes it afterwards.
    CheckedOut {
        /// Sum of quantity × unit price over all lines, in cents.
        total_cents: i64,
        /// Sum of quantities over all lines.
        item_count: i64,
    },
}

/// Whether a cart still accepts changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CartStatus {
    /// Items may be added and removed.
    #[default]
    Open,
    /// Checked out: closed for good.
    CheckedOut,
}

/// One product in a cart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line {
    /// Units held, always > 0 (a line that reaches 0 is removed).
    pub quantity: i64,
    /// Price of one unit, in cents.
    pub unit_price_cents: i64,
}

/// A cart's write-side state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cart {
    /// Open or checked out.
    pub status: CartStatus,
    /// Lines by sku.
    pub lines: BTreeMap<String, Line>,
}

impl Cart {
    /// Sum of quantity × unit price, in cents. Saturating, because events appended raw through
    /// the generic API may hold any numbers and must not crash the fold.
    pub fn total_cents(&self) -> i64 {
        self.lines.values().fold(0i64, |sum, l| {
            sum.saturating_add(l.quantity.saturating_mul(l.unit_price_cents))
        })
    }

    /// Sum of quantities.
    pub fn item_count(&self) -> i64 {
        self.lines
            .values()
            .fold(0i64, |sum, l| sum.saturating_add(l.quantity))
    }
}

impl Cart {
    /// Reads a cart from its [`CartProjection`] document: a line for every `item:<sku>` field
    /// holding a positive count, at the price in `price:<sku>`.
    pub fn from_doc(doc: &Doc) -> Cart {
        let int = |field: &str| doc.get(field).and_then(|v| v.parse::<i64>().ok());
        let lines = doc
            .iter()
            .filter_map(|(k, v)| {
                let sku = k.strip_prefix(ITEM_PREFIX)?;
                let quantity = v.parse().ok().filter(|q: &i64| *q > 0)?;
                let unit_price_cents = int(&format!("{PRICE_PREFIX}{sku}")).unwrap_or(0);
                Some((
                    sku.to_owned(),
                    Line {
                        quantity,
                        unit_price_cents,
                    },
                ))
            })
            .collect();
        let status = if doc.get(STATUS_FIELD).map(String::as_str) == Some(CHECKED_OUT) {
            CartStatus::CheckedOut
        } else {
            CartStatus::Open
        };
        Cart { status, lines }
    }
}

impl Aggregate for Cart {
    const KIND: &'static str = KIND;
    type Command = CartCommand;
    type Event = CartEvent;
    type Projection = CartProjection;

    fn from_doc(doc: &Doc) -> Self {
        Cart::from_doc(doc)
    }

    fn decide(&self, command: &CartCommand) -> Result<Vec<CartEvent>, DomainError> {
        command.validate()?;
        if self.status == CartStatus::CheckedOut {
            return Err(DomainError::Rule("cart is checked out".into()));
        }
        let event = match command {
            CartCommand::AddItem {
                sku,
                quantity,
                unit_price_cents,
            } => {
                if let Some(line) = self.lines.get(sku) {
                    if line.unit_price_cents != *unit_price_cents {
                        return Err(DomainError::Rule(format!(
                            "sku {sku} is already in the cart at {} cents a unit, not {unit_price_cents}; \
                             remove it first to change its price",
                            line.unit_price_cents
                        )));
                    }
                }
                CartEvent::ItemAdded {
                    sku: sku.clone(),
                    quantity: *quantity,
                    unit_price_cents: *unit_price_cents,
                }
            }
            CartCommand::RemoveItem { sku, quantity } => {
                let line = self.lines.get(sku).ok_or_else(|| {
                    DomainError::Rule(format!("cannot remove sku {sku}: it is not in the cart"))
                })?;
                if line.quantity < *quantity {
                    return Err(DomainError::Rule(format!(
                        "cannot remove {quantity} of sku {sku}: the cart holds {}",
                        line.quantity
                    )));
                }
                CartEvent::ItemRemoved {
                    sku: sku.clone(),
                    quantity: *quantity,
                    unit_price_cents: line.unit_price_cents,
                }
            }
            CartCommand::Checkout => {
                if self.lines.is_empty() {
                    return Err(DomainError::Rule("cannot check out an empty cart".into()));
                }
                CartEvent::CheckedOut {
                    total_cents: self.total_cents(),
                    item_count: self.item_count(),
                }
            }
        };
        Ok(vec![event])
    }

    fn command_for(_stream_id: &str, event: &CartEvent) -> Result<CartCommand, DomainError> {
        Ok(match event {
            CartEvent::ItemAdded {
                sku,
                quantity,
                unit_price_cents,
            } => CartCommand::AddItem {
                sku: sku.clone(),
                quantity: *quantity,
                unit_price_cents: *unit_price_cents,
            },
            CartEvent::ItemRemoved { sku, quantity, .. } => CartCommand::RemoveItem {
                sku: sku.clone(),
                quantity: *quantity,
            },
            CartEvent::CheckedOut { .. } => CartCommand::Checkout,
        })
    }
}

/// Document field prefix of a line's quantity (`item:<sku>`).
const ITEM_PREFIX: &str = "item:";
/// Document field prefix of a line's unit price (`price:<sku>`).
const PRICE_PREFIX: &str = "price:";
/// Document field holding the status once the cart is checked out.
const STATUS_FIELD: &str = "status";
/// The status value of a checked-out cart.
const CHECKED_OUT: &str = "checked_out";
/// Document field holding when the cart was checked out.
const CHECKED_OUT_AT_FIELD: &str = "checked_out_at_us";

/// The cart's document, which is both the aggregate's state ([`Cart::from_doc`]) and the read
/// model ([`CartView::from_doc`]): `item:<sku>` units, `price:<sku>` unit price, `status` and
/// `checked_out_at_us` once checked out.
#[derive(Debug, Clone, Copy, Default)]
pub struct CartProjection;

impl Projection for CartProjection {
    /// `cart2`: the document layout of counts that never go below one; the name changed with
    /// that meaning, so an upgraded deployment builds these documents afresh from the events
    /// instead of continuing documents folded under the old meaning.
    fn name(&self) -> &'static str {
        "cart2"
    }

    fn handles(&self, stream_kind: &str) -> bool {
        stream_kind == KIND
    }

    fn project(&self, event: &RecordedEvent, out: &mut Changes) -> Result<(), String> {
        match decode_event(event)? {
            // Units add to the line; the line takes the event's price.
            CartEvent::ItemAdded {
                sku,
                quantity,
                unit_price_cents,
            } => out.fields.extend([
                FieldOp::Adjust(format!("{ITEM_PREFIX}{sku}"), quantity),
                FieldOp::Set(format!("{PRICE_PREFIX}{sku}"), unit_price_cents.to_string()),
            ]),
            // Units leave the line; a line that reaches 0 is gone.
            CartEvent::ItemRemoved { sku, quantity, .. } => out.fields.push(FieldOp::Adjust(
                format!("{ITEM_PREFIX}{sku}"),
                quantity.saturating_neg(),
            )),
            CartEvent::CheckedOut { .. } => out.fields.extend([
                FieldOp::Set(STATUS_FIELD.into(), CHECKED_OUT.into()),
                FieldOp::Set(
                    CHECKED_OUT_AT_FIELD.into(),
                    event.recorded_at_us.to_string(),
                ),
            ]),
        }
        Ok(())
    }
}

/// One line of a [`CartView`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CartLine {
    /// The product.
    pub sku: String,
    /// Units held.
    pub quantity: i64,
    /// Price of one unit, in cents.
    pub unit_price_cents: i64,
}

/// A cart as queries see it: the [`Cart`] its document holds, with the document's version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CartView {
    /// `open` or `checked_out`.
    pub status: String,
    /// Lines holding at least one unit, sorted by sku.
    pub items: Vec<CartLine>,
    /// Sum of quantity × unit price, in cents.
    pub total_cents: i64,
    /// Sum of quantities.
    pub item_count: i64,
    /// The last stream version the document reflects (0: no events yet).
    pub version: u64,
    /// When the cart was checked out, microseconds since the Unix epoch.
    pub checked_out_at_us: Option<i64>,
}

impl CartView {
    /// Reads a cart document through [`Cart::from_doc`], the aggregate's own reading of it, so
    /// that queries and commands see the same cart.
    pub fn from_doc(doc: &Doc) -> CartView {
        let cart = Cart::from_doc(doc);
        CartView {
            status: match cart.status {
                CartStatus::Open => "open",
                CartStatus::CheckedOut => CHECKED_OUT,
            }
            .to_owned(),
            total_cents: cart.total_cents(),
            item_count: cart.item_count(),
            items: cart
                .lines
                .into_iter()
                .map(|(sku, l)| CartLine {
                    sku,
                    quantity: l.quantity,
                    unit_price_cents: l.unit_price_cents,
                })
                .collect(),
            version: doc_version(doc),
            checked_out_at_us: doc
                .get(CHECKED_OUT_AT_FIELD)
                .and_then(|v| v.parse::<i64>().ok()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::fold;
    use crate::testing::{recorded_at, Given};
    use crate::NewEvent;
    use serde_json::json;
    use std::collections::HashMap;

    fn add(sku: &str, quantity: i64, unit_price_cents: i64) -> CartCommand {
        CartCommand::AddItem {
            sku: sku.into(),
            quantity,
            unit_price_cents,
        }
    }

    fn remove(sku: &str, quantity: i64) -> CartCommand {
        CartCommand::RemoveItem {
            sku: sku.into(),
            quantity,
        }
    }

    fn cart() -> Given<Cart> {
        Given::new("c-1")
    }

    fn invalid_field(result: Result<usize, DomainError>) -> String {
        match result {
            Err(DomainError::Invalid { field, .. }) => field,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    fn rule(result: Result<usize, DomainError>) -> String {
        match result {
            Err(DomainError::Rule(message)) => message,
            other => panic!("expected Rule, got {other:?}"),
        }
    }

    #[test]
    fn sku_must_be_a_valid_id() {
        assert_eq!(invalid_field(cart().run(add("", 1, 1))), "sku");
        assert_eq!(invalid_field(cart().run(add("a b", 1, 1))), "sku");
        assert_eq!(invalid_field(cart().run(remove("a{b}", 1))), "sku");
    }

    #[test]
    fn quantity_must_be_greater_than_zero() {
        for q in [0, -1] {
            let err = cart().run(add("A", q, 1)).expect_err("refused");
            assert_eq!(
                err,
                DomainError::invalid("quantity", "must be greater than 0")
            );
        }
        assert_eq!(
            invalid_field(cart().ok(add("A", 1, 1)).run(remove("A", 0))),
            "quantity"
        );
    }

    #[test]
    fn quantity_is_at_most_a_million() {
        assert_eq!(cart().run(add("A", MAX_QUANTITY, 0)), Ok(1));
        assert_eq!(
            invalid_field(cart().run(add("A", MAX_QUANTITY + 1, 0))),
            "quantity"
        );
        assert_eq!(
            invalid_field(cart().run(remove("A", MAX_QUANTITY + 1))),
            "quantity"
        );
    }

    #[test]
    fn unit_price_must_be_within_bounds() {
        assert_eq!(cart().run(add("A", 1, 0)), Ok(1));
        assert_eq!(cart().run(add("A", 1, MAX_UNIT_PRICE_CENTS)), Ok(1));
        assert_eq!(
            invalid_field(cart().run(add("A", 1, -1))),
            "unit_price_cents"
        );
        assert_eq!(
            invalid_field(cart().run(add("A", 1, MAX_UNIT_PRICE_CENTS + 1))),
            "unit_price_cents"
        );
    }

    #[test]
    fn validation_comes_before_rules() {
        let mut done = cart().ok(add("A", 1, 1)).ok(CartCommand::Checkout);
        assert_eq!(invalid_field(done.run(add("A", 0, 1))), "quantity");
    }

    #[test]
    fn adding_accumulates_lines() {
        let c = cart()
            .ok(add("B", 2, 100))
            .ok(add("A", 1, 50))
            .ok(add("B", 3, 100));
        assert_eq!(
            c.state.lines["B"],
            Line {
                quantity: 5,
                unit_price_cents: 100
            }
        );
        assert_eq!((c.state.total_cents(), c.state.item_count()), (550, 6));
    }

    #[test]
    fn adding_a_sku_at_a_different_price_is_refused() {
        let message = rule(cart().ok(add("A", 1, 100)).run(add("A", 1, 120)));
        assert!(
            message.contains("sku A is already in the cart at 100 cents"),
            "{message}"
        );
    }

    #[test]
    fn a_removed_line_can_come_back_at_a_new_price() {
        let c = cart()
            .ok(add("A", 1, 100))
            .ok(remove("A", 1))
            .ok(add("A", 1, 120));
        assert_eq!(c.state.lines["A"].unit_price_cents, 120);
    }

    #[test]
    fn cannot_remove_a_sku_not_in_the_cart() {
        let message = rule(cart().ok(add("A", 1, 1)).run(remove("X", 1)));
        assert_eq!(message, "cannot remove sku X: it is not in the cart");
    }

    #[test]
    fn cannot_remove_more_than_the_cart_holds() {
        let message = rule(cart().ok(add("X", 1, 1)).run(remove("X", 3)));
        assert_eq!(message, "cannot remove 3 of sku X: the cart holds 1");
    }

    #[test]
    fn removing_everything_drops_the_line() {
        let c = cart().ok(add("A", 2, 1)).ok(remove("A", 1));
        assert_eq!(c.state.lines["A"].quantity, 1);
        let c = c.ok(remove("A", 1));
        assert!(c.state.lines.is_empty());
    }

    #[test]
    fn cannot_check_out_an_empty_cart() {
        assert_eq!(
            rule(cart().run(CartCommand::Checkout)),
            "cannot check out an empty cart"
        );
        let mut emptied = cart().ok(add("A", 1, 1)).ok(remove("A", 1));
        assert_eq!(
            rule(emptied.run(CartCommand::Checkout)),
            "cannot check out an empty cart"
        );
    }

    #[test]
    fn cannot_check_out_twice() {
        let mut c = cart().ok(add("A", 1, 1)).ok(CartCommand::Checkout);
        assert_eq!(c.state.status, CartStatus::CheckedOut);
        assert_eq!(rule(c.run(CartCommand::Checkout)), "cart is checked out");
    }

    #[test]
    fn no_change_after_checkout() {
        let mut c = cart().ok(add("A", 1, 1)).ok(CartCommand::Checkout);
        assert_eq!(rule(c.run(add("B", 1, 1))), "cart is checked out");
        assert_eq!(rule(c.run(remove("A", 1))), "cart is checked out");
    }

    #[test]
    fn events_are_self_describing_json() {
        let c = cart()
            .ok(add("A", 2, 150))
            .ok(remove("A", 1))
            .ok(CartCommand::Checkout);
        let shapes: Vec<_> = c
            .history
            .iter()
            .map(|e| {
                (
                    e.event_type.as_str(),
                    e.schema_version,
                    e.json().expect("JSON"),
                )
            })
            .collect();
        assert_eq!(
            shapes,
            [
                (
                    "ItemAdded",
                    2,
                    json!({"sku": "A", "quantity": 2, "unit_price_cents": 150})
                ),
                (
                    "ItemRemoved",
                    1,
                    json!({"sku": "A", "quantity": 1, "unit_price_cents": 150})
                ),
                (
                    "CheckedOut",
                    1,
                    json!({"total_cents": 150, "item_count": 1})
                ),
            ]
        );
    }

    #[test]
    fn v1_item_added_is_read_through_the_upcaster() {
        let old = NewEvent::json("ItemAdded", 1, &json!({"sku": "A", "qty": 4}));
        let c = cart().raw(old).ok(add("A", 1, 0));
        assert_eq!(
            c.state.lines["A"],
            Line {
                quantity: 5,
                unit_price_cents: 0
            }
        );
        let view = CartView::from_doc(&fold(&CartProjection, &c.history).expect("fold"));
        assert_eq!(view.items[0].quantity, 5);
        assert_eq!(view.item_count, 5);
    }

    #[test]
    fn unreadable_events_stop_every_fold_naming_stream_and_version() {
        for (event, why) in [
            (
                NewEvent::json("Renamed", 1, &json!({"name": "x"})),
                "Renamed",
            ),
            (
                NewEvent::json("ItemAdded", 9, &json!({"sku": "A"})),
                "schema_version",
            ),
            (NewEvent::json("ItemAdded", 2, &json!({"sku": 5})), "data"),
        ] {
            let c = cart().ok(add("A", 1, 5));
            let mut history = c.history.clone();
            crate::testing::record(&c.stream, &mut history, vec![event]);
            let e = fold(&CartProjection, &history).expect_err("unreadable");
            assert_eq!((e.version, &e.stream), (2, &c.stream));
            assert!(e.reason.contains(why), "{why}: {e}");
            // The aggregate's fold is the same fold: the command side refuses to decide on it.
            let refused = DomainError::from(
                crate::aggregate::load::<Cart>(&history).expect_err("unreadable"),
            );
            assert!(
                matches!(&refused, DomainError::Rule(m) if m.contains("event 2 of stream cart")),
                "{refused}"
            );
        }
    }

    #[test]
    fn projection_folds_into_the_view() {
        let c = cart()
            .ok(add("B", 2, 100))
            .ok(add("A", 1, 250))
            .ok(add("C", 1, 5))
            .ok(remove("C", 1))
            .ok(remove("B", 1));
        let view = CartView::from_doc(&fold(&CartProjection, &c.history).expect("fold"));
        assert_eq!(
            view,
            CartView {
                status: "open".into(),
                items: vec![
                    CartLine {
                        sku: "A".into(),
                        quantity: 1,
                        unit_price_cents: 250
                    },
                    CartLine {
                        sku: "B".into(),
                        quantity: 1,
                        unit_price_cents: 100
                    },
                ],
                total_cents: 350,
                item_count: 2,
                version: 5,
                checked_out_at_us: None,
            }
        );
        assert_eq!(view.total_cents, c.state.total_cents());
    }

    #[test]
    fn projection_records_checkout() {
        let c = cart().ok(add("A", 3, 10)).ok(CartCommand::Checkout);
        let view = CartView::from_doc(&fold(&CartProjection, &c.history).expect("fold"));
        assert_eq!(view.status, "checked_out");
        assert_eq!(view.checked_out_at_us, Some(recorded_at(2)));
        assert_eq!(
            (view.total_cents, view.item_count, view.version),
            (30, 3, 2)
        );
    }

    #[test]
    fn empty_document_is_an_empty_open_cart() {
        let view = CartView::from_doc(&HashMap::new());
        assert_eq!(
            (view.status.as_str(), view.version, view.items.len()),
            ("open", 0, 0)
        );
    }

    /// The cart's meaning as plain code, independent of documents: what the fold must equal.
    /// Units per sku never show as 0 or less; a line's price is the last price it was added at.
    fn model(events: &[RecordedEvent]) -> (CartStatus, BTreeMap<String, Line>) {
        let mut status = CartStatus::Open;
        let mut units = BTreeMap::<String, i64>::new();
        let mut prices = BTreeMap::<String, i64>::new();
        let mut adjust = |sku: String, by: i64| {
            let n = units.get(&sku).copied().unwrap_or(0).saturating_add(by);
            if n > 0 {
                units.insert(sku, n);
            } else {
                units.remove(&sku);
            }
        };
        for e in events {
            match crate::aggregate::decode::<CartEvent>(e) {
                Some(CartEvent::ItemAdded {
                    sku,
                    quantity,
                    unit_price_cents,
                }) => {
                    prices.insert(sku.clone(), unit_price_cents);
                    adjust(sku, quantity);
                }
                Some(CartEvent::ItemRemoved { sku, quantity, .. }) => {
                    adjust(sku, quantity.saturating_neg())
                }
                Some(CartEvent::CheckedOut { .. }) => status = CartStatus::CheckedOut,
                None => {}
            }
        }
        let lines = units
            .into_iter()
            .map(|(sku, quantity)| {
                let unit_price_cents = prices.get(&sku).copied().unwrap_or(0);
                (
                    sku,
                    Line {
                        quantity,
                        unit_price_cents,
                    },
                )
            })
            .collect();
        (status, lines)
    }

    /// Any cart command over a few SKUs and prices, valid in some states and refused in others.
    fn command() -> impl proptest::strategy::Strategy<Value = CartCommand> {
        use proptest::prelude::*;
        let sku = prop::sample::select(vec!["A", "B", "C"]);
        prop_oneof![
            4 => (sku.clone(), 1i64..5, prop::sample::select(vec![100i64, 150]))
                .prop_map(|(s, q, p)| add(s, q, p)),
            2 => (sku, 1i64..4).prop_map(|(s, q)| remove(s, q)),
            1 => Just(CartCommand::Checkout),
        ]
    }

    proptest::proptest! {
        /// Whatever reached a stream (old data, raw appends of any shape), the aggregate, the
        /// read model in any batching, and the plain-code model agree.
        #[test]
        fn fold_agrees_with_the_model_and_any_batching(
            events in proptest::collection::vec(crate::arbitrary::raw_cart_event(), 0..30),
            cuts in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 0..6),
        ) {
            let mut given = cart();
            // Events the projection cannot read stop the fold (tested above): leave them out.
            for e in events.into_iter().filter(readable) {
                given = given.raw(e);
            }
            let (status, lines) = model(&given.history);
            proptest::prop_assert_eq!(&given.state, &Cart { status, lines });
            // The read model, applied in arbitrary batches.
            let mut bounds: Vec<usize> = cuts.iter().map(|c| c.index(given.history.len() + 1)).collect();
            bounds.extend([0, given.history.len()]);
            bounds.sort_unstable();
            bounds.dedup();
            let mut doc = Doc::new();
            for w in bounds.windows(2) {
                let b = crate::projection::batch(&CartProjection, &given.history[w[0]..w[1]])
                    .expect("projects")
                    .expect("non-empty");
                crate::projection::apply_to_doc(&mut doc, &b);
            }
            let view = CartView::from_doc(&doc);
            proptest::prop_assert_eq!(view.total_cents, given.state.total_cents());
            proptest::prop_assert_eq!(view.item_count, given.state.item_count());
            proptest::prop_assert_eq!(view.items.len(), given.state.lines.len());
            proptest::prop_assert_eq!(Cart::from_doc(&doc), given.state);
        }

        /// Temporal queries: the cart at version N, folded from the events up to N (in pages of
        /// any size, as the temporal queries read them), is the document the read model held
        /// right after applying N, for any command sequence and any batching of the projector's
        /// applies.
        #[test]
        fn state_at_a_version_is_what_the_read_model_held_then(
            commands in proptest::collection::vec(command(), 1..30),
            cuts in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 0..8),
            page in 1usize..=6,
        ) {
            let mut given = cart();
            for c in commands {
                let _ = given.run(c); // refused commands record nothing
            }
            let history = &given.history;
            let mut bounds: Vec<usize> = cuts.iter().map(|c| c.index(history.len() + 1)).collect();
            bounds.extend([0, history.len()]);
            bounds.sort_unstable();
            bounds.dedup();
            // The read model, batch by batch, recording the document after each apply.
            let mut doc = Doc::new();
            let mut held = Vec::new();
            for w in bounds.windows(2) {
                let b = crate::projection::batch(&CartProjection, &history[w[0]..w[1]])
                    .expect("projects")
                    .expect("non-empty");
                proptest::prop_assert_eq!(
                    crate::projection::apply_to_doc(&mut doc, &b),
                    crate::projection::ApplyOutcome::Applied
                );
                held.push((w[1], doc.clone()));
            }
            for (n, held) in held {
                let mut at = crate::aggregate::Folded::default();
                for chunk in history[..n].chunks(page) {
                    at.extend(&CartProjection, chunk).expect("fold");
                }
                proptest::prop_assert_eq!(at.version, n as u64);
                proptest::prop_assert_eq!(&at.doc, &held);
                proptest::prop_assert_eq!(&fold(&CartProjection, &history[..n]).expect("fold"), &held);
                proptest::prop_assert_eq!(CartView::from_doc(&at.doc), CartView::from_doc(&held));
            }
        }

        /// Raw appends that the contract accepts keep the cart exactly where commands would.
        #[test]
        fn accepted_raw_appends_are_what_commands_record(
            events in proptest::collection::vec(crate::arbitrary::raw_cart_event(), 0..30),
        ) {
            let mut given = cart();
            for e in events {
                if crate::aggregate::check_append::<Cart>(&given.stream, &given.folded, std::slice::from_ref(&e)).is_ok() {
                    given = given.raw(e);
                }
            }
            // Every line holds units at one price, and a checkout records the true totals.
            let mut replay = cart();
            for e in &given.history {
                let command = Cart::command_for("c-1", &crate::aggregate::decode::<CartEvent>(e).expect("decodes"))
                    .expect("a command");
                proptest::prop_assert_eq!(replay.run(command), Ok(1));
            }
            proptest::prop_assert_eq!(replay.state, given.state);
        }
    }

    /// Whether the cart projection can read `event`.
    fn readable(event: &NewEvent) -> bool {
        let mut one = Vec::new();
        crate::testing::record(&cart().stream, &mut one, vec![event.clone()]);
        crate::aggregate::decode::<CartEvent>(&one[0]).is_some()
    }

    fn refused(given: &Given<Cart>, event: NewEvent) -> DomainError {
        crate::aggregate::check_append::<Cart>(&given.stream, &given.folded, &[event])
            .expect_err("refused")
    }

    #[test]
    fn raw_appends_are_held_to_the_cart_rules() {
        let given = cart().ok(add("apple", 2, 150));
        let added = |q: i64, p: i64| {
            NewEvent::json(
                "ItemAdded",
                2,
                &json!({"sku": "apple", "quantity": q, "unit_price_cents": p}),
            )
        };
        let message = refused(&given, added(1, 999)).to_string();
        assert!(
            message.contains("events[0] (ItemAdded)")
                && message.contains("already in the cart at 150 cents"),
            "{message}"
        );
        let message = refused(
            &given,
            NewEvent::json(
                "ItemRemoved",
                1,
                &json!({"sku": "pear", "quantity": 4, "unit_price_cents": 100}),
            ),
        )
        .to_string();
        assert!(message.contains("not in the cart"), "{message}");
        // The line's price is part of the removal.
        assert!(matches!(
            refused(
                &given,
                NewEvent::json(
                    "ItemRemoved",
                    1,
                    &json!({"sku": "apple", "quantity": 1, "unit_price_cents": 1})
                )
            ),
            DomainError::Rule(_)
        ));
        // A checkout must record the cart's true totals.
        let message = refused(
            &given,
            NewEvent::json("CheckedOut", 1, &json!({"total_cents": 1, "item_count": 2})),
        )
        .to_string();
        assert!(message.contains("total_cents"), "{message}");
        // Valid raw events pass, also several depending on each other.
        let ok = [
            added(1, 150),
            NewEvent::json(
                "ItemRemoved",
                1,
                &json!({"sku": "apple", "quantity": 3, "unit_price_cents": 150}),
            ),
            NewEvent::json("ItemAdded", 1, &json!({"sku": "pear", "qty": 2})),
            NewEvent::json("CheckedOut", 1, &json!({"total_cents": 0, "item_count": 2})),
        ];
        assert_eq!(
            crate::aggregate::check_append::<Cart>(&given.stream, &given.folded, &ok),
            Ok(())
        );
    }

    #[test]
    fn malformed_raw_events_name_the_field() {
        let given = cart().ok(add("A", 1, 1));
        let field = |e: NewEvent| match refused(&given, e) {
            DomainError::Invalid { field, .. } => field,
            other => panic!("expected Invalid, got {other:?}"),
        };
        assert_eq!(
            field(NewEvent::json("ItemAdded", 3, &json!({"sku": "A"}))),
            "events[0].schema_version"
        );
        assert_eq!(
            field(NewEvent::json("Renamed", 1, &json!({}))),
            "events[0].type"
        );
        assert_eq!(
            field(NewEvent::json("BookDeleted", 1, &json!({"author": "x"}))),
            "events[0].type"
        );
        assert_eq!(
            field(NewEvent::json("ItemAdded", 2, &json!({"sku": 5}))),
            "events[0].data"
        );
        assert_eq!(
            field(NewEvent::json(
                "ItemAdded",
                2,
                &json!({"sku": "A", "quantity": 0, "unit_price_cents": 1})
            )),
            "events[0].data.quantity"
        );
        let mut stamped = NewEvent::json(
            "ItemAdded",
            2,
            &json!({"sku": "A", "quantity": 1, "unit_price_cents": 1}),
        );
        stamped
            .metadata
            .insert(crate::event::COMMAND_ID_KEY.into(), "k".into());
        assert_eq!(field(stamped), "events[0].metadata");
        let mut binary = NewEvent::json("CheckedOut", 1, &json!({}));
        binary.content_type = "application/octet-stream".into();
        assert_eq!(field(binary), "events[0].content_type");
    }
}
