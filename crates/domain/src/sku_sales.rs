//! Sales per SKU: a derived read model of the cart documents. One target per SKU with the
//! units sold, the revenue and the number of checked-out carts that hold it.

use crate::cart::{Cart, CartProjection, CartStatus};
use crate::derived::{live_count, total, Agg, Column, Derived};
use crate::projection::{Doc, Projection};

/// Sales per SKU, fed from the [`CartProjection`] documents of checked-out carts.
#[derive(Debug, Clone, Copy, Default)]
pub struct SkuSalesProjection;

const COLUMNS: &[Column] = &[
    Column {
        name: "units",
        agg: Agg::Sum,
    },
    Column {
        name: "revenue_cents",
        agg: Agg::Sum,
    },
    Column {
        name: "carts",
        agg: Agg::Sum,
    },
];

impl Derived for SkuSalesProjection {
    fn name(&self) -> &'static str {
        "sku_sales"
    }

    fn source(&self) -> &'static str {
        CartProjection.name()
    }

    fn columns(&self) -> &'static [Column] {
        COLUMNS
    }

    /// A checked-out cart sells each of its lines: the units, units × unit price, one cart.
    /// An open cart sells nothing.
    fn contributions(&self, source_doc: &Doc) -> Vec<(String, Vec<i64>)> {
        let cart = Cart::from_doc(source_doc);
        if cart.status != CartStatus::CheckedOut {
            return Vec::new();
        }
        cart.lines
            .into_iter()
            .map(|(sku, line)| {
                let revenue = line.quantity.saturating_mul(line.unit_price_cents);
                (sku, vec![line.quantity, revenue, 1])
            })
            .collect()
    }
}

/// A SKU's sales as queries see them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkuSalesView {
    /// The product.
    pub sku: String,
    /// Units sold in checked-out carts.
    pub units: i64,
    /// Units × unit price, in cents.
    pub revenue_cents: i64,
    /// Checked-out carts holding it.
    pub carts: i64,
}

impl SkuSalesView {
    /// Reads a SKU's totals document; `None` when no checked-out cart holds it.
    pub fn from_doc(sku: &str, totals: &Doc) -> Option<SkuSalesView> {
        (live_count(totals) > 0).then(|| SkuSalesView {
            sku: sku.to_owned(),
            units: total(totals, "units"),
            revenue_cents: total(totals, "revenue_cents"),
            carts: total(totals, "carts"),
        })
    }
}
