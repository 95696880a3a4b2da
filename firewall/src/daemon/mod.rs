//! `firewall run`: the pipeline parse -> compile -> apply -> attach, then the event loop that
//! hands each event (signal, file change, control request, link change, kernel log line, the
//! flow table check's tick) to its handler in `reload`, `control_server` or `interfaces`.

pub mod bans;
pub mod control;
mod control_server;
pub mod dynamic;
mod heap;
mod interfaces;
mod reload;
mod status;
mod watch;

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use log::{info, warn};
use tokio::io::unix::{AsyncFd, AsyncFdReadyMutGuard};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::time::Sleep;

use crate::dataplane::packet_log::{KernelLog, RuleNames};
use crate::dataplane::pins::Pins;
use crate::dataplane::{AttachMode, Kernel};
use crate::host::ifaces::{Held, IfaceSpec, LinkEvents};
use crate::host::notify;
use crate::report::flows::FillAlarm;
use crate::report::metrics::{Reloads, SharedReloads};
use crate::rules::compile::{compile, Compiled};
use crate::rules::config::{load_rules_trusting, parse_rules_with};
use crate::rules::files::Trust;
use crate::rules::model::RuleSet;
use control_server::ControlSocket;
use dynamic::Members;
use interfaces::Dataplane;
use reload::{address_entries, State, Trial};
use watch::FileWatcher;

/// `firewall run`'s options, as the command line gives them.
#[derive(clap::Args)]
pub struct RunOptions {
    /// Rule file (TOML).
    #[arg(long, default_value = DEFAULT_RULES)]
    pub rules: PathBuf,
    /// Interface to filter: a name (waited for if absent), a pattern (`en*`, `wg?`) or
    /// `all` (every interface but lo, also those that appear later); repeat for several.
    #[arg(long = "iface", required = true)]
    pub ifaces: Vec<String>,
    /// XDP attach mode: auto tries native, then skb (generic).
    #[arg(
        long = "xdp-mode",
        value_name = "XDP_MODE",
        value_enum,
        default_value = "auto"
    )]
    pub mode: AttachMode,
    /// Control socket for `firewall reload`.
    #[arg(long, default_value = DEFAULT_CONTROL)]
    pub control: PathBuf,
    /// Accept rule and set files not owned by root or writable by group or others.
    #[arg(long)]
    pub insecure_files: bool,
    /// bpffs directory where programs' links and maps are pinned (bpffs is mounted on its
    /// parent if needed).
    #[arg(long, default_value = crate::dataplane::pins::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// On SIGTERM/SIGINT, leave the programs filtering with the rules in force (for
    /// restarts and upgrades without a gap); `firewall detach` removes them.
    #[arg(long)]
    pub persist: bool,
    /// Audit mode: classify, count and log as usual, drop nothing (overrides the rule
    /// file's `[defaults] mode`).
    #[arg(long)]
    pub audit: bool,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9469); off by default.
    #[arg(long)]
    pub metrics: Option<std::net::SocketAddr>,
    /// Where the members of dynamic sets are kept (`dynamic-sets.json`), created when a
    /// dynamic set first gets a member.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

/// Default of `run --state-dir` (systemd's `StateDirectory=firewall`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/firewall";

/// Default path of the rule file, for `run`, `check`, `explain` and `exposure`.
pub const DEFAULT_RULES: &str = "/etc/firewall/rules.toml";

/// Default path of the control socket.
pub const DEFAULT_CONTROL: &str = control::DEFAULT_SOCKET;

/// Wait after a file change before reloading, so that a burst of writes reloads once.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// How often the daemon counts the flow table to warn when live flows near its capacity.
/// One count of a full table (262,144 flows, batched reads) took 100-200 ms of one core on a
/// busy 2-core machine (reading entry by entry: 2 s), on the event loop: every 30 s that is
/// under 1 % of a core, and a reload waits at most that long behind it.
const FLOW_CHECK_PERIOD: Duration = Duration::from_secs(30);

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
pub fn prepare(
    path: &Path,
    insecure_files: bool,
    audit: bool,
    members: &Members,
) -> Result<Prepared> {
    let (set, text) = load_rules_trusting(path, trust(insecure_files))?;
    finish_preparing(path, set, text, audit, members)
}

