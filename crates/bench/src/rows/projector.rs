//! Projector catch-up against a raw program doing the same storage work.
//!
//! On a cluster stack of its own, carts × 10 AddItems go through write-svc with no projector
//! running (each append leaves its change-log row). Then, per round, interleaved:
//! - **esq**: a projector process starts on a fresh Redis prefix (fresh checkpoints, so it
//!   catches up the whole change log) and is timed from its spawn until every cart's document
//!   is at version 10 (its start-up is counted against it);
//! - **raw**: the same storage work without the projector: each cart's partition read with a
//!   prepared statement of the `scylla` driver, folded with the domain's `batch` and applied
//!   with the project's own fenced script (`apply.lua`) by EVALSHA, one call per projection and
//!   cart, concurrent calls pipelined on one multiplexed connection;
//! - **raw + change log**: the raw program, but finding the carts as the projector must: by
//!   reading each shard's change log (the bucket index, then the notification rows in pages of
//!   the projector's `poll_limit`, with the same CQL, four shards at a time), each cart read and
//!   applied as soon as a page names it for the first time;
//! - **Lua alone**: the same EVALSHAs from events already in memory, batched per stream, and
//!   one call per event.
//!
//! The raw programs run as tasks of a runtime of their own with as many worker threads as the
//! projector binary has by default (one), their driver connections made there: a program on a
//! worker per core pays for its tasks waking each other across threads, which would make the
//! baseline slower than it needs to be (or the projector's single thread an unfair advantage).
//!
//! CPU per process is sampled on each side (the projector's from its start, by its own
//! counters).

use crate::cqlops::CqlOps;
use crate::ctx::{Backends, Cluster, Ctx};
use crate::load::Run;
use crate::redisops::RedisOps;
use crate::report::{cpu, rate, Line};
use crate::sys::{cpu_ticks, Cpu, CpuUse, Watched};
use anyhow::Context as _;
use esq::pb::cart::v1::AddItemRequest;
use esq_domain::projection::{batch, Batch, Projection, VERSION_FIELD};
use esq_domain::{RecordedEvent, StreamId};
use esq_readstore::redis::{apply_cmd, APPLY_SCRIPT};
use futures::StreamExt as _;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Events per cart (one AddItem each, so one change-log row each).
pub const EVENTS_PER_CART: u64 = 10;

/// Carts written: 2,000 (20,000 events) in a full run.
pub fn carts(ctx: &Ctx) -> u64 {
    ctx.pick(20, 2_000)
}

/// Concurrency of the writers and of the raw program (the projector's default sync bound).
const CONCURRENCY: usize = 32;
/// Shards of the stack's change log (write-svc's default), scanned this many at a time (the
/// projector's default shard concurrency), in pages of this many rows (its `poll_limit`).
const SHARDS: i32 = 16;
const SHARDS_AT_ONCE: usize = 4;
const CHANGE_PAGE: i32 = 512;

fn cart(n: u64) -> String {
    format!("catchup-{n:06}")
}

/// Runs the row group.
pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Line>> {
    let cluster = ctx.start_cluster(Vec::new()).await?;
    let result = measure(ctx, &cluster).await;
    cluster.cleanup(ctx).await?;
    result
}

async fn measure(ctx: &Ctx, cluster: &Cluster) -> anyhow::Result<Vec<Line>> {
    cluster.stop_projector().await?;
    let n = carts(ctx);
    write_carts(cluster, n).await?;
    // The raw programs run on a runtime of their own with as many workers as the projector
    // binary's (one by default, `--worker-threads`), their driver connections made there, so
    // both sides' tasks wake each other the same way.
    let raw_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(PROJECTOR_WORKERS)
        .enable_all()
        .build()?;
    let result = on_runtime(ctx, cluster, n, &raw_rt).await;
    // Dropping a runtime waits for its tasks, which an async context must not do.
    raw_rt.shutdown_background();
    result
}

/// The worker threads of the projector binary's runtime by default: the raw programs get as
/// many.
const PROJECTOR_WORKERS: usize = esq_projector::DEFAULT_WORKER_THREADS;

