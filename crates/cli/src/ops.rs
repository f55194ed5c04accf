//! The operator commands of `esq`: `esq projections …` over `esq.v1.Projections` (on a
//! projector, or on `esq dev`'s read-svc address) and `esq streams …` over `esq.v1.EventStore`
//! (on write-svc).
//!
//! Output is for people by default and JSON with `--json` (one document per command; `streams
//! read` prints one JSON object per event and line, so a long stream is never held in memory).
//! Progress of long operations goes to stderr: an indicatif bar with rate and ETA on a terminal,
//! plain lines otherwise. Exit codes: 0 success, 1 when the answer is "no" (verify found
//! differences, a retried stream is still parked, a rebuild failed), 2 on errors, 130 after
//! Ctrl-C.
//!
//! Ctrl-C: a rebuild runs on the server, so `rebuild --wait` only stops watching and says so;
//! `verify` cancels the call, which stops the comparison on the server (verify is read-only;
//! with `--repair`, the streams repaired so far stay repaired, each repair being a complete
//! re-projection of one stream).

use anyhow::Context as _;
use clap::{Args, Subcommand};
use esq::pb::v1 as pb;
use esq::pb::v1::event_store_client::EventStoreClient;
use esq::pb::v1::projections_client::ProjectionsClient;
use esq_domain::StreamId;
use esq_runtime::auth::BearerToken;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The exit code when the answer is "no" (differences found, still parked, rebuild failed).
pub const EXIT_NO: u8 = 1;
/// The exit code on errors.
pub const EXIT_ERROR: u8 = 2;
/// The exit code after Ctrl-C.
pub const EXIT_INTERRUPTED: u8 = 130;

/// How to reach a service.
#[derive(Args, Debug, Clone)]
pub struct Tls {
    /// PEM file of the CA that signed the server's certificate (for https:// URLs; without it
    /// the system's roots are trusted).
    #[arg(long, env = "ESQ_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// PEM file of this client's certificate, for servers that require one (mutual TLS:
    /// `--tls-client-ca`); needs --client-key.
    #[arg(long, env = "ESQ_CLIENT_CERT", global = true, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// PEM file of the private key of --client-cert.
    #[arg(long, env = "ESQ_CLIENT_KEY", global = true, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Bearer token sent with every call (`authorization: Bearer <token>`), for servers run
    /// with --auth-tokens. Prefer the environment variable: a flag shows in `ps`.
    #[arg(long, env = "ESQ_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
}

/// A channel whose calls carry the `--token`, if any.
type Conn = InterceptedService<Channel, BearerToken>;

/// [`connect`], then the token of `tls` on every call.
async fn connect_with_token(url: &str, tls: &Tls) -> anyhow::Result<Conn> {
    let bearer = BearerToken::new(tls.token.as_deref()).context("--token (ESQ_TOKEN)")?;
    Ok(InterceptedService::new(connect(url, tls).await?, bearer))
}

/// `esq projections …`.
#[derive(Args, Debug)]
pub struct ProjectionsArgs {
    /// Where esq.v1.Projections is served: a projector's --listen address, or esq dev's
    /// read-svc address. http:// or https://.
    #[arg(
        long,
        env = "ESQ_PROJECTOR_URL",
        default_value = "http://127.0.0.1:50052",
        global = true
    )]
    pub projector_url: String,
    #[command(flatten)]
    tls: Tls,
    #[command(subcommand)]
    command: ProjectionsCommand,
}

