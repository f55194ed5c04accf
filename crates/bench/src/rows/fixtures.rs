//! Data the rows share: carts seeded through write-svc, named so that `redis-benchmark`'s
//! `__rand_int__` (a 12-digit zero-padded number below `-r N`) addresses the same hashes.

use esq::pb::cart::v1::{
    cart_commands_client::CartCommandsClient, cart_queries_client::CartQueriesClient,
    AddItemRequest, GetCartRequest,
};
use futures::StreamExt as _;
use tonic::transport::Channel;

/// The id of seeded cart `n`: `bench-000000000042`.
pub fn cart_id(n: u64) -> String {
    format!("bench-{n:012}")
}

/// Where the seeded carts' hashes are: the Redis key of cart `n` is
/// `{namespace}{{bench-…}}`, `namespace` being the prefix, the projection and its active
/// generation (`esqb…:cart2:g1:`). Found by looking for cart 0's hash, so it follows
/// whatever generation the projector serves.
#[derive(Debug, Clone)]
pub struct CartKeys {
    namespace: String,
}

impl CartKeys {
    /// Finds the namespace of the seeded carts under `prefix` (carts must be seeded).
    pub async fn find(
        conn: &mut redis::aio::MultiplexedConnection,
        prefix: &str,
    ) -> anyhow::Result<Self> {
        let suffix = format!("{{{}}}", cart_id(0));
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}:cart2*{suffix}"))
                .arg("COUNT")
                .arg(1000)
                .query_async(conn)
                .await?;
            if let Some(key) = keys.into_iter().next() {
                let namespace = key[..key.len() - suffix.len()].to_owned();
                return Ok(Self { namespace });
            }
            anyhow::ensure!(next != 0, "no hash of seeded cart 0 under {prefix}");
            cursor = next;
        }
    }

    /// The key of cart `n`'s hash.
    pub fn key(&self, n: u64) -> String {
        format!("{}{{{}}}", self.namespace, cart_id(n))
    }

    /// The `redis-benchmark` pattern of the same keys (`__rand_int__` with `-r N`).
    pub fn rand_pattern(&self) -> String {
        format!("{}{{bench-__rand_int__}}", self.namespace)
    }
}

/// Items per seeded cart (a small, realistic cart: three lines).
pub const ITEMS: u64 = 3;

/// Makes sure carts `0..n` exist with [`ITEMS`] items each and are visible in the read model.
/// Idempotent (fixed command ids), so rows can call it again with the same or a larger `n`.
pub async fn seed_carts(
    commands: CartCommandsClient<Channel>,
    queries: CartQueriesClient<Channel>,
    n: u64,
) -> anyhow::Result<()> {
    let results = futures::stream::iter(0..n)
        .map(|c| {
            let mut commands = commands.clone();
            let mut queries = queries.clone();
            async move {
                let id = cart_id(c);
                let mut version = 0;
                for item in 0..ITEMS {
                    version = commands
                        .add_item(AddItemRequest {
                            cart_id: id.clone(),
                            sku: format!("sku-{item}"),
                            quantity: 1 + item as i64,
                            unit_price_cents: 100 * (1 + item as i64),
                            expected_version: None,
                            command_id: format!("seed-{id}-{item}"),
                        })
                        .await?
                        .into_inner()
                        .version;
                }
                // Read-your-write: returns once the projector has applied the last item.
                queries
                    .get_cart(GetCartRequest {
                        cart_id: id,
                        min_version: version,
                    })
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    results.into_iter().collect()
}
