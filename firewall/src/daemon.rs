//! `firewall run`: the pipeline parse -> compile -> apply, then attach and serve signals.
use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use aya_log::EbpfLogger;
use futures_util::StreamExt as _;
use inotify::{EventStream, Inotify, WatchDescriptor, WatchMask};
use log::{error, info, warn};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Sleep;

use crate::compile::{compile, Compiled};
use crate::config::load_rules;
use crate::kernel::{AttachMode, Kernel};
use crate::notify;
use crate::pins::Pins;

pub struct RunOptions {
    pub rules: PathBuf,
    pub ifaces: Vec<String>,
    pub mode: AttachMode,
    /// Unix socket that `firewall reload` talks to.
    pub control: PathBuf,
    /// Accept rule and set files that others than root could change.
    pub insecure_files: bool,
    /// bpffs directory for maps and links (see `pins`).
    pub pin_dir: PathBuf,
    /// On SIGTERM/SIGINT leave the programs attached with the rules in force.
    pub persist: bool,
    /// Audit mode whatever the rule file says.
    pub audit: bool,
}

/// Default path of the control socket.
pub const DEFAULT_CONTROL: &str = "/run/firewall.sock";

/// Wait after a file change before reloading, so that a burst of writes reloads once.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// A compiled rule file and the files it was read from.
pub struct Prepared {
    pub compiled: Compiled,
    pub files: Vec<PathBuf>,
}

/// Reads and compiles a rule file; nothing touches the kernel.
pub fn prepare(path: &Path, insecure_files: bool, audit: bool) -> Result<Prepared> {
    let mut set = load_rules(path)?;
    set.audit |= audit;
    let mut files = vec![path.to_path_buf()];
    files.extend(set.set_files.iter().cloned());
    if !insecure_files {
        for file in &files {
            check_permissions(file)?;
        }
    }
    for warning in crate::lint::warnings(&set) {
        warn!("{}: {warning}", path.display());
    }
    let compiled = compile(&set).with_context(|| format!("{}", path.display()))?;
    info!(
        "{}: {} rules, default {:?}{}",
        path.display(),
        set.rules.len(),
        set.default_policy,
        if set.audit {
            "; AUDIT MODE: packets the rules deny are logged and counted, not dropped"
        } else {
            ""
        }
    );
    Ok(Prepared { compiled, files })
}

