//! The mapping from store errors to gRPC statuses, shared with read-svc's temporal queries.

pub use esq_runtime::store_status::status_from_store;
