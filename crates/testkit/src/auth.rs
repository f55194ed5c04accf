//! Bearer tokens for system tests: a token file with fresh random tokens of every role, made
//! at run time (no secret is ever in the repository), and an interceptor that sends a token.

pub use esq_runtime::auth::BearerToken;
use esq_runtime::auth::{new_token, token_line, Authenticator, Role};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A channel whose calls carry a bearer token.
pub type TokenChannel = InterceptedService<Channel, BearerToken>;

/// `channel` with `token` on every call.
pub fn with_token(channel: Channel, token: &str) -> TokenChannel {
    let bearer = BearerToken::new(Some(token)).expect("a test token is header-safe text");
    InterceptedService::new(channel, bearer)
}

/// `message` as a request carrying `token` (none: no header).
pub fn request<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header-safe"),
        );
    }
    request
}

/// A token file in a temporary folder with one fresh token per role; lines can be added and
/// removed while a server watches the file.
pub struct TestTokens {
    /// A reader's token.
    pub reader: String,
    /// A writer's token.
    pub writer: String,
    /// An admin's token.
    pub admin: String,
    lines: std::sync::Mutex<Vec<(String, String)>>,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestTokens {
    /// Writes a token file with a reader, a writer and an admin token.
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("tokens");
        let (reader, writer, admin) = (new_token()?, new_token()?, new_token()?);
        let tokens = Self {
            lines: std::sync::Mutex::new(vec![
                (
                    reader.clone(),
                    token_line(Role::Reader, &reader, "test-reader"),
                ),
                (
                    writer.clone(),
                    token_line(Role::Writer, &writer, "test-writer"),
                ),
                (admin.clone(), token_line(Role::Admin, &admin, "test-admin")),
            ]),
            reader,
            writer,
            admin,
            file,
            _dir: dir,
        };
        tokens.save()?;
        Ok(tokens)
    }

    /// The token file (for `--auth-tokens` / `ESQ_AUTH_TOKENS`).
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The token of `role`.
    pub fn of(&self, role: Role) -> &str {
        match role {
            Role::Reader => &self.reader,
            Role::Writer => &self.writer,
            Role::Admin => &self.admin,
        }
    }

    /// Adds a fresh token of `role` to the file and returns it.
    pub fn add(&self, role: Role, name: &str) -> anyhow::Result<String> {
        let token = new_token()?;
        self.lines
            .lock()
            .expect("lines")
            .push((token.clone(), token_line(role, &token, name)));
        self.save()?;
        Ok(token)
    }

    /// Removes `token`'s line from the file.
    pub fn remove(&self, token: &str) -> anyhow::Result<()> {
        self.lines
            .lock()
            .expect("lines")
            .retain(|(t, _)| t != token);
        self.save()
    }

    /// Writes the file whole through a rename, so a server never reads half of it.
    fn save(&self) -> anyhow::Result<()> {
        let text: String = self
            .lines
            .lock()
            .expect("lines")
            .iter()
            .map(|(_, line)| format!("{line}\n"))
            .collect();
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.file)?;
        Ok(())
    }

    /// An authenticator over the file that re-reads it every `every`; the watch stops when the
    /// returned guard is dropped.
    pub async fn authenticator(
        &self,
        every: Duration,
    ) -> anyhow::Result<(Authenticator, DropGuard)> {
        let auth = Authenticator::load(&self.file).await?;
        let stop = CancellationToken::new();
        auth.watch(self.file.clone(), every, stop.clone());
        Ok((auth, stop.drop_guard()))
    }
}