/// The rounds of the row, the raw sides spawned on `raw_rt`.
async fn on_runtime(
    ctx: &Ctx,
    cluster: &Cluster,
    n: u64,
    raw_rt: &tokio::runtime::Runtime,
) -> anyhow::Result<Vec<Line>> {
    let (raw, raw_conn, sha) = raw_rt
        .spawn(Raw::prepare(
            ctx.backends().clone(),
            cluster.keyspace.clone(),
        ))
        .await??;
    let raw = Arc::new(raw);
    let mut conn = ctx.redis().await?;
    // The events in memory, for the Lua-alone sides (read once, untimed).
    let reads: Vec<_> = (0..n).map(|c| raw.read(cart(c))).collect();
    let all: Arc<Vec<Vec<RecordedEvent>>> = Arc::new(
        futures::stream::iter(reads)
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<_>>()?,
    );
    anyhow::ensure!(
        all.iter().all(|e| e.len() as u64 == EVENTS_PER_CART),
        "a cart does not hold {EVENTS_PER_CART} events"
    );
    // Every change-log row must be past the confidence window before a projector reads on.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let events = n * EVENTS_PER_CART;
    let backends: Vec<Watched> = ctx
        .redis_proc()
        .into_iter()
        .chain(ctx.cassandra_proc())
        .collect();
    let mut me = vec![Watched::me()];
    me.extend(backends.iter().cloned());
    let (mut esq, mut base, mut batched, mut per_event) = (vec![], vec![], vec![], vec![]);
    let mut scanned = Vec::new();
    let (mut startup, mut first_doc, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    // What Cassandra did on each side, per event (operations per table).
    let (mut esq_ops, mut raw_ops) = (CqlOps::default(), CqlOps::default());
    // What Redis did on each side (calls per command), the harness's own polling left out.
    let (mut esq_redis, mut raw_redis) = (RedisOps::default(), RedisOps::default());
    let ks = cluster.keyspace.as_str();
    for round in 0..ctx.rounds() {
        let tag = format!("{}r{round}", cluster.prefix);
        // The sides in turn, the first alternating from round to round (the writes before
        // the first round leave Cassandra flushing and compacting for a while).
        for esq_side in [round % 2 == 0, round % 2 == 1] {
            if esq_side {
                // esq: a projector from scratch on a fresh prefix.
                let prefix = format!("{tag}esq");
                let ops_before = CqlOps::snapshot(&raw.session, ks).await;
                let redis_before = RedisOps::snapshot(&mut conn).await;
                let sample = Cpu::sample(&backends);
                let started = Instant::now();
                // Its worker threads said, not inherited: the raw runtime has as many.
                let env = [
                    ("ESQ_REDIS_PREFIX".to_owned(), prefix.clone()),
                    (
                        "ESQ_WORKER_THREADS".to_owned(),
                        PROJECTOR_WORKERS.to_string(),
                    ),
                ];
                let projector = cluster.start_projector(ctx, &env).await?;
                startup.push(started.elapsed().as_secs_f64());
                let (polled, first) = wait_current(&mut conn, &prefix, n, started).await?;
                first_doc.push(first);
                let secs = started.elapsed().as_secs_f64();
                let mut used = sample.cores();
                let ticks = cpu_ticks(projector.pid).context("the projector is gone")?;
                used.insert(
                    0,
                    CpuUse {
                        name: "projector".to_owned(),
                        cores: ticks as f64 / crate::sys::ticks_per_second() / secs,
                    },
                );
                rss.push(crate::sys::peak_rss_mib(projector.pid)?);
                cluster.stop_projector().await?;
                esq_ops.add(&CqlOps::snapshot(&raw.session, ks).await.since(&ops_before));
                let mut redis_ops = RedisOps::snapshot(&mut conn).await.since(&redis_before);
                redis_ops.remove("hget", polled);
                esq_redis.add(&redis_ops);
                esq.push(Run::measured(events, secs, 0.0, 0.0, used));
            } else {
                // raw: read by partition + batched fenced apply, pipelined.
                let prefix = format!("{tag}raw");
                let ops_before = CqlOps::snapshot(&raw.session, ks).await;
                let redis_before = RedisOps::snapshot(&mut conn).await;
                let (side, side_conn, side_sha, side_me) =
                    (Arc::clone(&raw), raw_conn.clone(), sha.clone(), me.clone());
                let run = raw_rt.spawn(async move {
                    let work = (0..n)
                        .map(|c| side.read_apply(side_conn.clone(), &side_sha, &prefix, cart(c)))
                        .collect();
                    all_of(events, &side_me, work).await
                });
                base.push(run.await??);
                raw_ops.add(&CqlOps::snapshot(&raw.session, ks).await.since(&ops_before));
                raw_redis.add(&RedisOps::snapshot(&mut conn).await.since(&redis_before));
            }
        }

        // raw + change log: the carts found by scanning the change log, as the projector must.
        let prefix = format!("{tag}scan");
        let (side, side_conn, side_sha, side_me) =
            (Arc::clone(&raw), raw_conn.clone(), sha.clone(), me.clone());
        let (carts, applied, secs, cores) = raw_rt
            .spawn(async move {
                let sample = Cpu::sample(&side_me);
                let started = Instant::now();
                let (carts, applied) = side.scan_apply(&side_conn, &side_sha, &prefix).await?;
                let secs = started.elapsed().as_secs_f64();
                anyhow::Ok((carts, applied, secs, sample.cores()))
            })
            .await??;
        anyhow::ensure!(
            carts == n && applied == n,
            "the change log named {carts} carts ({applied} applied), not {n}"
        );
        scanned.push(Run::measured(events, secs, 0.0, 0.0, cores));

        // The Lua alone, batched per stream and per event.
        for (runs, whole) in [(&mut batched, true), (&mut per_event, false)] {
            let prefix = format!("{tag}lua{}", u8::from(whole));
            let (side, side_conn, side_sha, side_me, all) = (
                Arc::clone(&raw),
                raw_conn.clone(),
                sha.clone(),
                me.clone(),
                Arc::clone(&all),
            );
            let run = raw_rt.spawn(async move {
                let work = all
                    .iter()
                    .map(|events| side.apply(side_conn.clone(), &side_sha, &prefix, events, whole))
                    .collect();
                all_of(events, &side_me, work).await
            });
            runs.push(run.await??);
        }
        delete_prefix(&mut conn, &tag).await?;
    }
    let (esq, base) = (Run::median(&esq), Run::median(&base));
    let (batched, per_event) = (Run::median(&batched), Run::median(&per_event));
    let scanned = Run::median(&scanned);
    startup.sort_by(f64::total_cmp);
    first_doc.sort_by(f64::total_cmp);
    rss.sort_by(f64::total_cmp);
    let path = format!(
        "projector catch-up, {} events ({} carts × {EVENTS_PER_CART})",
        crate::report::thousands(events),
        crate::report::thousands(n)
    );
    let versus = |name: &str, other: &Run, target: &str| Line {
        path: format!("same, vs {name}"),
        esq: rate(esq.rate),
        baseline: format!("{name}: {}", rate(other.rate)),
        ratio: (other.rate > 0.0).then(|| esq.rate / other.rate),
        target: target.to_owned(),
        latency: String::new(),
        cpu: format!("{} · base {}", cpu(&esq.cpu), cpu(&other.cpu)),
        note: String::new(),
    };
    let mut first = versus(
        "raw program (scylla read per partition + EVALSHA apply.lua per stream, pipelined)",
        &base,
        "≥ 0.8",
    );
    first.path = path;
    first.note = format!(
        "esq timed from the projector's spawn (start-up until serving: {:.2} s, first document \
         after {:.2} s, all {} documents after {:.2} s); projector peak RSS {:.0} MiB; the \
         projector and the raw programs on {PROJECTOR_WORKERS} runtime worker thread(s) each; {} \
         rounds, medians; Cassandra operations per event: esq {} · \
         base {}; Redis calls per event: esq {} · base {}",
        startup[startup.len() / 2],
        first_doc[first_doc.len() / 2],
        crate::report::thousands(n),
        events as f64 / esq.rate,
        rss[rss.len() / 2],
        ctx.rounds(),
        esq_ops.per(events * ctx.rounds() as u64),
        raw_ops.per(events * ctx.rounds() as u64),
        esq_redis.per(events * ctx.rounds() as u64),
        raw_redis.per(events * ctx.rounds() as u64),
    );
    let mut with_log = versus(
        "raw program + change log (the carts found by reading each shard's change log, as the \
         projector must)",
        &scanned,
        "(reference)",
    );
    with_log.note = "the storage work a projector cannot avoid: the raw program does not read \
                     the 1 change-log row per event that tells which streams to read"
        .to_owned();
    Ok(vec![
        first,
        with_log,
        versus("the Lua alone, batched per stream", &batched, "(reference)"),
        versus(
            "the Lua alone, one call per event",
            &per_event,
            "(reference)",
        ),
    ])
}

/// The raw program's handles.
struct Raw {
    session: Arc<scylla::client::session::Session>,
    select: scylla::statement::prepared::PreparedStatement,
    /// The change log's statements, as the CQL store prepares them.
    buckets: scylla::statement::prepared::PreparedStatement,
    from_start: scylla::statement::prepared::PreparedStatement,
    after: scylla::statement::prepared::PreparedStatement,
    projections: Vec<Arc<dyn Projection>>,
}

/// An events row as the raw program reads it.
type Row = (
    i64,
    uuid::Uuid,
    String,
    i32,
    String,
    Vec<u8>,
    Option<BTreeMap<String, String>>,
    i64,
);

impl Raw {
    /// Connects to `backends` and prepares the statements on keyspace `ks`; also returns a
    /// Redis connection and the apply script's SHA. Call it on the runtime the raw program
    /// runs on.
    async fn prepare(
        backends: Backends,
        ks: String,
    ) -> anyhow::Result<(Self, redis::aio::MultiplexedConnection, String)> {
        let session = backends.scylla().await?;
        let select = session
            .prepare(format!(
                "SELECT version, event_id, event_type, schema_version, content_type, data, \
                 metadata, recorded_at FROM {ks}.events \
                 WHERE stream_type = 'cart' AND stream_id = ? AND bucket = 0"
            ))
            .await?;
        // The change log's statements, as the CQL store prepares them.
        let changes = format!(
            "SELECT id, stream_type, stream_id, first_version, last_version FROM {ks}.changes \
             WHERE shard = ? AND bucket = ?"
        );
        let prepare = |cql: String| session.prepare(cql);
        let buckets = prepare(format!(
            "SELECT bucket FROM {ks}.change_buckets \
             WHERE shard = ? AND bucket >= ? AND bucket <= ? LIMIT ?"
        ))
        .await?;
        let from_start = prepare(format!("{changes} AND id < minTimeuuid(?) LIMIT ?")).await?;
        let after = prepare(format!(
            "{changes} AND id > ? AND id < minTimeuuid(?) LIMIT ?"
        ))
        .await?;
        let raw = Raw {
            session: Arc::new(session),
            select,
            buckets,
            from_start,
            after,
            projections: esq_domain::registry::projections()
                .into_iter()
                .filter(|p| p.handles("cart"))
                .collect(),
        };
        let mut conn = backends.redis().await?;
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(APPLY_SCRIPT)
            .query_async(&mut conn)
            .await?;
        Ok((raw, conn, sha))
    }

    /// A cart's events, read by partition with the prepared statement.
    async fn read(&self, id: String) -> anyhow::Result<Vec<RecordedEvent>> {
        let rows = self
            .session
            .execute_unpaged(&self.select, (id.as_str(),))
            .await?
            .into_rows_result()?;
        let stream = StreamId::new("cart", &id)?;
        let mut events = Vec::new();
        for row in rows.rows::<Row>()? {
            let r = row?;
            events.push(RecordedEvent {
                stream: stream.clone(),
                version: u64::try_from(r.0)?,
                event_id: r.1,
                event_type: r.2,
                schema_version: u32::try_from(r.3)?,
                content_type: r.4,
                data: r.5,
                metadata: r.6.unwrap_or_default(),
                recorded_at_us: r.7,
            });
        }
        Ok(events)
    }

    /// A cart's events read by partition, then applied batched per stream.
    async fn read_apply(
        &self,
        conn: redis::aio::MultiplexedConnection,
        sha: &str,
        prefix: &str,
        id: String,
    ) -> anyhow::Result<()> {
        let events = self.read(id).await?;
        self.apply(conn, sha, prefix, &events, true).await
    }

    /// Scans every shard's change log ([`SHARDS_AT_ONCE`] shards at a time, pages of
    /// [`CHANGE_PAGE`] rows) and reads and applies each cart the first time a page names it,
    /// [`CONCURRENCY`] at once, overlapping the scan. Returns (carts named, carts applied).
    async fn scan_apply(
        &self,
        conn: &redis::aio::MultiplexedConnection,
        sha: &str,
        prefix: &str,
    ) -> anyhow::Result<(u64, u64)> {
        let (tx, rx) = tokio::sync::mpsc::channel::<String>(4 * CONCURRENCY);
        let scan = async move {
            let shards = futures::stream::iter(0..SHARDS)
                .map(|shard| self.scan_shard(shard, tx.clone()))
                .buffer_unordered(SHARDS_AT_ONCE);
            let named: Vec<u64> = shards
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<anyhow::Result<_>>()?;
            anyhow::Ok(named.iter().sum::<u64>())
        };
        let ids =
            futures::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|id| (id, rx)) },
            );
        let apply = ids
            .map(|id| self.read_apply(conn.clone(), sha, prefix, id))
            .buffer_unordered(CONCURRENCY)
            .fold(anyhow::Ok(0u64), |done, r| async move {
                Ok(done? + r.map(|()| 1)?)
            });
        let (named, applied) = tokio::join!(scan, apply);
        Ok((named?, applied?))
    }

    /// One shard's change log, every bucket of its index, in pages; each stream named for the
    /// first time is sent on `tx`. Returns the streams named.
    async fn scan_shard(
        &self,
        shard: i32,
        tx: tokio::sync::mpsc::Sender<String>,
    ) -> anyhow::Result<u64> {
        let cutoff = scylla::value::CqlTimestamp(crate::rows::append::now_us() / 1000);
        let buckets = self
            .session
            .execute_unpaged(&self.buckets, (shard, 0i64, i64::MAX, 1000i32))
            .await?
            .into_rows_result()?;
        let mut seen = std::collections::HashSet::new();
        for bucket in buckets.rows::<(i64,)>()? {
            let bucket = bucket?.0;
            let mut last: Option<scylla::value::CqlTimeuuid> = None;
            loop {
                let rows = match last {
                    None => {
                        self.session
                            .execute_unpaged(&self.from_start, (shard, bucket, cutoff, CHANGE_PAGE))
                            .await?
                    }
                    Some(id) => {
                        self.session
                            .execute_unpaged(&self.after, (shard, bucket, id, cutoff, CHANGE_PAGE))
                            .await?
                    }
                }
                .into_rows_result()?;
                let mut count = 0;
                for row in rows.rows::<(scylla::value::CqlTimeuuid, String, String, i64, i64)>()? {
                    let (id, _kind, stream, _first, _last) = row?;
                    last = Some(id);
                    count += 1;
                    if seen.insert(stream.clone()) {
                        tx.send(stream).await?;
                    }
                }
                if count < CHANGE_PAGE {
                    break;
                }
            }
        }
        Ok(seen.len() as u64)
    }

    /// Folds `events` (one stream's) for each projection of carts and applies them with the
    /// store's script under `prefix`: one call per projection (`whole`) or per event.
    async fn apply(
        &self,
        mut conn: redis::aio::MultiplexedConnection,
        sha: &str,
        prefix: &str,
        events: &[RecordedEvent],
        whole: bool,
    ) -> anyhow::Result<()> {
        let Some(first) = events.first() else {
            return Ok(());
        };
        for p in &self.projections {
            let key = format!("{prefix}:{}:{{{}}}", p.name(), first.stream.id);
            let batches: Vec<Batch> = if whole {
                batch(p.as_ref(), events)?.into_iter().collect()
            } else {
                events
                    .iter()
                    .map(|e| batch(p.as_ref(), std::slice::from_ref(e)))
                    .filter_map(Result::transpose)
                    .collect::<Result<_, _>>()?
            };
            // The same work as the projector's apply, its announcement included.
            let channel = format!("{prefix}:applied");
            for b in &batches {
                let (outcome, _): (u8, u64) = apply_cmd(sha, &key, &channel, b)
                    .query_async(&mut conn)
                    .await?;
                anyhow::ensure!(outcome == 0, "the fenced apply refused a fresh batch");
            }
        }
        Ok(())
    }
}

