//! Who may call what: bearer tokens mapped to roles, checked in one tower layer before any
//! handler runs.
//!
//! - A **token file** ([`TokenTable::parse`]) lists one token per line as
//!   `<role> <sha256-hex-of-token> <name>`; `#` starts a comment. Only hashes are stored, so the
//!   file (a Kubernetes Secret, say) never holds a usable token. `esq token new` makes a token
//!   and its line.
//! - A client sends `authorization: Bearer <token>`. [`AuthLayer`] hashes it, looks the hash up
//!   and compares the identity's [`Role`] with the one the method needs ([`access`], a table
//!   that covers every RPC of every esq service). No or an unknown token is UNAUTHENTICATED, a
//!   role too low PERMISSION_DENIED, answered as a trailers-only gRPC response; messages name the
//!   method and the role, never the token. An admitted call carries its [`Identity`] in the
//!   request extensions, and the header is removed, so handlers never see the token.
//! - Roles are ordered: a writer may do what a reader may, an admin anything. Health is always
//!   open (probes carry no token); reflection is open unless [`Authenticator::protect_reflection`].
//! - [`Authenticator::watch`] re-reads the file when it changes: a bad new file keeps the old
//!   tokens (and logs an error), a removed line stops working at the next poll.
//!
//! A handler that needs more than the method's role (a raw append to a stream type an aggregate
//! owns needs admin) calls [`require`]; without an identity (auth off) it allows.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http::{header, HeaderValue, Request, Response};
use tonic::Status;

/// What a caller may do; each role may do everything the roles below it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Queries, reading streams, subscriptions, temporal and replay previews.
    Reader,
    /// Commands, raw appends to free-form stream types, saving timelines.
    Writer,
    /// Raw appends to stream types an aggregate owns, projection operations.
    Admin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 3] = [Role::Reader, Role::Writer, Role::Admin];

    /// The name used in token files and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown role {s:?}: use reader, writer or admin"))
    }
}

/// Who is calling: the name and role of the token's line. Admitted calls carry it in their
/// request extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The name given in the token file (for logs and messages; not a secret).
    pub name: String,
    /// What the caller may do.
    pub role: Role,
}

/// What a method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, with or without a token (health checks).
    Open,
    /// Any valid token (unknown methods, which tonic then answers UNIMPLEMENTED; reflection when
    /// protected).
    AnyToken,
    /// A token whose role is at least this one.
    Role(Role),
}

/// The role every esq RPC needs, by `/package.Service/Method` path. A unit test checks that it
/// covers every method of the descriptor set, so a new RPC cannot be left out.
const METHOD_ROLES: &[(&str, Role)] = &[
    // esq.v1.EventStore (write-svc)
    ("/esq.v1.EventStore/Append", Role::Writer),
    ("/esq.v1.EventStore/ReadStream", Role::Reader),
    ("/esq.v1.EventStore/GetStreamInfo", Role::Reader),
    ("/esq.v1.EventStore/ListEventTypes", Role::Reader),
    ("/esq.v1.EventStore/GetStateAt", Role::Reader),
    ("/esq.v1.EventStore/ReplayPreview", Role::Reader),
    ("/esq.v1.EventStore/SaveTimeline", Role::Writer),
    ("/esq.v1.EventStore/GetTimeline", Role::Reader),
    ("/esq.v1.EventStore/ListTimelines", Role::Reader),
    ("/esq.v1.EventStore/Subscribe", Role::Reader),
    // esq.v1.StateQueries (read-svc)
    ("/esq.v1.StateQueries/GetState", Role::Reader),
    // esq.v1.Projections (projector; read-svc's address in esq dev)
    ("/esq.v1.Projections/ListProjections", Role::Reader),
    ("/esq.v1.Projections/GetProjection", Role::Reader),
    ("/esq.v1.Projections/WatchRebuild", Role::Reader),
    ("/esq.v1.Projections/ListParked", Role::Reader),
    ("/esq.v1.Projections/Rebuild", Role::Admin),
    ("/esq.v1.Projections/Verify", Role::Admin),
    ("/esq.v1.Projections/RetryParked", Role::Admin),
    ("/esq.v1.Projections/SkipParked", Role::Admin),
    // esq.cart.v1
    ("/esq.cart.v1.CartCommands/AddItem", Role::Writer),
    ("/esq.cart.v1.CartCommands/RemoveItem", Role::Writer),
    ("/esq.cart.v1.CartCommands/Checkout", Role::Writer),
    ("/esq.cart.v1.CartQueries/GetCart", Role::Reader),
    ("/esq.cart.v1.CartQueries/GetCartAt", Role::Reader),
    ("/esq.cart.v1.CartQueries/SalesReport", Role::Reader),
    ("/esq.cart.v1.CartQueries/GetSkuSales", Role::Reader),
    ("/esq.cart.v1.CartQueries/ListSkuSales", Role::Reader),
    // esq.bookshop.v1
    ("/esq.bookshop.v1.BookCommands/CreateBook", Role::Writer),
    ("/esq.bookshop.v1.BookCommands/UpdateBook", Role::Writer),
    ("/esq.bookshop.v1.BookCommands/DeleteBook", Role::Writer),
    ("/esq.bookshop.v1.BookQueries/GetBook", Role::Reader),
    ("/esq.bookshop.v1.BookQueries/ListBooks", Role::Reader),
    ("/esq.bookshop.v1.BookQueries/GetBookAt", Role::Reader),
    ("/esq.bookshop.v1.BookQueries/ListBooksAt", Role::Reader),
    ("/esq.bookshop.v1.BookQueries/GetAuthor", Role::Reader),
    ("/esq.bookshop.v1.BookQueries/ListAuthors", Role::Reader),
];