/// [`prepare`] for a rule file's text that arrived over the control socket, to become the
/// rule file at `path`: its set files are read from there.
fn prepare_text(
    name: &str,
    text: String,
    path: &Path,
    insecure_files: bool,
    audit: bool,
    members: &Members,
) -> Result<Prepared> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let set = parse_rules_with(name, &text, dir, trust(insecure_files))?;
    finish_preparing(Path::new(name), set, text, audit, members)
}

/// Audit from the command line, the dynamic sets' members, warnings, compile.
fn finish_preparing(
    path: &Path,
    mut set: RuleSet,
    text: String,
    audit: bool,
    members: &Members,
) -> Result<Prepared> {
    set.audit |= audit;
    set.fill_dynamic(|name| members.nets(name));
    let mut files = vec![path.to_path_buf()];
    files.extend(set.set_files.iter().cloned());
    for warning in crate::rules::lint::warnings(&set) {
        warn!("{}", warning.located(&path.display().to_string()));
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

/// `firewall run`: filters with the rule file until SIGINT or SIGTERM.
pub async fn run(options: RunOptions) -> Result<()> {
    heap::map_large_blocks();
    // A broken file is reported before anything is loaded or attached.
    // Created when a dynamic set first gets a member (a container's root may be read-only).
    let members = Members::load(&options.state_dir)?;
    let prepared = prepare(
        &options.rules,
        options.insecure_files,
        options.audit,
        &members,
    )?;
    let pins = Pins::open(&options.pin_dir)?;
    let _lock = pins.lock()?;
    let (mut state, mut events) = start(options, prepared, members, &pins)?;
    heap::release_freed();
    follow_events(&mut state, &mut events).await?;
    stop(state, &pins)
}

/// What the event loop listens to besides the rule files and the trial's deadline (which
/// [`State`] holds).
struct Events {
    control: ControlSocket,
    link_events: LinkEvents,
    logger: Option<AsyncFd<KernelLog>>,
    /// A reload due once a burst of file changes has settled.
    debounce: Option<Pin<Box<Sleep>>>,
    flow_check: tokio::time::Interval,
    flow_alarm: FillAlarm,
    hangup: Signal,
    interrupt: Signal,
    terminate: Signal,
}

/// Loads the programs, puts `prepared` in force and attaches to the interfaces: the daemon
/// filters when this returns.
fn start(
    options: RunOptions,
    prepared: Prepared,
    members: Members,
    pins: &Pins,
) -> Result<(State, Events)> {
    let specs: Vec<IfaceSpec> = options.ifaces.iter().map(|s| IfaceSpec::parse(s)).collect();
    interfaces::check_link_types(&specs)?;
    interfaces::adopt_stored_links(pins);
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
        crate::report::metrics_server::serve(addr, pins.clone(), reloads.clone())?;
        info!("metrics on http://{addr}/metrics");
    }
    let watcher = FileWatcher::new(&prepared.files)?;
    let control = ControlSocket::bind(&options.control)?;
    let rule_names = RuleNames::default();
    rule_names.set(&prepared.set);
    let logger = open_packet_log(&mut kernel, rule_names.clone())?;
    // Connections that exist already keep working under default deny.
    let existing = crate::host::sockets::open_flows();
    kernel.add_flows(&existing)?;
    info!("tracking {} existing connections", existing.len());
    // Listening before looking: no interface can appear unseen in between.
    let link_events = LinkEvents::open().context("listening for link events")?;
    let mut held = Held::new(specs);
    interfaces::attach_present(
        &mut held,
        &mut Dataplane {
            kernel: &mut kernel,
            pins,
            mode: options.mode,
        },
    )?;
    // Maps of other builds: the links run our program now.
    pins.remove_builds_except(Some(&pins.build_dir(crate::dataplane::object_id())))?;
    if let Ok(mut reloads) = reloads.lock() {
        reloads.filtering = true;
        reloads.not_filtered = held.not_filtered();
    }
    info!(
        "filtering; SIGHUP, `firewall reload --control {}` or editing {} reloads",
        options.control.display(),
        options.rules.display()
    );
    // The rules are in force on every interface.
    notify::notify(&format!(
        "READY=1\nSTATUS={}",
        interfaces::filtering_status(&held)
    ));
    let events = Events {
        control,
        link_events,
        logger,
        debounce: None,
        flow_check: tokio::time::interval(FLOW_CHECK_PERIOD),
        flow_alarm: FillAlarm::default(),
        hangup: signal(SignalKind::hangup())?,
        interrupt: signal(SignalKind::interrupt())?,
        terminate: signal(SignalKind::terminate())?,
    };
    let state = State {
        kernel,
        pins: pins.clone(),
        held,
        options,
        watcher,
        in_force: prepared.set,
        trial: None,
        reloads,
        rule_names,
        started,
        applied: started,
        member_end: None,
        members,
    };
    let mut state = state;
    state.time_member_ends();
    Ok((state, events))
}

/// The kernel's packet log, read as lines arrive; `None` (and a warning) where the kernel
/// offers none.
fn open_packet_log(
    kernel: &mut Kernel,
    rule_names: RuleNames,
) -> Result<Option<AsyncFd<KernelLog>>> {
    match KernelLog::open(kernel, rule_names) {
        // SAFETY: the log owns its ring buffer fd for as long as it lives, and the AsyncFd
        // owns the log.
        Ok(log) => Ok(Some(
            unsafe { AsyncFd::register(log) }.map_err(|e| e.into_parts().1)?,
        )),
        Err(error) => {
            warn!("kernel packet log unavailable: {error:#}");
            Ok(None)
        }
    }
}

/// Hands each event to its handler until SIGINT or SIGTERM.
async fn follow_events(state: &mut State, events: &mut Events) -> Result<()> {
    loop {
        tokio::select! {
            _ = events.hangup.recv() => {
                let _ = state.reload();
            }
            changed = state.watcher.changed() => {
                changed?;
                events.debounce = Some(Box::pin(tokio::time::sleep(DEBOUNCE)));
            }
            () = elapsed(events.debounce.as_mut()) => {
                events.debounce = None;
                info!("rule files changed");
                let _ = state.reload();
            }
            () = elapsed(state.trial.as_mut().map(Trial::deadline)) => state.roll_back(),
            () = elapsed(state.member_end.as_mut()) => state.end_members(),
            request = events.control.accept() => control_server::answer(request, state).await,
            changed = events.link_events.changed() => {
                changed.context("reading link events")?;
                state.follow_links();
            }
            _ = events.interrupt.recv() => return Ok(()),
            _ = events.terminate.recv() => return Ok(()),
            guard = readable(&mut events.logger) => drain(guard?),
            _ = events.flow_check.tick() => {
                check_flows(&state.kernel, &mut events.flow_alarm);
                sweep_bans(&mut state.kernel);
            }
        }
    }
}

/// Counts the flow table; warns when live flows near its capacity.
fn check_flows(kernel: &Kernel, alarm: &mut FillAlarm) {
    match kernel.flow_fill() {
        Ok(fill) => {
            if let Some(warning) = alarm.check(&fill) {
                warn!("{warning}");
            }
        }
        Err(error) => warn!("counting the flow table: {error:#}"),
    }
}

/// Frees the space of bans that ended (the kernel ignores them already).
fn sweep_bans(kernel: &mut Kernel) {
    match kernel.sweep_bans(crate::dataplane::monotonic_now_ns()) {
        Ok(0) => {}
        Ok(ended) => info!("{ended} bans ended"),
        Err(error) => warn!("sweeping ended bans: {error:#}"),
    }
}

/// SIGINT or SIGTERM: detaches, or with `--persist` leaves the rules in force.
fn stop(state: State, pins: &Pins) -> Result<()> {
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

/// Waits until `timer` goes off; never, when there is none.
async fn elapsed(timer: Option<&mut Pin<Box<Sleep>>>) {
    match timer {
        Some(timer) => timer.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Waits until the kernel packet log has lines; never, when there is no log.
async fn readable(
    logger: &mut Option<AsyncFd<KernelLog>>,
) -> std::io::Result<AsyncFdReadyMutGuard<'_, KernelLog>> {
    match logger {
        Some(fd) => fd.readable_mut().await,
        None => std::future::pending().await,
    }
}

/// Logs the packet log's lines.
fn drain(mut guard: AsyncFdReadyMutGuard<'_, KernelLog>) {
    // Readiness first: a line written after the drain wakes us again.
    guard.clear_ready();
    guard.get_inner_mut().drain();
}