/// Writes `n` carts × [`EVENTS_PER_CART`] AddItems through write-svc (each cart's in order).
/// Runs `work` with [`CONCURRENCY`] in flight, timed and with `watch` sampled from its
/// start, as a run of `events` events; the first error fails it.
async fn all_of<F>(events: u64, watch: &[Watched], work: Vec<F>) -> anyhow::Result<Run>
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let sample = Cpu::sample(watch);
    let started = Instant::now();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(work)
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect::<anyhow::Result<()>>()?;
    let secs = started.elapsed().as_secs_f64();
    Ok(Run::measured(events, secs, 0.0, 0.0, sample.cores()))
}

async fn write_carts(cluster: &Cluster, n: u64) -> anyhow::Result<()> {
    let work: Vec<_> = (0..n).map(|c| add_items(cluster.carts(), c)).collect();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(work)
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Cart `c`'s AddItems, in order.
async fn add_items(
    commands: esq::pb::cart::v1::cart_commands_client::CartCommandsClient<
        tonic::transport::Channel,
    >,
    c: u64,
) -> anyhow::Result<()> {
    for item in 0..EVENTS_PER_CART {
        let add = AddItemRequest {
            cart_id: cart(c),
            sku: format!("sku-{}", item % 4),
            quantity: 1,
            unit_price_cents: 100,
            expected_version: None,
            command_id: format!("catchup-{c}-{item}"),
        };
        // Retried with its command id when a loaded store refuses it (UNAVAILABLE).
        crate::rows::fixtures::retrying(|| {
            let mut commands = commands.clone();
            let add = add.clone();
            async move { commands.add_item(add).await }
        })
        .await?;
    }
    Ok(())
}

/// Waits until every cart's document under `prefix` is at version [`EVENTS_PER_CART`]:
/// the remaining carts are checked in pipelined chunks, front first, so the check costs
/// little Redis time while the projector works. Returns the HGETs it sent, and when (since
/// `since`) a checked document was first seen (the front chunk's carts are spread over every
/// shard, and among the first of each shard's log, so this is close to the first apply).
async fn wait_current(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    n: u64,
    since: Instant,
) -> anyhow::Result<(u64, f64)> {
    let mut sent = 0;
    let mut first = None;
    const CHUNK: usize = 64;
    let give_up = Instant::now() + Duration::from_secs(600);
    let mut remaining: std::collections::VecDeque<u64> = (0..n).collect();
    while !remaining.is_empty() {
        anyhow::ensure!(
            Instant::now() < give_up,
            "the projector did not catch up within 600 s ({} carts left)",
            remaining.len()
        );
        let chunk: Vec<u64> = remaining.iter().take(CHUNK).copied().collect();
        let mut pipe = redis::pipe();
        for c in &chunk {
            pipe.cmd("HGET")
                .arg(format!("{prefix}:cart2:g1:{{{}}}", cart(*c)))
                .arg(VERSION_FIELD);
        }
        let versions: Vec<Option<u64>> = pipe.query_async(conn).await?;
        sent += chunk.len() as u64;
        if first.is_none() && versions.iter().any(Option::is_some) {
            first = Some(since.elapsed().as_secs_f64());
        }
        let done = versions
            .iter()
            .take_while(|v| **v == Some(EVENTS_PER_CART))
            .count();
        remaining.drain(..done);
        if done < chunk.len() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok((sent, first.unwrap_or_else(|| since.elapsed().as_secs_f64())))
}

/// Deletes every key under `prefix` (this round's documents, checkpoints and leases).
async fn delete_prefix(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
) -> anyhow::Result<()> {
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        if !keys.is_empty() {
            let _: usize = redis::cmd("DEL").arg(&keys).query_async(conn).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}
