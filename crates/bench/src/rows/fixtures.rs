//! Data the rows share: carts seeded through write-svc, named so that `redis-benchmark`'s
//! `__rand_int__` (a 12-digit zero-padded number below `-r N`) addresses the same hashes.

use esq::pb::cart::v1::{
    cart_commands_client::CartCommandsClient, cart_queries_client::CartQueriesClient,
    AddItemRequest, GetCartRequest,
};
use futures::StreamExt as _;
use tonic::transport::Channel;

/// Runs `call` until it succeeds, retrying what a loaded store answers while it catches up
/// (UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED) for up to five minutes. Only for idempotent
/// calls: the appends here carry their event ids, the commands their command ids.
pub async fn retrying<T, F, Fut>(mut call: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let mut pause = std::time::Duration::from_millis(50);
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Aborted
                ) && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(2));
            }
            Err(status) => return Err(status.into()),
        }
    }
}

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
            let commands = commands.clone();
            let queries = queries.clone();
            async move {
                let id = cart_id(c);
                let mut version = 0;
                for item in 0..ITEMS {
                    let request = AddItemRequest {
                        cart_id: id.clone(),
                        sku: format!("sku-{item}"),
                        quantity: 1 + item as i64,
                        unit_price_cents: 100 * (1 + item as i64),
                        expected_version: None,
                        command_id: format!("seed-{id}-{item}"),
                    };
                    version = retrying(|| {
                        let mut commands = commands.clone();
                        let request = request.clone();
                        async move { commands.add_item(request).await }
                    })
                    .await?
                    .into_inner()
                    .version;
                }
                // Read-your-write: returns once the projector has applied the last item.
                let request = GetCartRequest {
                    cart_id: id,
                    min_version: version,
                };
                retrying(|| {
                    let mut queries = queries.clone();
                    let request = request.clone();
                    async move { queries.get_cart(request).await }
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

/// Appends `events` ItemAdded events (schema 2) to each of carts `from..to` (ids
/// [`cart_id`]), up to 50 per append, `concurrency` appends at once, through write-svc's
/// `esq.v1.EventStore/Append`. Returns the payload bytes written (the store holds about that
/// much event data, plus its per-row overhead).
pub async fn append_cart_events(
    write: Channel,
    from: u64,
    to: u64,
    events: u64,
    concurrency: usize,
) -> anyhow::Result<u64> {
    use esq::pb::v1::{
        event_store_client::EventStoreClient, expected_version, new_event, AppendRequest,
        ExpectedVersion, NewEvent, StreamRef,
    };
    let client = EventStoreClient::new(write);
    let jobs = (from..to).flat_map(|c| {
        (0..events)
            .step_by(50)
            .map(move |first| (c, first, (events - first).min(50)))
    });
    let results = futures::stream::iter(jobs)
        .map(|(c, first, n)| {
            let client = client.clone();
            async move {
                let mut bytes = 0u64;
                let batch: Vec<NewEvent> = (first..first + n)
                    .map(|e| {
                        let json = format!(
                            "{{\"sku\":\"sku-{}\",\"quantity\":1,\"unit_price_cents\":{}}}",
                            e % 20,
                            100 + e % 20
                        );
                        bytes += json.len() as u64;
                        NewEvent {
                            // A fixed id per (cart, event): a retried append is recognised.
                            event_id: uuid::Uuid::new_v5(
                                &uuid::Uuid::NAMESPACE_OID,
                                format!("esq-bench/{}/{e}", cart_id(c)).as_bytes(),
                            )
                            .to_string(),
                            r#type: "ItemAdded".into(),
                            schema_version: 2,
                            content_type: "application/json".into(),
                            payload: Some(new_event::Payload::Json(json)),
                            metadata: Default::default(),
                        }
                    })
                    .collect();
                let request = AppendRequest {
                    stream: Some(StreamRef {
                        r#type: "cart".into(),
                        id: cart_id(c),
                    }),
                    expected_version: Some(ExpectedVersion {
                        kind: Some(expected_version::Kind::Exact(first)),
                    }),
                    events: batch,
                };
                retrying(|| {
                    let mut client = client.clone();
                    let request = request.clone();
                    async move { client.append(request).await }
                })
                .await?;
                anyhow::Ok(bytes)
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await;
    results.into_iter().sum()
}

/// Reads carts `from..to` through read-svc, each at least at `min_version` (waiting for the
/// projector as read-your-writes does), `concurrency` at once: the read model has them all
/// when it returns.
pub async fn read_carts(
    queries: CartQueriesClient<Channel>,
    from: u64,
    to: u64,
    min_version: u64,
    concurrency: usize,
) -> anyhow::Result<()> {
    let results = futures::stream::iter(from..to)
        .map(|c| {
            let queries = queries.clone();
            async move {
                let request = GetCartRequest {
                    cart_id: cart_id(c),
                    min_version,
                };
                retrying(|| {
                    let mut queries = queries.clone();
                    let request = request.clone();
                    async move { queries.get_cart(request).await }
                })
                .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await;
    results.into_iter().collect()
}
