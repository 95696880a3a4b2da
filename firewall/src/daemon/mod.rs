//! `firewall run`: the pipeline parse -> compile -> apply, then attach and serve signals.

pub mod control;
use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use futures_util::StreamExt as _;
use inotify::{EventStream, Inotify, WatchDescriptor, WatchMask};
use log::{error, info, warn};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Sleep;

use crate::dataplane::packet_log::{KernelLog, RuleNames};
use crate::dataplane::pins::LinkKind;
use crate::dataplane::pins::Pins;
use crate::dataplane::{AttachMode, Kernel};
use crate::host::ifaces::{self, Held, IfaceSpec, LinkEvents};
use crate::host::notify;
use crate::report::metrics::{Reloads, SharedReloads};
use crate::rules::compile::{compile, Compiled};
use crate::rules::config::{load_rules_trusting, parse_rules_with};
use crate::rules::files::Trust;
use crate::rules::model::RuleSet;
use control::Request;

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
    /// Serve Prometheus metrics here.
    pub metrics: Option<std::net::SocketAddr>,
}

/// Default path of the control socket.
pub const DEFAULT_CONTROL: &str = control::DEFAULT_SOCKET;

/// Wait after a file change before reloading, so that a burst of writes reloads once.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// A compiled rule file, its text as read and the files it was read from.
pub struct Prepared {
    pub set: RuleSet,
    pub compiled: Compiled,
    pub text: String,
    pub files: Vec<PathBuf>,
}

/// Who may have written the rule files `run` reads.
fn trust(insecure_files: bool) -> Trust {
    if insecure_files {
        Trust::Anyone
    } else {
        Trust::RootOnly
    }
}

/// Reads and compiles a rule file; nothing touches the kernel.
pub fn prepare(path: &Path, insecure_files: bool, audit: bool) -> Result<Prepared> {
    let (set, text) = load_rules_trusting(path, trust(insecure_files))?;
    finish_preparing(path, set, text, audit)
}

/// [`prepare`] for a rule file's text that arrived over the control socket, to become the
/// rule file at `path`: its set files are read from there.
fn prepare_text(
    name: &str,
    text: String,
    path: &Path,
    insecure_files: bool,
    audit: bool,
) -> Result<Prepared> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let set = parse_rules_with(name, &text, dir, trust(insecure_files))?;
    finish_preparing(Path::new(name), set, text, audit)
}