/// What a call to `path` needs; `protect_reflection` puts server reflection behind a token.
pub fn access(path: &str, protect_reflection: bool) -> Access {
    if path.starts_with("/grpc.health.v1.Health/") {
        return Access::Open;
    }
    if path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
    {
        return if protect_reflection {
            Access::AnyToken
        } else {
            Access::Open
        };
    }
    METHOD_ROLES
        .iter()
        .find(|(p, _)| *p == path)
        .map_or(Access::AnyToken, |(_, role)| Access::Role(*role))
}

/// Hex SHA-256 of a token, as token files store it.
pub fn hash_token(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh random token: 32 bytes from the system's secure generator, base64url without padding
/// (43 characters, safe in headers and shells).
pub fn new_token() -> anyhow::Result<String> {
    use base64::Engine as _;
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("the system's random generator failed"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// The client side: adds `authorization: Bearer <token>` to every call (nothing when it holds
/// no token). Used by the `esq` CLI and the test clients.
#[derive(Clone, Debug, Default)]
pub struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl BearerToken {
    /// The header for `token` (trimmed), if any; an error when it cannot travel in a header
    /// (only printable ASCII can).
    pub fn new(token: Option<&str>) -> anyhow::Result<Self> {
        token
            .map(|t| {
                format!("Bearer {}", t.trim())
                    .parse()
                    .map_err(|_| anyhow::anyhow!("not a valid token: printable ASCII expected"))
            })
            .transpose()
            .map(Self)
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The token-file line that gives `token`'s holder `role` under `name`.
pub fn token_line(role: Role, token: &str, name: &str) -> String {
    format!("{role} {} {name}", hash_token(token))
}

/// A token file that does not parse: the line and what is wrong with it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {problem}")]
pub struct TokenFileError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong, in words.
    pub problem: String,
}

/// The tokens of a token file, by hash.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenTable {
    by_hash: HashMap<[u8; 32], Identity>,
}

impl TokenTable {
    /// Parses a token file: lines `<role> <sha256-hex> <name>`, blank lines and `#` comments
    /// ignored. Every problem names its line; a hash listed twice is refused.
    pub fn parse(text: &str) -> Result<Self, TokenFileError> {
        let mut by_hash = HashMap::new();
        let mut lines_of: HashMap<[u8; 32], usize> = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let err = |problem: String| TokenFileError { line, problem };
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let fields: Vec<&str> = content.split_whitespace().collect();
            let [role, hash, name] = fields[..] else {
                return Err(err(format!(
                    "expected `<role> <sha256-hex-of-token> <name>`, found {} field(s)",
                    fields.len()
                )));
            };
            let role: Role = role.parse().map_err(err)?;
            let hash = parse_hash(hash).ok_or_else(|| {
                err(
                    "the second field is not a SHA-256 in hex (64 hex digits): store the \
                     token's hash (`esq token hash`), not the token"
                        .to_owned(),
                )
            })?;
            if let Some(first) = lines_of.insert(hash, line) {
                return Err(err(format!(
                    "the same token hash is already on line {first}"
                )));
            }
            by_hash.insert(
                hash,
                Identity {
                    name: name.to_owned(),
                    role,
                },
            );
        }
        Ok(Self { by_hash })
    }

    /// The identity of `token`, if the table lists it.
    pub fn identify(&self, token: &str) -> Option<&Identity> {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let key: [u8; 32] = digest.as_ref().try_into().ok()?;
        self.by_hash.get(&key)
    }

    /// How many tokens are listed.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether no token is listed (then every call that needs one is refused).
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

fn parse_hash(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The server's tokens, shared by every connection and swapped whole on reload. Cloning
/// shares them.
#[derive(Debug, Clone)]
pub struct Authenticator {
    tokens: Arc<RwLock<Arc<TokenTable>>>,
    protect_reflection: bool,
}

impl Authenticator {
    /// An authenticator over `tokens`, reflection open.
    pub fn new(tokens: TokenTable) -> Self {
        Self {
            tokens: Arc::new(RwLock::new(Arc::new(tokens))),
            protect_reflection: false,
        }
    }

    /// Reads and parses the token file at `path`; the error names the file and the line.
    pub async fn load(path: &Path) -> anyhow::Result<Self> {
        Ok(Self::new(read_token_file(path).await?))
    }

    /// Puts server reflection behind a token (any role) when `protect` is true.
    pub fn protect_reflection(mut self, protect: bool) -> Self {
        self.protect_reflection = protect;
        self
    }

    /// The tokens now.
    pub fn tokens(&self) -> Arc<TokenTable> {
        Arc::clone(&self.tokens.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Replaces the tokens.
    pub fn replace(&self, tokens: TokenTable) {
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tokens);
    }

    /// Spawns a task that re-reads `path` every `every` until `shutdown` and swaps the tokens
    /// in when the file's content changed and parses; a file that cannot be read or parsed
    /// keeps the tokens in use and logs an error (once per bad content).
    pub fn watch(
        &self,
        path: PathBuf,
        every: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let mut reloader = Reloader::new(self.clone(), path);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = shutdown.cancelled() => return,
                }
                reloader.poll().await;
            }
        })
    }

    /// The identity behind the `authorization` header, or UNAUTHENTICATED for `path`.
    pub fn authenticate(
        &self,
        header: Option<&HeaderValue>,
        path: &str,
    ) -> Result<Identity, Status> {
        let Some(token) = header.and_then(bearer) else {
            return Err(Status::unauthenticated(format!(
                "{path} needs a bearer token: send `authorization: Bearer <token>`"
            )));
        };
        self.tokens().identify(token).cloned().ok_or_else(|| {
            Status::unauthenticated(format!(
                "{path}: the bearer token is not one this server knows (revoked, or from \
                 another deployment)"
            ))
        })
    }

    /// Whether a call to `path` with `header` may go on: `Ok(None)` for open methods,
    /// `Ok(Some(identity))` for an admitted caller, the status to answer otherwise.
    pub fn check(
        &self,
        path: &str,
        header: Option<&HeaderValue>,
    ) -> Result<Option<Identity>, Status> {
        let needed = match access(path, self.protect_reflection) {
            Access::Open => return Ok(None),
            Access::AnyToken => return self.authenticate(header, path).map(Some),
            Access::Role(role) => role,
        };
        let identity = self.authenticate(header, path)?;
        if identity.role < needed {
            return Err(Status::permission_denied(format!(
                "{path} needs role {needed}; {} has role {}",
                identity.name, identity.role
            )));
        }
        Ok(Some(identity))
    }
}

/// What one look at the token file did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reload {
    /// Same content as last time (or still unreadable).
    Unchanged,
    /// New content, swapped in.
    Reloaded,
    /// New content that cannot be read or parsed: the tokens in use stay.
    Refused,
}

