//! Bearer tokens and roles end to end (`esq_runtime::auth`): every role boundary of every
//! service on the embedded stack, token-file reload, the refusal to start without tokens, the
//! CLI's `--token` and `esq token`, and one cluster test with real processes reading their
//! token file from `ESQ_AUTH_TOKENS`.
//!
//! Tokens are made at run time ([`TestTokens`]); nothing secret is in the repository.

use crate::operator::Esq;
use crate::suite::{add, any, json_event, stream, unique};
use esq::pb::cart::v1 as cart;
use esq::pb::v1 as pb;
use esq::pb::v1::projections_client::ProjectionsClient;
use esq_runtime::auth::{access, token_line, Access, Role};
use esq_testkit::auth::{request, TestTokens};
use esq_testkit::cluster::{bin_dir, Backends, ClusterHarness, ClusterOptions};
use esq_testkit::{channel, Clients, DevHarness};
use std::net::SocketAddr;
use std::str::FromStr as _;
use std::time::Duration;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;

/// How often the servers in these tests re-read their token file.
const RELOAD: Duration = Duration::from_millis(100);

/// A dev stack whose both servers need tokens from `tokens`.
async fn dev_with_tokens(tokens: &TestTokens) -> (DevHarness, tokio_util::sync::DropGuard) {
    let (auth, watch) = tokens
        .authenticator(RELOAD)
        .await
        .expect("load the token file");
    let h = DevHarness::start_with(|c| c.auth = Some(auth))
        .await
        .expect("start dev stack");
    (h, watch)
}

fn code<T>(r: Result<T, tonic::Status>) -> Code {
    r.map_or_else(|s| s.code(), |_| Code::Ok)
}

fn item_added(sku: &str) -> pb::NewEvent {
    let mut e = json_event(
        "ItemAdded",
        &format!(r#"{{"sku":"{sku}","quantity":1,"unit_price_cents":100}}"#),
    );
    e.schema_version = 2;
    e
}

/// Calls `path` with an empty message (valid for every request type) and `token`, and
/// returns the status (OK when the call was answered, or its stream started).
async fn raw_call(
    channel: Channel,
    path: &str,
    streaming: bool,
    token: Option<&str>,
) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("channel ready");
    let mut req = request((), token);
    req.set_timeout(Duration::from_secs(60));
    let path = PathAndQuery::from_str(path).expect("path");
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let outcome = if streaming {
        grpc.server_streaming(req, path, codec).await.map(|_| ())
    } else {
        grpc.unary(req, path, codec).await.map(|_| ())
    };
    outcome.err().unwrap_or_else(|| tonic::Status::ok(""))
}

/// Every method of every esq service, from the descriptor set: (path, server-streaming).
fn every_method() -> Vec<(String, String, bool)> {
    use prost::Message as _;
    let set = prost_types::FileDescriptorSet::decode(esq::FILE_DESCRIPTOR_SET).expect("set");
    let mut out = Vec::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                let service_name = format!("{}.{}", file.package(), service.name());
                out.push((
                    service_name.clone(),
                    format!("/{service_name}/{}", method.name()),
                    method.server_streaming(),
                ));
            }
        }
    }
    out
}

/// Every RPC of every service esq dev serves, called with no token, an unknown token and each
/// role's token: no or an unknown token is UNAUTHENTICATED, a role below the method's is
/// PERMISSION_DENIED naming the method and the role, and a role at or above it reaches the
/// handler (which answers whatever an empty request deserves, never an auth code).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_enforces_its_role_on_esq_dev() {
    let tokens = TestTokens::new().expect("tokens");
    let (h, _watch) = dev_with_tokens(&tokens).await;
    let write = h.clients.write_channel.clone();
    let read = h.clients.read_channel.clone();
    let methods = every_method();
    assert!(methods.len() > 30, "{methods:?}");
    for (service, path, streaming) in methods {
        let channel = if esq_write_svc::SERVICES.contains(&service.as_str()) {
            write.clone()
        } else {
            read.clone()
        };
        let Access::Role(needed) = access(&path, false) else {
            panic!("{path} has no role");
        };
        for token in [None, Some("not-a-token")] {
            let s = raw_call(channel.clone(), &path, streaming, token).await;
            assert_eq!(
                s.code(),
                Code::Unauthenticated,
                "{path} with {token:?}: {s:?}"
            );
            assert!(s.message().contains(&path), "{path}: {s:?}");
        }
        for role in Role::ALL {
            let s = raw_call(channel.clone(), &path, streaming, Some(tokens.of(role))).await;
            if role < needed {
                assert_eq!(s.code(), Code::PermissionDenied, "{path} as {role}: {s:?}");
                assert!(
                    s.message().contains(&path) && s.message().contains(needed.as_str()),
                    "{path} as {role}: {s:?}"
                );
                assert!(
                    !s.message().contains(tokens.of(role)),
                    "the token leaked: {s:?}"
                );
            } else {
                assert!(
                    !matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied),
                    "{path} as {role} should reach the handler: {s:?}"
                );
            }
        }
    }
    h.stop().await.expect("stop");
}