/// Refuses a file that someone other than root could change: whoever can edit the rules
/// decides what the firewall lets through.
pub fn check_permissions(path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    if meta.uid() != 0 {
        bail!(
            "{}: owned by uid {}, not root; whoever can edit it controls the firewall \
             (chown root, or run with --insecure-files)",
            path.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o022 != 0 {
        bail!(
            "{}: writable by group or others (mode {:o}); whoever can edit it controls the \
             firewall (chmod go-w, or run with --insecure-files)",
            path.display(),
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

pub async fn run(options: RunOptions) -> Result<()> {
    // A broken file is reported before anything is loaded or attached.
    let prepared = prepare(&options.rules, options.insecure_files, options.audit)?;
    let pins = Pins::open(&options.pin_dir)?;
    let (mut kernel, reused) = Kernel::load_pinned(pins.clone())?;
    if reused {
        info!(
            "reusing the maps pinned in {}: the rules in force stay until the new ones are applied",
            options.pin_dir.display()
        );
    }
    kernel.apply(&prepared.compiled)?;
    let mut watcher = FileWatcher::new(&prepared.files)?;
    let control = ControlSocket::bind(&options.control)?;
    let mut logger = match EbpfLogger::init(kernel.ebpf_mut()) {
        // SAFETY: the logger owns its ring buffer fd for as long as it lives, and the AsyncFd
        // owns the logger.
        Ok(logger) => Some(unsafe { AsyncFd::register(logger) }.map_err(|e| e.into_parts().1)?),
        Err(error) => {
            warn!("kernel drop log unavailable: {error}");
            None
        }
    };
    // Connections that exist already keep working under default deny.
    let existing = crate::sockets::open_flows();
    kernel.add_flows(&existing)?;
    info!("tracking {} existing connections", existing.len());
    for iface in &options.ifaces {
        let how = kernel.attach(iface, options.mode)?;
        info!("attached to {iface} ({how})");
    }
    // Maps of other builds: the links run our program now.
    pins.remove_maps_except(Some(&pins.maps_dir(crate::kernel::object_id())))?;
    info!(
        "filtering; SIGHUP, `firewall reload --control {}` or editing {} reloads",
        options.control.display(),
        options.rules.display()
    );
    // The rules are in force on every interface.
    notify::notify(&format!(
        "READY=1\nSTATUS=filtering {}",
        options.ifaces.join(", ")
    ));

    let mut hangup = signal(SignalKind::hangup())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut debounce: Option<Pin<Box<Sleep>>> = None;
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                let _ = reload(&mut kernel, &options, &mut watcher);
            }
            changed = watcher.changed() => {
                changed?;
                debounce = Some(Box::pin(tokio::time::sleep(DEBOUNCE)));
            }
            () = async { debounce.as_mut().expect("guarded").await }, if debounce.is_some() => {
                debounce = None;
                info!("rule files changed");
                let _ = reload(&mut kernel, &options, &mut watcher);
            }
            request = control.accept() => {
                if let Err(error) = serve(request, &mut kernel, &options, &mut watcher).await {
                    warn!("control request failed: {error:#}");
                }
            }
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            guard = readable(&mut logger) => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        }
    }
    notify::notify("STOPPING=1");
    if options.persist {
        info!(
            "exiting; still filtering {} with the rules in force (--persist; `firewall detach` removes it)",
            options.ifaces.join(", ")
        );
        drop(kernel);
        return Ok(());
    }
    info!("detaching from {}", options.ifaces.join(", "));
    for iface in &options.ifaces {
        pins.remove_links(Some(iface))?;
    }
    drop(kernel);
    pins.remove_if_unused()?;
    Ok(())
}

/// Re-reads the rule file and swaps it in; on any error the rules in force stay. Returns the
/// line that was logged.
fn reload(
    kernel: &mut Kernel,
    options: &RunOptions,
    watcher: &mut FileWatcher,
) -> Result<String, String> {
    let path = &options.rules;
    let started = Instant::now();
    notify::reloading();
    let result = prepare(path, options.insecure_files, options.audit).and_then(|prepared| {
        let compiled = &prepared.compiled;
        let entries = compiled.src_v4.len()
            + compiled.src_v6.len()
            + compiled.dst_v4.len()
            + compiled.dst_v6.len();
        let updates = kernel.apply(compiled)?;
        // Set files may have come or gone.
        *watcher = FileWatcher::new(&prepared.files)?;
        Ok((updates, entries))
    });
    match result {
        Ok((updates, entries)) => {
            let message = format!(
                "reloaded {} in {:.1?}: {entries} address entries, {updates} map entries changed",
                path.display(),
                started.elapsed()
            );
            info!("{message}");
            notify::notify(&format!("READY=1\nSTATUS={message}"));
            Ok(message)
        }
        Err(error) => {
            let message = format!("reload failed, previous rules stay in force: {error:#}");
            error!("{message}");
            notify::notify(&format!("READY=1\nSTATUS={message}"));
            Err(message)
        }
    }
}

/// Watches the rule file and its set files through their directories (editors replace files
/// by renaming a new one over them).
struct FileWatcher {
    events: EventStream<Vec<u8>>,
    /// Per watched directory, the file names that matter.
    names: HashMap<WatchDescriptor, HashSet<OsString>>,
}

impl FileWatcher {
    fn new(files: &[PathBuf]) -> Result<FileWatcher> {
        let inotify = Inotify::init().context("inotify")?;
        let mut names: HashMap<WatchDescriptor, HashSet<OsString>> = HashMap::new();
        for file in files {
            let dir = match file.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir,
                _ => Path::new("."),
            };
            let Some(name) = file.file_name() else {
                continue;
            };
            let mask = WatchMask::CLOSE_WRITE
                | WatchMask::MOVED_TO
                | WatchMask::CREATE
                | WatchMask::DELETE;
            let wd = inotify
                .watches()
                .add(dir, mask)
                .with_context(|| format!("watching {}", dir.display()))?;
            names.entry(wd).or_default().insert(name.to_os_string());
        }
        let events = inotify.into_event_stream(vec![0u8; 4096])?;
        Ok(FileWatcher { events, names })
    }

    /// Waits for a change to one of the files.
    async fn changed(&mut self) -> Result<()> {
        loop {
            let event = self.events.next().await.context("inotify stream ended")??;
            let relevant = match (&event.name, self.names.get(&event.wd)) {
                (Some(name), Some(names)) => names.contains(name),
                _ => false,
            };
            if relevant {
                return Ok(());
            }
        }
    }
}

/// The daemon's end of `firewall reload`: a Unix socket, root only.
struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    fn bind(path: &Path) -> Result<ControlSocket> {
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

    async fn accept(&self) -> std::io::Result<UnixStream> {
        self.listener.accept().await.map(|(stream, _)| stream)
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One control request: `reload` -> `ok: ...` or `error: ...`.
async fn serve(
    request: std::io::Result<UnixStream>,
    kernel: &mut Kernel,
    options: &RunOptions,
    watcher: &mut FileWatcher,
) -> Result<()> {
    let stream = request?;
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut read = BufReader::new(read);
    tokio::time::timeout(Duration::from_secs(5), read.read_line(&mut line)).await??;
    let reply = match line.trim() {
        "reload" => match reload(kernel, options, watcher) {
            Ok(message) => format!("ok: {message}\n"),
            Err(message) => format!("error: {message}\n"),
        },
        other => format!("error: unknown request {other:?}\n"),
    };
    write.write_all(reply.as_bytes()).await?;
    Ok(())
}

/// `firewall reload`: asks the running daemon to reload and returns its answer.
pub fn request_reload(control: &Path) -> Result<String> {
    use std::io::{BufRead as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(control).with_context(|| {
        format!(
            "no firewall daemon answers on {} (is it running?)",
            control.display()
        )
    })?;
    stream.write_all(b"reload\n")?;
    let mut reply = String::new();
    std::io::BufReader::new(stream).read_line(&mut reply)?;
    match reply.trim_end().strip_prefix("ok: ") {
        Some(message) => Ok(message.to_string()),
        None => anyhow::bail!("{}", reply.trim_end().trim_start_matches("error: ")),
    }
}

type KernelLog = EbpfLogger<&'static dyn log::Log>;

/// Waits until the kernel drop log has lines; never, when there is no log.
async fn readable(
    logger: &mut Option<AsyncFd<KernelLog>>,
) -> std::io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'_, KernelLog>> {
    match logger {
        Some(fd) => fd.readable_mut().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_files_others_can_write_are_refused() {
        let path = std::env::temp_dir().join(format!("fw-perm-{}.toml", std::process::id()));
        std::fs::write(&path, "").unwrap();
        let chmod = |mode| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode));
        chmod(0o644).unwrap();
        let owner_is_root = unsafe { libc::geteuid() } == 0;
        assert_eq!(check_permissions(&path).is_ok(), owner_is_root);
        for mode in [0o664, 0o646, 0o666] {
            chmod(mode).unwrap();
            let error = check_permissions(&path).unwrap_err().to_string();
            assert!(
                error.contains("not root") || error.contains("writable by group or others"),
                "{error}"
            );
        }
        chmod(0o600).unwrap();
        assert_eq!(check_permissions(&path).is_ok(), owner_is_root);
        std::fs::remove_file(&path).unwrap();
    }
}
