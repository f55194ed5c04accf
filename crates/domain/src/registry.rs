//! Every projection esq maintains, in one place: the projector feeds exactly these. Adding a
//! projection is one file in this crate (implementing [`Projection`] or [`Derived`]) plus one
//! line here.

use crate::authors::AuthorsProjection;
use crate::bookshop::BookProjection;
use crate::cart::CartProjection;
use crate::derived::Derived;
use crate::projection::Projection;
use crate::sku_sales::SkuSalesProjection;
use crate::state::StateProjection;
use std::sync::Arc;

/// The per-stream projections: one document per stream, fed from events.
pub fn projections() -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(CartProjection),
        Arc::new(BookProjection),
        Arc::new(StateProjection),
    ]
}

/// The derived projections: many-to-one read models fed from per-stream documents.
pub fn derived() -> Vec<Arc<dyn Derived>> {
    vec![Arc::new(AuthorsProjection), Arc::new(SkuSalesProjection)]
}

/// Every projection name, per-stream and derived (the logical names of the APIs).
pub fn names() -> Vec<&'static str> {
    projections()
        .iter()
        .map(|p| p.name())
        .chain(derived().iter().map(|d| d.name()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_every_derived_source_is_registered() {
        let mut names = names();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n, "duplicate projection name");
        for d in derived() {
            assert!(
                projections().iter().any(|p| p.name() == d.source()),
                "{} feeds from unknown projection {}",
                d.name(),
                d.source()
            );
        }
    }
}