fn finish_preparing(path: &Path, mut set: RuleSet, text: String, audit: bool) -> Result<Prepared> {
    set.audit |= audit;
    let mut files = vec![path.to_path_buf()];
    files.extend(set.set_files.iter().cloned());
    for warning in crate::rules::lint::warnings(&set) {
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
    Ok(Prepared {
        set,
        compiled,
        text,
        files,
    })
}

pub async fn run(options: RunOptions) -> Result<()> {
    // A broken file is reported before anything is loaded or attached.
    let prepared = prepare(&options.rules, options.insecure_files, options.audit)?;
    let pins = Pins::open(&options.pin_dir)?;
    let _lock = pins.lock()?;
    let specs: Vec<IfaceSpec> = options.ifaces.iter().map(|s| IfaceSpec::parse(s)).collect();
    // An interface named and present whose link type the programs cannot parse stops the
    // start before anything is attached anywhere.
    for spec in &specs {
        if let IfaceSpec::Name(name) = spec {
            if ifaces::ifindex(name).is_some() {
                crate::host::link::link_layer(name)?;
            }
        }
    }
    adopt_stored_links(&pins);
    for pin in pins.remove_dead_links()? {
        info!("removed the pinned link {pin}: its interface is gone or was created anew");
    }
    let (mut kernel, reused) = Kernel::load_pinned(pins.clone())?;
    if reused {
        info!(
            "reusing the maps pinned in {}: the rules in force stay until the new ones are applied",
            options.pin_dir.display()
        );
    }
    let started = Instant::now();
    kernel.apply(&prepared.compiled)?;
    let reloads = SharedReloads::new(std::sync::Mutex::new(Reloads {
        last_seconds: started.elapsed().as_secs_f64(),
        last_succeeded: true,
        rules: prepared.compiled.actions.len() as i64,
        address_entries: address_entries(&prepared.compiled) as i64,
        ..Reloads::default()
    }));
    if let Some(addr) = options.metrics {
        crate::report::metrics::serve(addr, pins.clone(), reloads.clone())?;
        info!("metrics on http://{addr}/metrics");
    }
    let watcher = FileWatcher::new(&prepared.files)?;
    let control = ControlSocket::bind(&options.control)?;
    let rule_names = RuleNames::default();
    rule_names.set(&prepared.set);
    let mut logger = match KernelLog::open(&mut kernel, rule_names.clone()) {
        // SAFETY: the log owns its ring buffer fd for as long as it lives, and the AsyncFd
        // owns the log.
        Ok(log) => Some(unsafe { AsyncFd::register(log) }.map_err(|e| e.into_parts().1)?),
        Err(error) => {
            warn!("kernel packet log unavailable: {error:#}");
            None
        }
    };
    // Connections that exist already keep working under default deny.
    let existing = crate::host::sockets::open_flows();
    kernel.add_flows(&existing)?;
    info!("tracking {} existing connections", existing.len());
    // Listening before looking: no interface can appear unseen in between.
    let mut link_events = LinkEvents::open().context("listening for link events")?;
    let mut held = Held::new(specs);
    let changes = held.reconcile(
        &ifaces::present()?,
        &mut Dataplane {
            kernel: &mut kernel,
            pins: &pins,
            mode: options.mode,
        },
    );
    if !changes.refused.is_empty() {
        let refused: Vec<String> = changes
            .refused
            .iter()
            .map(|(_, error)| error.clone())
            .collect();
        bail!("{}", refused.join("; "));
    }
    for name in held.missing() {
        warn!("{name} is not there (yet): it is filtered as soon as it appears");
    }
    // Maps of other builds: the links run our program now.
    pins.remove_builds_except(Some(&pins.build_dir(crate::dataplane::object_id())))?;
    info!(
        "filtering; SIGHUP, `firewall reload --control {}` or editing {} reloads",
        options.control.display(),
        options.rules.display()
    );
    // The rules are in force on every interface.
    notify::notify(&format!("READY=1\nSTATUS={}", filtering_status(&held)));

    let mut hangup = signal(SignalKind::hangup())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut debounce: Option<Pin<Box<Sleep>>> = None;
    let mut state = State {
        kernel,
        pins: pins.clone(),
        held,
        options,
        watcher,
        in_force: prepared.set,
        trial: None,
        reloads,
        rule_names,
    };
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                let _ = state.reload();
            }
            changed = state.watcher.changed() => {
                changed?;
                debounce = Some(Box::pin(tokio::time::sleep(DEBOUNCE)));
            }
            () = async { debounce.as_mut().expect("guarded").await }, if debounce.is_some() => {
                debounce = None;
                info!("rule files changed");
                let _ = state.reload();
            }
            () = async { state.trial.as_mut().expect("guarded").deadline.as_mut().await },
                if state.trial.is_some() => {
                state.roll_back();
            }
            request = control.accept() => {
                if let Err(error) = serve(request, &mut state).await {
                    warn!("control request failed: {error:#}");
                }
            }
            changed = link_events.changed() => {
                changed.context("reading link events")?;
                state.follow_links();
            }
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            guard = readable(&mut logger) => {
                let mut guard = guard?;
                // Readiness first: a line written after the drain wakes us again.
                guard.clear_ready();
                guard.get_inner_mut().drain();
            }
        }
    }
    let State {
        kernel,
        options,
        held,
        ..
    } = state;
    let names = held.names();
    notify::notify("STOPPING=1");
    if options.persist {
        info!(
            "exiting; still filtering {} with the rules in force (--persist; `firewall detach` removes it)",
            names.join(", ")
        );
        drop(kernel);
        return Ok(());
    }
    // Under systemd the store keeps the links over a restart (the next daemon takes them
    // over) and closes them on stop; without it, unpinning detaches.
    info!("detaching from {}", names.join(", "));
    for iface in &names {
        pins.remove_links(Some(iface))?;
    }
    drop(kernel);
    pins.remove_if_unused()?;
    Ok(())
}