/// Re-reads a token file into an [`Authenticator`] when its content changes.
struct Reloader {
    auth: Authenticator,
    path: PathBuf,
    /// The content last looked at (`None`: unreadable or not read yet).
    last: Option<Vec<u8>>,
}

impl Reloader {
    fn new(auth: Authenticator, path: PathBuf) -> Self {
        Self {
            auth,
            path,
            last: None,
        }
    }

    async fn poll(&mut self) -> Reload {
        let path = &self.path;
        let bytes = match tokio::fs::read(path).await {
            Ok(bytes) => bytes,
            Err(e) => {
                // Logged once per outage, not at every poll.
                if self.last.take().is_some() {
                    tracing::error!(file = %path.display(), error = %e,
                        "cannot read the token file (--auth-tokens); keeping the tokens in use");
                    return Reload::Refused;
                }
                return Reload::Unchanged;
            }
        };
        if self.last.as_deref() == Some(&bytes[..]) {
            return Reload::Unchanged;
        }
        let parsed = parse_token_bytes(path, &bytes);
        self.last = Some(bytes);
        match parsed {
            Ok(tokens) => {
                tracing::info!(file = %path.display(), tokens = tokens.len(), "token file reloaded");
                self.auth.replace(tokens);
                Reload::Reloaded
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"),
                    "bad token file (--auth-tokens); keeping the tokens in use");
                Reload::Refused
            }
        }
    }
}

