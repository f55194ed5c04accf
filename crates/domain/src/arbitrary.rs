//! Property-test generators shared by the crates that check the domain's semantics (feature
//! `arbitrary`; always on in this crate's own tests).

use crate::NewEvent;
use proptest::prelude::*;
use serde_json::json;

/// A cart event as any client could have appended it raw: valid or not, at schema v1, v2 or
/// one this build cannot read, or of a type carts do not know.
pub fn raw_cart_event() -> impl Strategy<Value = NewEvent> {
    let sku = prop::sample::select(vec!["A", "B", "C"]);
    let qty = prop_oneof![1i64..5, -3i64..=0, Just(i64::MAX), Just(i64::MIN)];
    let price = prop_oneof![0i64..3, Just(150i64), Just(999i64)];
    prop_oneof![
        4 => (sku.clone(), qty.clone(), price.clone()).prop_map(|(s, q, p)| NewEvent::json(
            "ItemAdded", 2, &json!({"sku": s, "quantity": q, "unit_price_cents": p}))),
        1 => (sku.clone(), qty.clone()).prop_map(|(s, q)| NewEvent::json(
            "ItemAdded", 1, &json!({"sku": s, "qty": q}))),
        3 => (sku, qty, price).prop_map(|(s, q, p)| NewEvent::json(
            "ItemRemoved", 1, &json!({"sku": s, "quantity": q, "unit_price_cents": p}))),
        1 => (0i64..9, 0i64..9).prop_map(|(t, n)| NewEvent::json(
            "CheckedOut", 1, &json!({"total_cents": t, "item_count": n}))),
        1 => Just(NewEvent::json("ItemAdded", 3, &json!({"sku": "A"}))),
        1 => Just(NewEvent::json("Renamed", 1, &json!({"name": "x"}))),
    ]
}