/// Links left in systemd's file descriptor store by the daemon before this one (stopped by
/// `systemctl restart`, or crashed): pinned again, so that they are taken over like pins.
fn adopt_stored_links(pins: &Pins) {
    use std::os::fd::AsFd as _;
    for (name, fd) in notify::received() {
        let is_link = name.starts_with("xdp-") || name.starts_with("tc-");
        let path = pins.dir().join(&name);
        if !is_link || name.contains('/') || path.exists() {
            continue;
        }
        match crate::dataplane::pins::pin_fd(fd.as_fd(), &path) {
            Ok(()) => info!("took over the link {name} from systemd's file descriptor store"),
            Err(error) => warn!("pinning the stored link {name}: {error}"),
        }
    }
}

/// The interfaces filtered and those waited for, for systemd's status line.
fn filtering_status(held: &Held) -> String {
    let mut status = format!("filtering {}", held.names().join(", "));
    let missing = held.missing();
    if !missing.is_empty() {
        status += &format!("; waiting for {}", missing.join(", "));
    }
    status
}

/// The kernel side of holding interfaces (see [`ifaces::Held`]): attaches and pins, and
/// hands the links to systemd's file descriptor store.
struct Dataplane<'a> {
    kernel: &'a mut Kernel,
    pins: &'a Pins,
    mode: AttachMode,
}

impl Dataplane<'_> {
    fn store_links(&self, iface: &str) {
        use std::os::fd::AsFd as _;
        for kind in [LinkKind::Xdp, LinkKind::Tc] {
            let path = self.pins.link_path(kind, iface);
            if let Ok(fd) = crate::dataplane::pins::open_pinned(&path) {
                notify::store(&crate::dataplane::pins::file_name(&path), fd.as_fd());
            }
        }
    }

    fn unstore_links(&self, iface: &str) {
        for kind in [LinkKind::Xdp, LinkKind::Tc] {
            notify::unstore(&crate::dataplane::pins::file_name(
                &self.pins.link_path(kind, iface),
            ));
        }
    }
}

impl ifaces::Attacher for Dataplane<'_> {
    fn attach(&mut self, iface: &str) -> Result<String> {
        let how = self.kernel.attach(iface, self.mode)?;
        self.store_links(iface);
        Ok(how)
    }

    fn release(&mut self, iface: &str) -> Result<()> {
        self.unstore_links(iface);
        self.pins.remove_links(Some(iface))?;
        Ok(())
    }

    fn renamed(&mut self, iface: &str, to: &str) -> Result<()> {
        self.unstore_links(iface);
        self.pins.rename_links(iface, to)?;
        self.store_links(to);
        Ok(())
    }
}

/// Entries of the four address tables.
fn address_entries(compiled: &Compiled) -> usize {
    compiled.src_v4.len() + compiled.src_v6.len() + compiled.dst_v4.len() + compiled.dst_v6.len()
}

/// What the daemon holds between events.
struct State {
    kernel: Kernel,
    pins: Pins,
    /// The interfaces filtered.
    held: Held,
    options: RunOptions,
    watcher: FileWatcher,
    /// The rules in force (for `explain` and roll-backs; the kernel keeps what it compiled).
    in_force: RuleSet,
    /// A file applied with `firewall apply --confirm`, awaiting confirmation.
    trial: Option<Trial>,
    /// For the metrics.
    reloads: SharedReloads,
    /// For the kernel log.
    rule_names: RuleNames,
}

/// What putting a file in force did.
struct Applied {
    /// The rule file and its set files, to watch.
    files: Vec<PathBuf>,
    /// Address map entries of the new rules.
    entries: usize,
    /// Map entries written.
    updates: usize,
}

