//! `firewall run`: the pipeline parse -> compile -> apply, then attach and serve signals.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, Result};
use aya_log::EbpfLogger;
use log::{error, info, warn};
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};

use crate::compile::{compile, Compiled};
use crate::config::load_rules;
use crate::kernel::{AttachMode, Kernel};

pub struct RunOptions {
    pub rules: PathBuf,
    pub ifaces: Vec<String>,
    pub mode: AttachMode,
}

/// Reads and compiles a rule file; nothing touches the kernel.
pub fn prepare(path: &Path) -> Result<Compiled> {
    let set = load_rules(path)?;
    for warning in crate::lint::warnings(&set) {
        warn!("{}: {warning}", path.display());
    }
    let compiled = compile(&set).with_context(|| format!("{}", path.display()))?;
    info!(
        "{}: {} rules, default {:?}",
        path.display(),
        set.rules.len(),
        set.default_policy
    );
    Ok(compiled)
}

pub async fn run(options: RunOptions) -> Result<()> {
    // A broken file is reported before anything is loaded or attached.
    let compiled = prepare(&options.rules)?;
    let mut kernel = Kernel::load()?;
    kernel.apply(&compiled)?;
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
        let mode = kernel.attach(iface, options.mode)?;
        info!("attached to {iface} ({mode} XDP ingress, tc egress)");
    }
    info!("filtering; SIGHUP reloads {}", options.rules.display());

    let mut hangup = signal(SignalKind::hangup())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = hangup.recv() => reload(&mut kernel, &options.rules),
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            guard = readable(&mut logger) => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        }
    }
    info!("detaching from {}", options.ifaces.join(", "));
    drop(kernel);
    Ok(())
}

/// Re-reads the rule file and swaps it in; on any error the rules in force stay.
fn reload(kernel: &mut Kernel, path: &Path) {
    let started = Instant::now();
    let result = prepare(path).and_then(|compiled| {
        let entries = compiled.src_v4.len()
            + compiled.src_v6.len()
            + compiled.dst_v4.len()
            + compiled.dst_v6.len();
        Ok((kernel.apply(&compiled)?, entries))
    });
    match result {
        Ok((updates, entries)) => info!(
            "reloaded {} in {:.1?}: {entries} address entries, {updates} map entries changed",
            path.display(),
            started.elapsed()
        ),
        Err(error) => error!("reload failed, previous rules stay in force: {error:#}"),
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