#[derive(Subcommand, Debug)]
enum ProjectionsCommand {
    /// Every projection: active generation, rebuild, parked streams.
    List,
    /// One projection in detail, with the freshness of every change-log shard.
    Status {
        /// The projection, e.g. cart2.
        name: String,
    },
    /// Starts a rebuild into a new generation (the active one keeps serving meanwhile).
    Rebuild {
        /// The projection.
        name: String,
        /// Follow the rebuild until it is done or failed. Ctrl-C stops following only: the
        /// rebuild continues on the server.
        #[arg(long)]
        wait: bool,
    },
    /// Compares the read model with a fold of the event store; exit code 1 on differences.
    Verify {
        /// The projection.
        name: String,
        /// Re-project the streams whose documents differ.
        #[arg(long)]
        repair: bool,
        /// How many differences to show in full (the counts cover all).
        #[arg(long, default_value_t = 10)]
        examples: u32,
    },
    /// Parked streams, of one projection or of all.
    Parked {
        /// Only this projection's.
        name: Option<String>,
        /// The most to list.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Tries a parked stream again (after a fix); exit code 1 if it is still parked.
    Retry {
        /// The projection.
        name: String,
        /// The stream, as type/id (e.g. cart/c1).
        stream: String,
    },
    /// Skips the parked event of a stream, recording why.
    Skip {
        /// The projection.
        name: String,
        /// The stream, as type/id.
        stream: String,
        /// The version the stream is parked at (the event skipped).
        #[arg(long)]
        version: u64,
        /// Why it is skipped (recorded).
        #[arg(long)]
        reason: String,
    },
}

/// `esq streams …`.
#[derive(Args, Debug)]
pub struct StreamsArgs {
    /// Where esq.v1.EventStore is served (write-svc). http:// or https://.
    #[arg(
        long,
        env = "ESQ_WRITE_URL",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub write_url: String,
    #[command(flatten)]
    tls: Tls,
    #[command(subcommand)]
    command: StreamsCommand,
}

#[derive(Subcommand, Debug)]
enum StreamsCommand {
    /// The events of a stream.
    Read {
        /// The stream, as type/id (e.g. cart/c1).
        stream: String,
        /// First version to print (forwards the lowest, backwards the highest).
        #[arg(long)]
        from: Option<u64>,
        /// At most this many events.
        #[arg(long)]
        limit: Option<u32>,
        /// Newest first.
        #[arg(long)]
        backwards: bool,
    },
    /// Version, event count and times of a stream.
    Info {
        /// The stream, as type/id.
        stream: String,
    },
}

/// A gRPC channel to `url`, with TLS for https:// (trusting `tls.ca_cert`, or the system's
/// roots without one).
async fn connect(url: &str, tls: &Tls) -> anyhow::Result<Channel> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("{url:?} is not a URL"))?
        .connect_timeout(Duration::from_secs(5));
    if url.starts_with("https://") {
        let mut config = ClientTlsConfig::new().with_enabled_roots();
        if let Some(path) = &tls.ca_cert {
            let pem = tokio::fs::read(path)
                .await
                .with_context(|| format!("cannot read the CA certificate {}", path.display()))?;
            config = config.ca_certificate(Certificate::from_pem(pem));
        }
        if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
            let read = |flag: &'static str, path: PathBuf| async move {
                tokio::fs::read(&path)
                    .await
                    .with_context(|| format!("cannot read the {flag} file {}", path.display()))
            };
            let cert = read("--client-cert", cert.clone()).await?;
            let key = read("--client-key", key.clone()).await?;
            config = config.identity(Identity::from_pem(cert, key));
        }
        endpoint = endpoint.tls_config(config)?;
    } else if tls.ca_cert.is_some() || tls.client_cert.is_some() {
        anyhow::bail!("--ca-cert and --client-cert need an https:// URL, not {url:?}");
    }
    endpoint
        .connect()
        .await
        .with_context(|| format!("cannot connect to {url}"))
}

/// A gRPC error, the way a person reads it: the code as gRPC spells it (`NOT_FOUND`), then the
/// server's message.
fn call_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", code_name(status.code()), status.message())
}