/// Rules on trial: in force until confirmed, else rolled back at the deadline.
struct Trial {
    /// Where the caller read it.
    file: String,
    /// Its text as validated and put in force: what `confirm` writes to the rule file.
    text: String,
    deadline: Pin<Box<Sleep>>,
    /// The rules in force before.
    previous: RuleSet,
}

impl State {
    /// Link events: holds the interfaces as they are now. Rules that name interfaces are
    /// written again, as an interface created anew has another index.
    fn follow_links(&mut self) {
        let present = match ifaces::present() {
            Ok(present) => present,
            Err(error) => {
                error!("listing interfaces: {error}");
                return;
            }
        };
        let changes = self.held.reconcile(
            &present,
            &mut Dataplane {
                kernel: &mut self.kernel,
                pins: &self.pins,
                mode: self.options.mode,
            },
        );
        if !changes.any() {
            return;
        }
        if self.in_force.rules.iter().any(|rule| rule.iface.is_some()) {
            let applied = compile(&self.in_force).and_then(|compiled| self.kernel.apply(&compiled));
            if let Err(error) = applied {
                error!("writing the interface rules again: {error:#}");
            }
        }
        notify::notify(&format!("STATUS={}", filtering_status(&self.held)));
    }

    /// Re-reads the rule file and swaps it in; on any error the rules in force stay. Returns
    /// the line that was logged.
    fn reload(&mut self) -> Result<String, String> {
        if let Some(trial) = &self.trial {
            let message = format!(
                "reload refused: {} is on trial until `firewall confirm` or its roll-back",
                trial.file
            );
            warn!("{message}");
            return Err(message);
        }
        let path = self.options.rules.clone();
        let started = Instant::now();
        notify::reloading();
        let result = self.apply_file(&path).and_then(|applied| {
            // Set files may have come or gone.
            self.watcher = FileWatcher::new(&applied.files)?;
            Ok(applied)
        });
        if let Ok(mut reloads) = self.reloads.lock() {
            reloads.last_seconds = started.elapsed().as_secs_f64();
            reloads.last_succeeded = result.is_ok();
            match &result {
                Ok(applied) => {
                    reloads.succeeded += 1;
                    reloads.rules = self.in_force.rules.len() as i64;
                    reloads.address_entries = applied.entries as i64;
                }
                Err(_) => reloads.failed += 1,
            }
        }
        let outcome = match result {
            Ok(Applied {
                entries, updates, ..
            }) => {
                let message = format!(
                    "reloaded {} in {:.1?}: {entries} address entries, {updates} map entries changed",
                    path.display(),
                    started.elapsed()
                );
                info!("{message}");
                Ok(message)
            }
            Err(error) => {
                let message = format!("reload failed, previous rules stay in force: {error:#}");
                error!("{message}");
                Err(message)
            }
        };
        let status = match &outcome {
            Ok(message) | Err(message) => message,
        };
        notify::notify(&format!("READY=1\nSTATUS={status}"));
        outcome
    }

    /// Prepares `path` and puts it in force.
    fn apply_file(&mut self, path: &Path) -> Result<Applied> {
        let prepared = prepare(path, self.options.insecure_files, self.options.audit)?;
        self.put_in_force(prepared)
    }

    fn put_in_force(&mut self, prepared: Prepared) -> Result<Applied> {
        let updates = self.kernel.apply(&prepared.compiled)?;
        self.rule_names.set(&prepared.set);
        self.in_force = prepared.set;
        Ok(Applied {
            files: prepared.files,
            entries: address_entries(&prepared.compiled),
            updates,
        })
    }