async fn read_token_file(path: &Path) -> anyhow::Result<TokenTable> {
    let bytes = tokio::fs::read(path).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot read the token file {} (--auth-tokens): {e}",
            path.display()
        )
    })?;
    parse_token_bytes(path, &bytes)
}

fn parse_token_bytes(path: &Path, bytes: &[u8]) -> anyhow::Result<TokenTable> {
    let text = std::str::from_utf8(bytes).map_err(|_| {
        anyhow::anyhow!(
            "the token file {} (--auth-tokens) is not UTF-8 text",
            path.display()
        )
    })?;
    TokenTable::parse(text).map_err(|e| {
        anyhow::anyhow!(
            "the token file {} (--auth-tokens) is invalid: {e}",
            path.display()
        )
    })
}

/// The token of an `authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer(value: &HeaderValue) -> Option<&str> {
    let value = value.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Fails with PERMISSION_DENIED unless the call's identity has at least `role`. A call without
/// an identity passed a server without authentication, and is allowed.
pub fn require<T>(request: &tonic::Request<T>, role: Role) -> Result<(), Status> {
    match request.extensions().get::<Identity>() {
        Some(identity) if identity.role < role => Err(Status::permission_denied(format!(
            "needs role {role}; {} has role {}",
            identity.name, identity.role
        ))),
        _ => Ok(()),
    }
}

/// The tower layer that checks every call; with `None` it lets everything through (insecure
/// mode).
#[derive(Debug, Clone, Default)]
pub struct AuthLayer {
    auth: Option<Authenticator>,
}