/// `NotFound` → `NOT_FOUND`.
fn code_name(code: tonic::Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// Parses `type/id`, naming what is wrong.
fn parse_stream(text: &str) -> anyhow::Result<StreamId> {
    let (kind, id) = text
        .split_once('/')
        .with_context(|| format!("stream {text:?}: expected type/id, e.g. cart/c1"))?;
    StreamId::new(kind, id).map_err(|e| anyhow::anyhow!("stream {text:?}: {e}"))
}

fn stream_ref(s: &StreamId) -> pb::StreamRef {
    esq::convert::stream_ref(s)
}

/// Runs `esq projections …`.
pub async fn projections(args: ProjectionsArgs, json: bool) -> anyhow::Result<ExitCode> {
    let channel = connect_with_token(&args.projector_url, &args.tls).await?;
    let mut client = ProjectionsClient::new(channel);
    match args.command {
        ProjectionsCommand::List => {
            let r = client
                .list_projections(pb::ListProjectionsRequest {})
                .await
                .map_err(call_error)?
                .into_inner();
            if json {
                let all: Vec<Value> = r.projections.iter().map(projection_json).collect();
                print_json(&json!({ "projections": all }));
            } else {
                print_projections(&r.projections);
            }
            Ok(ExitCode::SUCCESS)
        }
        ProjectionsCommand::Status { name } => {
            let r = client
                .get_projection(pb::GetProjectionRequest { projection: name })
                .await
                .map_err(call_error)?
                .into_inner();
            if json {
                print_json(&json!({
                    "projection": r.projection.as_ref().map(projection_json),
                    "shards": r.shards.iter().map(shard_json).collect::<Vec<_>>(),
                }));
            } else {
                print_status(&r);
            }
            Ok(ExitCode::SUCCESS)
        }
        ProjectionsCommand::Rebuild { name, wait } => {
            let started = client
                .rebuild(pb::RebuildRequest {
                    projection: name.clone(),
                })
                .await
                .map_err(call_error)?
                .into_inner();
            if !wait {
                if json {
                    print_json(&rebuild_json(&started));
                } else {
                    println!("{}", rebuild_line(&started));
                    println!("follow it with: esq projections rebuild {name} --wait");
                }
                return Ok(ExitCode::SUCCESS);
            }
            watch_rebuild(&mut client, &name, started, json).await
        }
        ProjectionsCommand::Verify {
            name,
            repair,
            examples,
        } => verify(&mut client, name, repair, examples, json).await,
        ProjectionsCommand::Parked { name, limit } => {
            let r = client
                .list_parked(pb::ListParkedRequest {
                    projection: name.unwrap_or_default(),
                    limit,
                })
                .await
                .map_err(call_error)?
                .into_inner();
            if json {
                let all: Vec<Value> = r.parked.iter().map(parked_json).collect();
                print_json(&json!({ "parked": all }));
            } else if r.parked.is_empty() {
                println!("no parked streams");
            } else {
                for p in &r.parked {
                    println!(
                        "{}  {}  v{}  parked {}  {}",
                        p.projection,
                        stream_text(p.stream.as_ref()),
                        p.version,
                        time_text(p.parked_at.as_ref()),
                        p.reason
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ProjectionsCommand::Retry { name, stream } => {
            let stream = parse_stream(&stream)?;
            let r = client
                .retry_parked(pb::RetryParkedRequest {
                    projection: name.clone(),
                    stream: Some(stream_ref(&stream)),
                })
                .await
                .map_err(call_error)?
                .into_inner();
            if json {
                print_json(&json!({ "resumed": r.resumed, "reason": r.reason }));
            } else if r.resumed {
                println!("{stream} resumed in {name}");
            } else {
                println!("{stream} is still parked in {name}: {}", r.reason);
            }
            Ok(if r.resumed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_NO)
            })
        }
        ProjectionsCommand::Skip {
            name,
            stream,
            version,
            reason,
        } => {
            let stream = parse_stream(&stream)?;
            client
                .skip_parked(pb::SkipParkedRequest {
                    projection: name.clone(),
                    stream: Some(stream_ref(&stream)),
                    version,
                    reason,
                })
                .await
                .map_err(call_error)?;
            if json {
                print_json(&json!({ "skipped": true }));
            } else {
                println!("skipped v{version} of {stream} in {name}; the stream resumes after it");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Follows a rebuild until it ends (or Ctrl-C, which leaves it running on the server).
async fn watch_rebuild(
    client: &mut ProjectionsClient<Conn>,
    name: &str,
    started: pb::RebuildProgress,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut progress = Progress::new(!json);
    progress.rebuild(&started);
    let generation = started.generation;
    let mut last = started;
    let mut stream = client
        .watch_rebuild(pb::WatchRebuildRequest {
            projection: name.to_owned(),
            generation,
        })
        .await
        .map_err(call_error)?
        .into_inner();
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
    loop {
        tokio::select! {
            _ = &mut interrupt => {
                progress.finish();
                eprintln!(
                    "stopped following; the rebuild of {name} continues on the server \
                     (esq projections status {name} shows it)"
                );
                return Ok(ExitCode::from(EXIT_INTERRUPTED));
            }
            next = stream.message() => match next.map_err(call_error)? {
                Some(p) => {
                    progress.rebuild(&p);
                    last = p;
                }
                None => break,
            },
        }
    }
    progress.finish();
    if json {
        print_json(&rebuild_json(&last));
    } else {
        println!("{}", rebuild_line(&last));
    }
    Ok(if last.state == pb::RebuildState::Done as i32 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NO)
    })
}

/// Runs a verify, showing progress, then its report.
async fn verify(
    client: &mut ProjectionsClient<Conn>,
    name: String,
    repair: bool,
    examples: u32,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut stream = client
        .verify(pb::VerifyRequest {
            projection: name.clone(),
            examples,
            repair,
        })
        .await
        .map_err(call_error)?
        .into_inner();
    let mut progress = Progress::new(!json);
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
    let report = loop {
        tokio::select! {
            _ = &mut interrupt => {
                progress.finish();
                // Dropping the call cancels it: the server stops comparing.
                drop(stream);
                if repair {
                    eprintln!("verify of {name} cancelled; the streams repaired so far stay repaired");
                } else {
                    eprintln!("verify of {name} cancelled (read-only: nothing was changed)");
                }
                return Ok(ExitCode::from(EXIT_INTERRUPTED));
            }
            next = stream.message() => match next.map_err(call_error)? {
                Some(pb::VerifyResponse { message: Some(pb::verify_response::Message::Progress(p)) }) => {
                    progress.verify(&p);
                }
                Some(pb::VerifyResponse { message: Some(pb::verify_response::Message::Report(r)) }) => break r,
                Some(pb::VerifyResponse { message: None }) => {}
                None => anyhow::bail!("the server ended the verify without a report"),
            },
        }
    };
    progress.finish();
    if json {
        print_json(&report_json(&report));
    } else {
        print_report(&report);
    }
    Ok(if report.clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NO)
    })
}

/// Runs `esq streams …`.
pub async fn streams(args: StreamsArgs, json: bool) -> anyhow::Result<ExitCode> {
    let channel = connect_with_token(&args.write_url, &args.tls).await?;
    let mut client = EventStoreClient::new(channel);
    match args.command {
        StreamsCommand::Read {
            stream,
            from,
            limit,
            backwards,
        } => {
            let stream = parse_stream(&stream)?;
            let direction = if backwards {
                pb::Direction::Backwards
            } else {
                pb::Direction::Forwards
            };
            let mut events = client
                .read_stream(pb::ReadStreamRequest {
                    stream: Some(stream_ref(&stream)),
                    direction: direction as i32,
                    from_version: from,
                    limit: limit.unwrap_or(0),
                    ..Default::default()
                })
                .await
                .map_err(call_error)?
                .into_inner();
            let mut out = std::io::stdout().lock();
            while let Some(e) = events.message().await.map_err(call_error)? {
                if json {
                    writeln!(out, "{}", event_json(&e))?;
                } else {
                    writeln!(out, "{}", event_line(&e))?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        StreamsCommand::Info { stream } => {
            let stream = parse_stream(&stream)?;
            let info = client
                .get_stream_info(pb::GetStreamInfoRequest {
                    stream: Some(stream_ref(&stream)),
                })
                .await
                .map_err(call_error)?
                .into_inner();
            if json {
                print_json(&json!({
                    "stream": stream.to_string(),
                    "version": info.version,
                    "event_count": info.event_count,
                    "created_at": info.created_at.as_ref().map(|t| time_text(Some(t))),
                    "last_appended_at": info.last_appended_at.as_ref().map(|t| time_text(Some(t))),
                }));
            } else {
                println!("stream            {stream}");
                println!("version           {}", info.version);
                println!("events            {}", info.event_count);
                println!("created at        {}", time_text(info.created_at.as_ref()));
                println!(
                    "last appended at  {}",
                    time_text(info.last_appended_at.as_ref())
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Progress on stderr: a bar on a terminal, plain lines (at most one a second) otherwise,
/// nothing when `enabled` is false.
struct Progress {
    bar: Option<ProgressBar>,
    plain: bool,
    last_line: Option<std::time::Instant>,
}

impl Progress {
    fn new(enabled: bool) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = (enabled && terminal).then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, ETA {eta}) {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self {
            bar,
            plain: enabled && !terminal,
            last_line: None,
        }
    }

    fn line(&mut self, text: String, force: bool) {
        if !self.plain {
            return;
        }
        let now = std::time::Instant::now();
        if force
            || self
                .last_line
                .is_none_or(|t| now - t >= Duration::from_secs(1))
        {
            eprintln!("{text}");
            self.last_line = Some(now);
        }
    }

    fn rebuild(&mut self, p: &pb::RebuildProgress) {
        if let Some(bar) = &self.bar {
            bar.set_length(p.events_total.unwrap_or(p.events_done));
            bar.set_position(p.events_done);
            bar.set_message(format!("events; {}", state_name(p.state)));
        }
        let finished =
            p.state == pb::RebuildState::Done as i32 || p.state == pb::RebuildState::Failed as i32;
        self.line(rebuild_line(p), finished);
    }

    fn verify(&mut self, p: &pb::VerifyProgress) {
        if let Some(bar) = &self.bar {
            bar.set_length(p.streams_total.unwrap_or(p.streams_done));
            bar.set_position(p.streams_done);
            bar.set_message("streams compared");
        }
        let total = p
            .streams_total
            .map_or_else(|| "?".to_owned(), |t| t.to_string());
        self.line(
            format!("verify: {}/{total} streams compared", p.streams_done),
            false,
        );
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn state_name(state: i32) -> &'static str {
    match pb::RebuildState::try_from(state) {
        Ok(pb::RebuildState::Requested) => "requested",
        Ok(pb::RebuildState::Building) => "building",
        Ok(pb::RebuildState::Swapped) => "swapped",
        Ok(pb::RebuildState::Done) => "done",
        Ok(pb::RebuildState::Failed) => "failed",
        _ => "unknown",
    }
}

fn kind_name(kind: i32) -> &'static str {
    match pb::DifferenceKind::try_from(kind) {
        Ok(pb::DifferenceKind::Missing) => "missing",
        Ok(pb::DifferenceKind::Extra) => "extra",
        Ok(pb::DifferenceKind::Different) => "different",
        _ => "unknown",
    }
}

fn stream_text(s: Option<&pb::StreamRef>) -> String {
    s.map_or_else(String::new, |s| format!("{}/{}", s.r#type, s.id))
}

fn micros(t: &prost_types::Timestamp) -> i64 {
    esq::convert::micros(t)
}

/// An RFC 3339 UTC time (to the microsecond), or `-` when unset.
fn time_text(t: Option<&prost_types::Timestamp>) -> String {
    let Some(t) = t else {
        return "-".to_owned();
    };
    let us = micros(t);
    let secs = us.div_euclid(1_000_000);
    let frac = us.rem_euclid(1_000_000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The proleptic Gregorian date of a day number since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn seconds_text(s: f64) -> String {
    if s >= 3600.0 {
        format!(
            "{}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    } else if s >= 60.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!("{s:.1}s")
    }
}

fn rebuild_json(p: &pb::RebuildProgress) -> Value {
    json!({
        "projection": p.projection,
        "generation": p.generation,
        "state": state_name(p.state),
        "streams_done": p.streams_done,
        "streams_total": p.streams_total,
        "events_done": p.events_done,
        "events_total": p.events_total,
        "started_at": p.started_at.as_ref().map(|t| time_text(Some(t))),
        "updated_at": p.updated_at.as_ref().map(|t| time_text(Some(t))),
        "owner": p.owner,
        "error": (!p.error.is_empty()).then_some(&p.error),
        "events_per_second": p.events_per_second,
        "eta_seconds": p.eta_seconds,
    })
}

fn rebuild_line(p: &pb::RebuildProgress) -> String {
    let total = |t: Option<u64>| t.map_or_else(|| "?".to_owned(), |t| t.to_string());
    let mut s = format!(
        "{} generation {}: rebuild {}: {}/{} streams, {}/{} events, {:.0} events/s",
        p.projection,
        p.generation,
        state_name(p.state),
        p.streams_done,
        total(p.streams_total),
        p.events_done,
        total(p.events_total),
        p.events_per_second
    );
    if let Some(eta) = p.eta_seconds {
        s.push_str(&format!(", ETA {}", seconds_text(eta)));
    }
    if !p.error.is_empty() {
        s.push_str(&format!(" ({})", p.error));
    }
    s
}

fn projection_json(p: &pb::Projection) -> Value {
    json!({
        "name": p.name,
        "active_generation": p.active_generation,
        "parked": p.parked,
        "derived_from": (!p.derived_from.is_empty()).then_some(&p.derived_from),
        "rebuild": p.rebuild.as_ref().map(rebuild_json),
    })
}

fn print_projections(all: &[pb::Projection]) {
    println!(
        "{:<12} {:<11} {:<7} REBUILD",
        "NAME", "GENERATION", "PARKED"
    );
    for p in all {
        let generation = p
            .active_generation
            .map_or_else(|| "-".to_owned(), |g| g.to_string());
        let rebuild = p.rebuild.as_ref().map_or_else(
            || "-".to_owned(),
            |r| format!("{} (generation {})", state_name(r.state), r.generation),
        );
        println!(
            "{:<12} {:<11} {:<7} {rebuild}",
            p.name, generation, p.parked
        );
    }
}

fn shard_json(s: &pb::ShardStatus) -> Value {
    json!({
        "shard": s.shard,
        "owner": (!s.owner.is_empty()).then_some(&s.owner),
        "checkpoint_age_seconds": s.checkpoint_age_seconds,
        "changes_behind": s.changes_behind,
        "seconds_behind": s.seconds_behind,
        "updated_at": s.updated_at.as_ref().map(|t| time_text(Some(t))),
    })
}

fn print_status(r: &pb::GetProjectionResponse) {
    if let Some(p) = &r.projection {
        println!("projection         {}", p.name);
        println!(
            "active generation  {}",
            p.active_generation
                .map_or_else(|| "none yet".to_owned(), |g| g.to_string())
        );
        println!("parked streams     {}", p.parked);
        println!(
            "rebuild            {}",
            p.rebuild
                .as_ref()
                .map_or_else(|| "never".to_owned(), rebuild_line)
        );
    }
    println!(
        "{:<6} {:<28} {:<15} BEHIND",
        "SHARD", "OWNER", "CHECKPOINT AGE"
    );
    for s in &r.shards {
        let owner = if s.owner.is_empty() { "-" } else { &s.owner };
        let age = s
            .checkpoint_age_seconds
            .map_or_else(|| "-".to_owned(), seconds_text);
        println!(
            "{:<6} {:<28} {:<15} {} changes, {}",
            s.shard,
            owner,
            age,
            s.changes_behind,
            seconds_text(s.seconds_behind)
        );
    }
}

fn parked_json(p: &pb::ParkedStream) -> Value {
    json!({
        "projection": p.projection,
        "stream": stream_text(p.stream.as_ref()),
        "version": p.version,
        "reason": p.reason,
        "parked_at": p.parked_at.as_ref().map(|t| time_text(Some(t))),
    })
}

fn report_json(r: &pb::VerifyReport) -> Value {
    json!({
        "projection": r.projection,
        "generation": r.generation,
        "clean": r.clean,
        "streams_checked": r.streams_checked,
        "docs_checked": r.docs_checked,
        "missing": r.missing,
        "extra": r.extra,
        "different": r.different,
        "repaired": r.repaired,
        "examples": r.examples.iter().map(|d| json!({
            "kind": kind_name(d.kind),
            "doc_id": d.doc_id,
            "detail": d.detail,
        })).collect::<Vec<_>>(),
    })
}

fn print_report(r: &pb::VerifyReport) {
    println!(
        "{} generation {}: {} streams, {} documents and index entries compared",
        r.projection, r.generation, r.streams_checked, r.docs_checked
    );
    if r.clean {
        println!("no differences");
    } else {
        println!(
            "differences: {} missing, {} extra, {} different",
            r.missing, r.extra, r.different
        );
        for d in &r.examples {
            println!("  {:<9} {}  {}", kind_name(d.kind), d.doc_id, d.detail);
        }
    }
    if r.repaired > 0 {
        println!("repaired {} streams", r.repaired);
    }
}

fn payload_json(e: &pb::RecordedEvent) -> Value {
    use base64::Engine as _;
    match &e.payload {
        Some(pb::recorded_event::Payload::Json(text)) => {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone()))
        }
        Some(pb::recorded_event::Payload::Data(bytes)) => {
            json!({ "base64": base64::engine::general_purpose::STANDARD.encode(bytes) })
        }
        None => Value::Null,
    }
}

fn event_json(e: &pb::RecordedEvent) -> Value {
    json!({
        "stream": stream_text(e.stream.as_ref()),
        "version": e.version,
        "event_id": e.event_id,
        "type": e.r#type,
        "schema_version": e.schema_version,
        "content_type": e.content_type,
        "payload": payload_json(e),
        "metadata": e.metadata,
        "recorded_at": e.recorded_at.as_ref().map(|t| time_text(Some(t))),
    })
}

fn event_line(e: &pb::RecordedEvent) -> String {
    format!(
        "v{:<4} {}  {} (schema {})  {}",
        e.version,
        time_text(e.recorded_at.as_ref()),
        e.r#type,
        e.schema_version,
        payload_json(e)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        let t = esq::convert::timestamp(0);
        assert_eq!(time_text(Some(&t)), "1970-01-01T00:00:00.000000Z");
        // 2024-02-29T12:34:56.789012Z
        let t = esq::convert::timestamp(1_709_210_096_789_012);
        assert_eq!(time_text(Some(&t)), "2024-02-29T12:34:56.789012Z");
        assert_eq!(time_text(None), "-");
    }

    #[test]
    fn codes_are_named_as_grpc_spells_them() {
        assert_eq!(code_name(tonic::Code::NotFound), "NOT_FOUND");
        assert_eq!(code_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(tonic::Code::Unavailable), "UNAVAILABLE");
    }

    #[test]
    fn streams_parse_as_type_slash_id() {
        let s = parse_stream("cart/c-1").expect("valid");
        assert_eq!((s.kind.as_str(), s.id.as_str()), ("cart", "c-1"));
        assert!(parse_stream("cart").is_err());
        let e = parse_stream("Cart/x").expect_err("upper case type");
        assert!(e.to_string().contains("stream.type"), "{e}");
    }
}
