//! The daemon's end of the control socket: accepting connections and answering each one's
//! [`control::Request`] (the protocol itself is [`super::control`]).
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use log::warn;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::bans;
use super::control::{self, Request};
use super::reload::State;

/// The daemon's end of `firewall reload`: a Unix socket, root only.
pub(super) struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    pub(super) fn bind(path: &Path) -> Result<ControlSocket> {
        if let Some(dir) = path.parent().filter(|dir| !dir.exists()) {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .recursive(true)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        // A socket left by a daemon that died: nobody listens on it any more.
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)
            .with_context(|| format!("binding the control socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(ControlSocket {
            listener,
            path: path.to_path_buf(),
        })
    }

    pub(super) async fn accept(&self) -> std::io::Result<UnixStream> {
        self.listener.accept().await.map(|(stream, _)| stream)
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Answers one accepted connection; a connection that fails is logged, the daemon goes on.
pub(super) async fn answer(request: std::io::Result<UnixStream>, state: &mut State) {
    if let Err(error) = serve(request, state).await {
        warn!("control request failed: {error:#}");
    }
}

/// One control request (see [`crate::daemon::control`]): its answer ends the connection.
async fn serve(request: std::io::Result<UnixStream>, state: &mut State) -> Result<()> {
    use tokio::io::AsyncReadExt as _;
    let stream = request?;
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut read = BufReader::new(read.take(control::MAX_REQUEST_BYTES));
    tokio::time::timeout(Duration::from_secs(5), read.read_line(&mut line)).await??;
    let outcome = match control::decode_request(line.trim_end()) {
        Ok(request) => handle(request, state),
        Err(message) => Err(message),
    };
    write
        .write_all(control::encode_response(&outcome).as_bytes())
        .await?;
    Ok(())
}

/// What the daemon does for `request`, as the message to answer with.
fn handle(request: Request, state: &mut State) -> Result<String, String> {
    let outcome = match request {
        Request::Reload => state.reload(),
        Request::Apply {
            name,
            text,
            set_files,
            confirm_seconds,
        } => state.apply_request(
            &name,
            text,
            &set_files,
            confirm_seconds.map(Duration::from_secs),
        ),
        Request::Confirm => state.confirm(),
        Request::Explain { question } => {
            return crate::analysis::explain::explain(&state.in_force, &question)
                .map_err(|error| format!("{error:#}"));
        }
        Request::Ban {
            targets,
            timeout_seconds,
            set,
        } => {
            let timeout = timeout_seconds.map(Duration::from_secs);
            let done = match set {
                Some(set) => bans::add_to_set(state, &set, &targets, timeout),
                None => bans::ban(&mut state.kernel, &targets, timeout),
            };
            return done.map_err(|error| format!("{error:#}"));
        }
        Request::Unban { targets, set } => {
            let done = match set {
                Some(set) => bans::remove_from_set(state, &set, &targets),
                None => bans::unban(&mut state.kernel, &targets),
            };
            return done.map_err(|error| format!("{error:#}"));
        }
        Request::Status => {
            return serde_json::to_string(&state.status()).map_err(|error| error.to_string());
        }
        Request::Bans { json, set } => {
            let listed = match set {
                Some(set) => bans::list_set(state, &set, json),
                None => bans::list(&state.kernel, json),
            };
            return listed.map_err(|error| format!("{error:#}"));
        }
    };
    outcome
        .map(|done| done.to_string())
        .map_err(|error| error.to_string())
}