impl AuthLayer {
    /// Checks calls with `auth`, or none when `None`.
    pub fn new(auth: Option<Authenticator>) -> Self {
        Self { auth }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// The service made by [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    auth: Option<Authenticator>,
}

type BoxFuture<T, E> = Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for Auth<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        if let Some(auth) = &self.auth {
            let path = request.uri().path();
            match auth.check(path, request.headers().get(header::AUTHORIZATION)) {
                Ok(identity) => {
                    request.headers_mut().remove(header::AUTHORIZATION);
                    if let Some(identity) = identity {
                        request.extensions_mut().insert(identity);
                    }
                }
                Err(status) => {
                    tracing::debug!(code = ?status.code(), message = status.message(),
                        "call refused by authentication");
                    let mut response: Response<ResBody> = status.into_http();
                    if response
                        .headers()
                        .get("grpc-status")
                        .is_some_and(|s| s == "16")
                    {
                        response
                            .headers_mut()
                            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                    }
                    return Box::pin(async move { Ok(response) });
                }
            }
        }
        let response = self.inner.call(request);
        Box::pin(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor as _;
    use tonic::Code;

    #[test]
    fn a_bearer_token_travels_trimmed_and_a_bad_one_is_refused() {
        let mut bearer = BearerToken::new(Some(" t0ken\n")).expect("a printable token");
        let request = bearer.call(tonic::Request::new(())).expect("passes");
        assert_eq!(
            request
                .metadata()
                .get("authorization")
                .map(|v| v.to_str().ok()),
            Some(Some("Bearer t0ken"))
        );
        let mut none = BearerToken::new(None).expect("no token");
        let request = none.call(tonic::Request::new(())).expect("passes");
        assert!(request.metadata().get("authorization").is_none());
        let err = BearerToken::new(Some("tok\u{7f}en")).expect_err("not header-safe");
        assert!(err.to_string().contains("printable ASCII"), "{err}");
    }

    fn table(lines: &[(Role, &str, &str)]) -> TokenTable {
        let text: String = lines
            .iter()
            .map(|(role, token, name)| format!("{}\n", token_line(*role, token, name)))
            .collect();
        TokenTable::parse(&text).expect("valid")
    }

    fn header(v: &str) -> HeaderValue {
        HeaderValue::from_str(v).expect("header")
    }

    #[test]
    fn every_esq_method_has_a_role() {
        use prost::Message as _;
        let set = prost_types::FileDescriptorSet::decode(esq::FILE_DESCRIPTOR_SET).expect("set");
        let mut paths = Vec::new();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    paths.push(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
        assert!(paths.len() > 30, "descriptor set read: {paths:?}");
        let missing: Vec<_> = paths
            .iter()
            .filter(|p| !METHOD_ROLES.iter().any(|(m, _)| m == p))
            .collect();
        assert!(missing.is_empty(), "methods without a role: {missing:?}");
        let stale: Vec<_> = METHOD_ROLES
            .iter()
            .filter(|(m, _)| !paths.iter().any(|p| p == m))
            .collect();
        assert!(
            stale.is_empty(),
            "roles of methods that do not exist: {stale:?}"
        );
    }

    #[test]
    fn roles_are_ordered_and_parse() {
        assert!(Role::Reader < Role::Writer && Role::Writer < Role::Admin);
        assert_eq!("Admin".parse::<Role>(), Ok(Role::Admin));
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn token_files_parse_with_line_numbers() {
        let good = format!(
            "# tokens\n\n{}\nreader {} dash # the dashboard\n",
            token_line(Role::Writer, "t1", "ci"),
            hash_token("t2").to_uppercase()
        );
        let t = TokenTable::parse(&good).expect("valid");
        assert_eq!(t.len(), 2);
        assert_eq!(
            t.identify("t1"),
            Some(&Identity {
                name: "ci".into(),
                role: Role::Writer
            })
        );
        assert_eq!(t.identify("t2").map(|i| i.role), Some(Role::Reader));
        assert_eq!(t.identify("t3"), None);

        let e = TokenTable::parse("# c\nsuperuser abc x\n").expect_err("bad role");
        assert_eq!(e.line, 2);
        assert!(e.problem.contains("superuser"), "{e}");
        let e = TokenTable::parse("\nwriter secret-token ci\n").expect_err("raw token");
        assert_eq!(e.line, 2);
        assert!(e.to_string().contains("SHA-256"), "{e}");
        assert!(!e.to_string().contains("secret-token"), "{e}");
        let e = TokenTable::parse("writer\n").expect_err("short");
        assert_eq!(e.line, 1);
        let dup = format!(
            "{}\n{}\n",
            token_line(Role::Reader, "t", "a"),
            token_line(Role::Admin, "t", "b")
        );
        let e = TokenTable::parse(&dup).expect_err("duplicate");
        assert_eq!(e.line, 2);
        assert!(e.problem.contains("line 1"), "{e}");
        assert!(TokenTable::parse("# nothing\n").expect("empty").is_empty());
    }

    #[test]
    fn bearer_headers() {
        assert_eq!(bearer(&header("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&header("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&header("BEARER abc")), Some("abc"));
        assert_eq!(bearer(&header("Basic abc")), None);
        assert_eq!(bearer(&header("Bearer ")), None);
        assert_eq!(bearer(&header("abc")), None);
    }

    #[test]
    fn checks_follow_the_table() {
        let auth = Authenticator::new(table(&[
            (Role::Reader, "r", "dash"),
            (Role::Writer, "w", "ci"),
            (Role::Admin, "a", "ops"),
        ]));
        let append = "/esq.v1.EventStore/Append";
        let rebuild = "/esq.v1.Projections/Rebuild";
        let get = "/esq.cart.v1.CartQueries/GetCart";
        let health = "/grpc.health.v1.Health/Check";
        let reflection = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
        let code = |path: &str, h: Option<&str>| {
            let h = h.map(header);
            auth.check(path, h.as_ref()).map_err(|s| s.code())
        };
        assert_eq!(code(append, None), Err(Code::Unauthenticated));
        assert_eq!(
            code(append, Some("Bearer nope")),
            Err(Code::Unauthenticated)
        );
        assert_eq!(code(append, Some("Bearer r")), Err(Code::PermissionDenied));
        assert_eq!(
            code(append, Some("Bearer w")).map(|i| i.is_some()),
            Ok(true)
        );
        assert_eq!(code(rebuild, Some("Bearer w")), Err(Code::PermissionDenied));
        assert!(code(rebuild, Some("Bearer a")).is_ok());
        assert!(code(get, Some("Bearer r")).is_ok());
        assert!(code(get, Some("Bearer a")).is_ok());
        assert_eq!(code(health, None), Ok(None));
        assert_eq!(code(reflection, None), Ok(None));
        assert_eq!(
            code("/esq.v1.Nope/Nothing", None),
            Err(Code::Unauthenticated)
        );
        assert!(code("/esq.v1.Nope/Nothing", Some("Bearer r")).is_ok());

        let denied = auth
            .check(rebuild, Some(&header("Bearer w")))
            .expect_err("denied");
        assert!(denied.message().contains(rebuild), "{denied:?}");
        assert!(denied.message().contains("admin"), "{denied:?}");
        let unknown = auth
            .check(append, Some(&header("Bearer very-secret")))
            .expect_err("unknown");
        assert!(!unknown.message().contains("very-secret"), "{unknown:?}");

        let closed = auth.clone().protect_reflection(true);
        assert_eq!(
            closed.check(reflection, None).map_err(|s| s.code()),
            Err(Code::Unauthenticated)
        );
        assert!(closed.check(reflection, Some(&header("Bearer r"))).is_ok());
        assert_eq!(closed.check(health, None).map_err(|s| s.code()), Ok(None));
    }

    #[test]
    fn require_checks_the_identity_if_any() {
        let mut request = tonic::Request::new(());
        assert!(require(&request, Role::Admin).is_ok());
        request.extensions_mut().insert(Identity {
            name: "ci".into(),
            role: Role::Writer,
        });
        assert!(require(&request, Role::Writer).is_ok());
        let denied = require(&request, Role::Admin).expect_err("denied");
        assert_eq!(denied.code(), Code::PermissionDenied);
    }

    #[test]
    fn new_tokens_are_random_and_header_safe() {
        let a = new_token().expect("token");
        let b = new_token().expect("token");
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert!(HeaderValue::from_str(&format!("Bearer {a}")).is_ok());
        assert_eq!(hash_token(&a).len(), 64);
    }

    #[tokio::test]
    async fn reload_swaps_good_files_and_keeps_tokens_on_bad_ones() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("tokens");
        std::fs::write(&path, token_line(Role::Reader, "old", "a")).expect("write");
        let auth = Authenticator::load(&path).await.expect("load");
        let known = |t: &str| auth.tokens().identify(t).is_some();
        let mut reloader = Reloader::new(auth.clone(), path.clone());
        assert_eq!(reloader.poll().await, Reload::Reloaded);
        assert_eq!(reloader.poll().await, Reload::Unchanged);
        assert!(known("old"));
        std::fs::write(&path, "writer not-a-hash b\n").expect("write");
        assert_eq!(reloader.poll().await, Reload::Refused);
        assert!(known("old"), "a bad file keeps the tokens in use");
        std::fs::remove_file(&path).expect("remove");
        assert_eq!(reloader.poll().await, Reload::Refused);
        assert_eq!(reloader.poll().await, Reload::Unchanged);
        assert!(known("old"), "a missing file keeps the tokens in use");
        std::fs::write(&path, token_line(Role::Writer, "new", "b")).expect("write");
        assert_eq!(reloader.poll().await, Reload::Reloaded);
        assert!(known("new"));
        assert!(!known("old"), "a removed token stops working");
    }

    #[tokio::test]
    async fn the_watch_task_follows_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("tokens");
        std::fs::write(&path, token_line(Role::Reader, "old", "a")).expect("write");
        let auth = Authenticator::load(&path).await.expect("load");
        let shutdown = CancellationToken::new();
        let task = auth.watch(path.clone(), Duration::from_millis(20), shutdown.clone());
        std::fs::write(&path, token_line(Role::Writer, "new", "b")).expect("write");
        tokio::time::timeout(Duration::from_secs(60), async {
            while auth.tokens().identify("new").is_none() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the new token is loaded within 60 s");
        assert!(auth.tokens().identify("old").is_none());
        shutdown.cancel();
        task.await.expect("join");
    }
}