/// The boundaries the roles exist for, with real requests: commands need a writer, a raw
/// append to an owned stream type an admin (a writer's is refused and writes nothing),
/// queries a reader, projection operations an admin; health and reflection need nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_boundaries_on_esq_dev() {
    let tokens = TestTokens::new().expect("tokens");
    let (h, _watch) = dev_with_tokens(&tokens).await;
    let (w, r) = (
        h.write_addr().expect("write addr"),
        h.read_addr().expect("read addr"),
    );
    for addr in [w, r] {
        let health = HealthClient::new(channel(addr).await.expect("channel"))
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .expect("health needs no token")
            .into_inner();
        assert_eq!(health.status, 1, "SERVING");
    }
    crate::suite::reflection_lists_services(&h.clients).await;

    let c = &h.clients;
    let id = unique("authcart");
    let mut carts = c.carts.clone();
    assert_eq!(
        code(carts.add_item(add(&id, "apple", 1, 100)).await),
        Code::Unauthenticated
    );
    let r1 = carts
        .add_item(request(add(&id, "apple", 1, 100), Some("bogus")))
        .await;
    assert_eq!(code(r1), Code::Unauthenticated);
    let denied = carts
        .add_item(request(add(&id, "apple", 1, 100), Some(&tokens.reader)))
        .await
        .expect_err("a reader may not run commands");
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(
        denied.message().contains("AddItem") && denied.message().contains("writer"),
        "{denied:?}"
    );
    let v = carts
        .add_item(request(add(&id, "apple", 1, 100), Some(&tokens.writer)))
        .await
        .expect("a writer runs commands")
        .into_inner()
        .version;

    // Raw appends: owned types need an admin, free-form ones a writer.
    let mut events = c.events.clone();
    let owned = |events: Vec<pb::NewEvent>| pb::AppendRequest {
        stream: stream("cart", &id),
        expected_version: any(),
        events,
    };
    let denied = events
        .append(request(
            owned(vec![item_added("pear")]),
            Some(&tokens.writer),
        ))
        .await
        .expect_err("a writer may not append raw events to a cart");
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(
        denied.message().contains("cart") && denied.message().contains("admin"),
        "{denied:?}"
    );
    let info = events
        .get_stream_info(request(
            pb::GetStreamInfoRequest {
                stream: stream("cart", &id),
            },
            Some(&tokens.reader),
        ))
        .await
        .expect("a reader reads stream info")
        .into_inner();
    assert_eq!(
        info.version, v,
        "the refused append wrote nothing: {info:?}"
    );
    let appended = events
        .append(request(
            owned(vec![item_added("pear")]),
            Some(&tokens.admin),
        ))
        .await
        .expect("an admin appends to an owned type")
        .into_inner();
    assert_eq!(appended.last_version, v + 1);
    let note = pb::AppendRequest {
        stream: stream("note", &unique("n")),
        expected_version: any(),
        events: vec![json_event("Noted", r#"{"text":"hi"}"#)],
    };
    assert_eq!(
        code(
            events
                .append(request(note.clone(), Some(&tokens.reader)))
                .await
        ),
        Code::PermissionDenied
    );
    events
        .append(request(note, Some(&tokens.writer)))
        .await
        .expect("a writer appends to a free-form type");
    let timeline = pb::SaveTimelineRequest {
        name: unique("tl"),
        stream: stream("cart", &id),
        edits: Vec::new(),
    };
    assert_eq!(
        code(
            events
                .save_timeline(request(timeline, Some(&tokens.reader)))
                .await
        ),
        Code::PermissionDenied
    );

    // Queries need a reader.
    let query = cart::GetCartRequest {
        cart_id: id.clone(),
        min_version: v + 1,
    };
    assert_eq!(
        code(c.cart_queries.clone().get_cart(query.clone()).await),
        Code::Unauthenticated
    );
    let got = c
        .cart_queries
        .clone()
        .get_cart(request(query, Some(&tokens.reader)))
        .await
        .expect("a reader queries")
        .into_inner();
    assert_eq!(got.version, v + 1);

    // Projection operations on esq dev's read address.
    let mut p = ProjectionsClient::new(c.read_channel.clone());
    p.list_projections(request(pb::ListProjectionsRequest {}, Some(&tokens.reader)))
        .await
        .expect("a reader lists projections");
    let rebuild = || pb::RebuildRequest {
        projection: "nope".into(),
    };
    assert_eq!(code(p.rebuild(rebuild()).await), Code::Unauthenticated);
    assert_eq!(
        code(p.rebuild(request(rebuild(), Some(&tokens.writer))).await),
        Code::PermissionDenied
    );
    // Admitted: the handler itself answers (there is no projection "nope").
    assert_eq!(
        code(p.rebuild(request(rebuild(), Some(&tokens.admin))).await),
        Code::NotFound
    );

    // Typed clients with a token on every call.
    let authed = Clients::connect_with_token(w, r, &tokens.writer)
        .await
        .expect("connect");
    authed
        .carts
        .clone()
        .add_item(add(&id, "plum", 1, 100))
        .await
        .expect("the interceptor sends the token");
    h.stop().await.expect("stop");
}

/// Polls `call` until it answers `want`, for at most 60 s.
async fn until_code<F, Fut>(what: &str, want: Code, mut call: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Code>,
{
    let start = std::time::Instant::now();
    loop {
        let got = call().await;
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what}: still {got:?} after 60 s, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A token added to the file starts working, and a removed one stops, without a restart; the
/// others keep working throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_file_changes_apply_without_restart() {
    let tokens = TestTokens::new().expect("tokens");
    let (h, _watch) = dev_with_tokens(&tokens).await;
    let state = h.clients.state.clone();
    let call = |token: String| {
        let mut state = state.clone();
        async move {
            let req = pb::GetStateRequest {
                stream: stream("cart", "none"),
                min_version: 0,
            };
            let s = state.get_state(request(req, Some(&token))).await;
            match code(s) {
                // Admitted: the handler answered (not found is fine).
                Code::Unauthenticated | Code::PermissionDenied => Code::Unauthenticated,
                _ => Code::Ok,
            }
        }
    };
    let fresh = tokens.add(Role::Reader, "late").expect("add");
    until_code("a token added to the file", Code::Ok, || {
        call(fresh.clone())
    })
    .await;
    tokens.remove(&fresh).expect("remove");
    until_code(
        "a token removed from the file",
        Code::Unauthenticated,
        || call(fresh.clone()),
    )
    .await;
    assert_eq!(
        call(tokens.reader.clone()).await,
        Code::Ok,
        "the other tokens still work"
    );
    h.stop().await.expect("stop");
}

fn service(name: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(bin_dir().expect("bin dir").join(name));
    cmd.env_clear()
        .env("ESQ_CQL_NODES", "127.0.0.1:1")
        .env("ESQ_REDIS_URL", "redis://127.0.0.1:1")
        .env("ESQ_LISTEN", "127.0.0.1:0")
        .env("ESQ_METRICS_ADDR", "127.0.0.1:0")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Runs `cmd`, which must exit non-zero within 60 s; returns its stderr.
async fn refused(mut cmd: tokio::process::Command, what: &str) -> String {
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{what}: still running after 60 s"))
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{what} started: {stderr}");
    stderr
}

/// No token file and no `--insecure`: every server refuses to start, naming the flags; a
/// token file that cannot be read or parsed stops it naming the file and the line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_refuse_to_start_without_tokens_or_with_a_bad_token_file() {
    let dir = tempfile::tempdir().expect("dir");
    let bad = dir.path().join("tokens");
    std::fs::write(&bad, "# ok\nwriter plain-token-not-a-hash ci\n").expect("write");
    let missing = dir.path().join("missing");
    for name in ["write-svc", "read-svc", "projector"] {
        let stderr = refused(service(name), name).await;
        assert!(stderr.contains("--insecure"), "{name}: {stderr}");
        let mut cmd = service(name);
        cmd.env("ESQ_INSECURE", "true").env("ESQ_AUTH_TOKENS", &bad);
        let stderr = refused(cmd, name).await;
        assert!(
            stderr.contains(&bad.display().to_string()) && stderr.contains("line 2"),
            "{name}: {stderr}"
        );
        assert!(stderr.contains("--auth-tokens"), "{name}: {stderr}");
        let mut cmd = service(name);
        cmd.env("ESQ_INSECURE", "true")
            .env("ESQ_AUTH_TOKENS", &missing);
        let stderr = refused(cmd, name).await;
        assert!(
            stderr.contains(&missing.display().to_string()),
            "{name}: {stderr}"
        );
    }
}

/// `esq token new` prints a token and its line, `esq token hash` hashes stdin to the same
/// line, and the operator commands send `--token` / `ESQ_TOKEN`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_tokens_and_the_token_flag() {
    let bin = bin_dir().expect("bin dir").join("esq");
    let out = tokio::process::Command::new(&bin)
        .args(["token", "new", "--role", "writer", "--name", "ci"])
        .output()
        .await
        .expect("esq token new");
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_owned();
    let line = String::from_utf8(out.stderr)
        .expect("utf8")
        .trim()
        .to_owned();
    assert_eq!(line, token_line(Role::Writer, &token, "ci"));
    let mut hash = tokio::process::Command::new(&bin)
        .args(["token", "hash", "--role", "writer", "--name", "ci"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("esq token hash");
    {
        use tokio::io::AsyncWriteExt as _;
        let mut stdin = hash.stdin.take().expect("stdin");
        stdin
            .write_all(format!("{token}\n").as_bytes())
            .await
            .expect("write");
    }
    let out = hash.wait_with_output().await.expect("hash");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), line);

    let tokens = TestTokens::new().expect("tokens");
    let (h, _watch) = dev_with_tokens(&tokens).await;
    let esq = Esq::new(h.write_addr().expect("w"), h.read_addr().expect("r"));
    esq.fails(&["projections", "list"], "UNAUTHENTICATED").await;
    esq.json(0, &["projections", "list", "--token", &tokens.reader])
        .await;
    esq.fails(
        &["projections", "rebuild", "carts", "--token", &tokens.writer],
        "PERMISSION_DENIED",
    )
    .await;
    esq.fails(&["streams", "info", "cart/x"], "UNAUTHENTICATED")
        .await;
    h.stop().await.expect("stop");
}

/// A secure deployment end to end: real write-svc, projector and read-svc processes serving
/// mutual TLS with `ESQ_AUTH_TOKENS` and without `--insecure` (they start: nothing is waived);
/// each enforces its methods' roles over TLS, and health needs no token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_on_every_process_of_the_cluster() {
    let Some(backends) = Backends::from_env("tokens_on_every_process_of_the_cluster") else {
        return;
    };
    let tokens = TestTokens::new().expect("tokens");
    let options = ClusterOptions {
        env: vec![
            (
                "ESQ_AUTH_TOKENS".into(),
                tokens.file().display().to_string(),
            ),
            ("ESQ_AUTH_RELOAD_INTERVAL".into(), "200ms".into()),
            // The harness sets it for plaintext runs; this deployment needs none of it.
            ("ESQ_INSECURE".into(), "false".into()),
        ],
        tls: true,
        ..ClusterOptions::default()
    };
    let h = ClusterHarness::start(backends, options)
        .await
        .expect("start the cluster");
    let projector: SocketAddr = h.projectors[0].addr;
    let tls = h.client_tls().expect("a TLS harness");
    let secure = |addr: SocketAddr| {
        let tls = tls.clone();
        async move {
            esq_testkit::endpoint(addr, Some(&tls))
                .expect("endpoint")
                .connect()
                .await
                .expect("a TLS connection")
        }
    };
    for addr in [h.writers[0].addr, h.read_addr(), projector] {
        let health = HealthClient::new(secure(addr).await)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .expect("health needs no token");
        assert_eq!(health.into_inner().status, 1, "{addr} SERVING");
    }
    // write-svc
    let c = &h.clients;
    let id = unique("authcluster");
    let mut carts = c.carts.clone();
    assert_eq!(
        code(carts.add_item(add(&id, "apple", 1, 100)).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(
            carts
                .add_item(request(add(&id, "apple", 1, 100), Some(&tokens.reader)))
                .await
        ),
        Code::PermissionDenied
    );
    let v = carts
        .add_item(request(add(&id, "apple", 1, 100), Some(&tokens.writer)))
        .await
        .expect("a writer runs commands")
        .into_inner()
        .version;
    let denied = c
        .events
        .clone()
        .append(request(
            pb::AppendRequest {
                stream: stream("cart", &id),
                expected_version: any(),
                events: vec![item_added("pear")],
            },
            Some(&tokens.writer),
        ))
        .await
        .expect_err("a writer may not append raw events to a cart");
    assert_eq!(denied.code(), Code::PermissionDenied);
    // read-svc
    let query = cart::GetCartRequest {
        cart_id: id.clone(),
        min_version: v,
    };
    assert_eq!(
        code(c.cart_queries.clone().get_cart(query.clone()).await),
        Code::Unauthenticated
    );
    let got = c
        .cart_queries
        .clone()
        .get_cart(request(query, Some(&tokens.reader)))
        .await
        .expect("a reader queries")
        .into_inner();
    assert_eq!(got.version, v, "the refused raw append wrote nothing");
    // the projector's own server
    let mut p = ProjectionsClient::new(secure(projector).await);
    assert_eq!(
        code(p.list_projections(pb::ListProjectionsRequest {}).await),
        Code::Unauthenticated
    );
    p.list_projections(request(pb::ListProjectionsRequest {}, Some(&tokens.reader)))
        .await
        .expect("a reader lists projections");
    let rebuild = || pb::RebuildRequest {
        projection: "nope".into(),
    };
    assert_eq!(
        code(p.rebuild(request(rebuild(), Some(&tokens.writer))).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(p.rebuild(request(rebuild(), Some(&tokens.admin))).await),
        Code::NotFound
    );
}

/// The `esq dev` binary takes `ESQ_AUTH_TOKENS` (optional there), says so in its start-up
/// lines, and then refuses calls without a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn esq_dev_binary_takes_a_token_file() {
    use tokio::io::AsyncBufReadExt as _;
    let tokens = TestTokens::new().expect("tokens");
    let data = tempfile::tempdir().expect("dir");
    let mut child = tokio::process::Command::new(bin_dir().expect("bin dir").join("esq"))
        .args([
            "dev",
            "--write-addr",
            "127.0.0.1:0",
            "--read-addr",
            "127.0.0.1:0",
        ])
        .args(["--metrics-addr", "off", "--data-dir"])
        .arg(data.path())
        .env("ESQ_AUTH_TOKENS", tokens.file())
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn esq dev");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let (mut write, mut read, mut says_tokens) = (None, None, false);
    let started = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(line) = lines.next_line().await.expect("stdout") {
            says_tokens |= line.contains("authorization: Bearer");
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("write-svc"), Some(a)) => write = a.parse::<SocketAddr>().ok(),
                (Some("read-svc"), Some(a)) => read = a.parse::<SocketAddr>().ok(),
                _ => {}
            }
            if write.is_some() && read.is_some() {
                return;
            }
        }
    })
    .await;
    assert!(started.is_ok(), "esq dev printed no addresses within 120 s");
    assert!(says_tokens, "the start-up lines say calls need a token");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let (write, read) = (write.expect("write"), read.expect("read"));
    let c = Clients::connect(write, read).await.expect("connect");
    let id = unique("devbin");
    let mut carts = c.carts.clone();
    assert_eq!(
        code(carts.add_item(add(&id, "apple", 1, 100)).await),
        Code::Unauthenticated
    );
    carts
        .add_item(request(add(&id, "apple", 1, 100), Some(&tokens.writer)))
        .await
        .expect("a writer's command");
    let mut p = ProjectionsClient::new(c.read_channel.clone());
    assert_eq!(
        code(
            p.rebuild(request(
                pb::RebuildRequest {
                    projection: "nope".into()
                },
                Some(&tokens.writer)
            ))
            .await
        ),
        Code::PermissionDenied
    );
    child.kill().await.expect("kill esq dev");
}