    /// `firewall apply FILE [--confirm SECS]`: the file's text in force now; with a
    /// confirmation time, on trial (see [`Trial`]); without, it replaces the rule file at once.
    fn apply_request(
        &mut self,
        name: &str,
        text: String,
        set_files: &[PathBuf],
        confirm: Option<Duration>,
    ) -> Result<String> {
        if let Some(trial) = &self.trial {
            bail!(
                "{} is on trial already: `firewall confirm` it or wait for its roll-back",
                trial.file
            );
        }
        let prepared = prepare_text(
            name,
            text,
            &self.options.rules,
            self.options.insecure_files,
            self.options.audit,
        )?;
        self.check_movable(name, set_files, &prepared.set.set_files)?;
        let previous = self.in_force.clone();
        let text = prepared.text.clone();
        self.put_in_force(prepared)?;
        let message = match confirm {
            None => {
                self.adopt(&text)?;
                format!(
                    "{name} in force and copied to {}",
                    self.options.rules.display()
                )
            }
            Some(wait) => {
                self.trial = Some(Trial {
                    file: name.to_string(),
                    text,
                    deadline: Box::pin(tokio::time::sleep(wait)),
                    previous,
                });
                format!(
                    "{name} in force; rolls back in {}s unless `firewall confirm` arrives",
                    wait.as_secs()
                )
            }
        };
        info!("{message}");
        Ok(message)
    }

    /// A file applied by request becomes the rule file, so that it stays in force across
    /// reloads and restarts: its set files as read from its own directory (`theirs`) must
    /// resolve the same from the rule file's (`ours`).
    fn check_movable(&self, name: &str, theirs: &[PathBuf], ours: &[PathBuf]) -> Result<()> {
        if theirs != ours {
            bail!(
                "{name} names set files relative to its own directory; put it in {} or use \
                 absolute paths, as it will replace {}",
                self.options
                    .rules
                    .parent()
                    .unwrap_or(Path::new("."))
                    .display(),
                self.options.rules.display()
            );
        }
        Ok(())
    }

    /// Replaces the rule file with `text` (atomically: see [`crate::rules::files::replace`]).
    fn adopt(&mut self, text: &str) -> Result<()> {
        let target = &self.options.rules;
        crate::rules::files::replace(target, text)
            .with_context(|| format!("replacing {}", target.display()))
    }

    /// `firewall confirm`: the rules on trial stay, and become the rule file.
    fn confirm(&mut self) -> Result<String> {
        let Some(trial) = self.trial.take() else {
            bail!("no rules are on trial");
        };
        self.adopt(&trial.text)?;
        let message = format!(
            "confirmed {}: copied to {}",
            trial.file,
            self.options.rules.display()
        );
        info!("{message}");
        Ok(message)
    }

    /// The deadline passed without a confirmation: the rules from before come back.
    fn roll_back(&mut self) {
        let trial = self.trial.take().expect("a trial to roll back");
        let applied = compile(&trial.previous).and_then(|compiled| self.kernel.apply(&compiled));
        match applied {
            Ok(_) => {
                self.rule_names.set(&trial.previous);
                self.in_force = trial.previous;
                warn!(
                    "{} was not confirmed in time: rolled back to the rules from before",
                    trial.file
                );
            }
            Err(error) => error!(
                "rolling back {} failed, it stays in force: {error:#}",
                trial.file
            ),
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

    async fn accept(&self) -> std::io::Result<UnixStream> {
        self.listener.accept().await.map(|(stream, _)| stream)
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
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

fn handle(request: Request, state: &mut State) -> Result<String, String> {
    let message = |error: anyhow::Error| format!("{error:#}");
    match request {
        Request::Reload => state.reload(),
        Request::Apply {
            name,
            text,
            set_files,
            confirm_seconds,
        } => state
            .apply_request(
                &name,
                text,
                &set_files,
                confirm_seconds.map(Duration::from_secs),
            )
            .map_err(message),
        Request::Confirm => state.confirm().map_err(message),
        Request::Explain { question } => {
            crate::analysis::explain::explain(&state.in_force, &question).map_err(message)
        }
    }
}

/// Waits until the kernel packet log has lines; never, when there is no log.
async fn readable(
    logger: &mut Option<AsyncFd<KernelLog>>,
) -> std::io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'_, KernelLog>> {
    match logger {
        Some(fd) => fd.readable_mut().await,
        None => std::future::pending().await,
    }
}
