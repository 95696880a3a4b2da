//! `firewall status`: what the daemon holds (asked over the control socket) and what the
//! kernel holds (read from the pins), like `ufw status verbose`. Without a daemon it says so
//! and shows what the pins still hold.
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::daemon::bans::duration_text;
use crate::dataplane::pins::{LinkKind, Pins};
use crate::report::stats::{self, Stats};

/// The daemon's part, as it answers a status request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub uptime_seconds: u64,
    pub rule_file: String,
    /// Since the rules in force were put in force (start, reload, apply, roll-back).
    pub applied_seconds_ago: u64,
    pub audit: bool,
    pub interfaces: Vec<InterfaceStatus>,
    /// Interfaces the daemon was told to filter by name that are not there (yet).
    pub waiting_for: Vec<String>,
    /// Rules put in force by `firewall apply --confirm`, not confirmed yet.
    pub trial: Option<TrialStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    pub ifindex: u32,
    /// How the kernel runs XDP there: native, skb, ...; `None`: no XDP program attached.
    pub xdp_mode: Option<String>,
    /// The link type (`ether`, `none` for tun/WireGuard, ...).
    pub link_type: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrialStatus {
    pub file: String,
    pub seconds_left: u64,
}

/// Everything `firewall status` shows.
#[derive(Debug, Serialize)]
pub struct Status {
    /// `None`: no daemon answered (`daemon_error` says why).
    pub daemon: Option<DaemonStatus>,
    pub daemon_error: Option<String>,
    /// Interfaces whose links are pinned (they keep filtering without a daemon).
    pub pinned_interfaces: Vec<String>,
    pub policy_in: &'static str,
    /// The outbound default, or `allow` when outbound packets are not filtered at all (no
    /// out rule, `outbound = "allow"`): then the host's own traffic always passes.
    pub policy_out: &'static str,
    /// Whether outbound packets are judged (out rules, or `outbound = "deny"`).
    pub outbound_filtered: bool,
    /// Counters, bans and flows from the pins; `None` when nothing is pinned.
    pub kernel: Option<Stats>,
}

/// Puts the status together from the daemon's answer (or the error) and the pins in `pin_dir`.
pub fn gather(daemon: Result<DaemonStatus>, pin_dir: &Path) -> Result<Status> {
    let (daemon, daemon_error) = match daemon {
        Ok(status) => (Some(status), None),
        Err(error) => (None, Some(format!("{error:#}"))),
    };
    let (pinned_interfaces, kernel) = match Pins::existing(pin_dir) {
        Ok(pins) => {
            let names: Vec<String> = pins
                .links()?
                .into_iter()
                .filter(|(kind, _, _)| *kind == LinkKind::Xdp)
                .map(|(_, iface, _)| iface)
                .collect();
            (names, stats::read(&pins).ok())
        }
        Err(_) => (Vec::new(), None),
    };
    let policy_in = kernel
        .as_ref()
        .map_or("none", |stats| stats.default_policy.policy);
    let outbound_filtered = kernel.as_ref().is_some_and(|stats| stats.outbound_filtered);
    let policy_out = match &kernel {
        Some(stats) if stats.outbound_filtered => stats.outbound_default.policy,
        Some(_) => "allow",
        None => "none",
    };
    Ok(Status {
        daemon,
        daemon_error,
        pinned_interfaces,
        policy_in,
        policy_out,
        outbound_filtered,
        kernel,
    })
}

/// The status as text, in the order an operator reads it.
pub fn text(status: &Status) -> String {
    let mut out = String::new();
    match (&status.daemon, &status.daemon_error) {
        (Some(daemon), _) => {
            let _ = writeln!(
                out,
                "Status: active (pid {}, up {})",
                daemon.pid,
                duration_text(daemon.uptime_seconds)
            );
            let _ = writeln!(
                out,
                "Rules: {} (in force since {} ago){}",
                daemon.rule_file,
                duration_text(daemon.applied_seconds_ago),
                if daemon.audit {
                    "; AUDIT MODE: nothing is dropped"
                } else {
                    ""
                }
            );
            if let Some(trial) = &daemon.trial {
                let _ = writeln!(
                    out,
                    "Trial: {} is on trial, rolled back in {} unless `firewall confirm`",
                    trial.file,
                    duration_text(trial.seconds_left)
                );
            }
            out.push_str("Interfaces:\n");
            for iface in &daemon.interfaces {
                let _ = writeln!(
                    out,
                    "  {:<16} XDP {:<7} link {}",
                    iface.name,
                    iface.xdp_mode.as_deref().unwrap_or("MISSING"),
                    iface.link_type
                );
            }
            for name in &daemon.waiting_for {
                let _ = writeln!(out, "  {name:<16} not present (waiting for it)");
            }
        }
        (None, error) => {
            let _ = writeln!(
                out,
                "Status: no daemon ({})",
                error.as_deref().unwrap_or("no answer")
            );
            if status.pinned_interfaces.is_empty() {
                out.push_str("Nothing is filtered: no program is pinned.\n");
            } else {
                let _ = writeln!(
                    out,
                    "Still filtering (pinned): {}",
                    status.pinned_interfaces.join(", ")
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "Default: {} (incoming), {} (outgoing){}",
        status.policy_in,
        status.policy_out,
        if status.kernel.is_some() && !status.outbound_filtered {
            ", not filtered (no out rules)"
        } else {
            ""
        }
    );
    if let Some(kernel) = &status.kernel {
        let _ = writeln!(
            out,
            "Bans: {}; flows: {} live of {}",
            kernel.bans, kernel.flows.live, kernel.flows.capacity
        );
        out.push('\n');
        out.push_str(&stats::table(kernel));
    }
    out
}
