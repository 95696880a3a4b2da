//! The interfaces the daemon filters: attaching to them through [`ifaces::Held`], following
//! link events, and handing links to and taking them from systemd's file descriptor store.
use anyhow::{bail, Result};
use log::{error, info, warn};

use super::reload::State;
use crate::dataplane::pins::{self, LinkKind, Pins};
use crate::dataplane::{AttachMode, Kernel};
use crate::host::ifaces::{self, Held, IfaceSpec};
use crate::host::notify;
use crate::rules::compile::compile;

/// Links left in systemd's file descriptor store by the daemon before this one (stopped by
/// `systemctl restart`, or crashed): pinned again, so that they are taken over like pins.
pub(super) fn adopt_stored_links(pins: &Pins) {
    use std::os::fd::AsFd as _;
    for (name, fd) in notify::received() {
        let is_link = name.starts_with("xdp-") || name.starts_with("tc-");
        let path = pins.dir().join(&name);
        if !is_link || name.contains('/') || path.exists() {
            continue;
        }
        match pins::pin_fd(fd.as_fd(), &path) {
            Ok(()) => info!("took over the link {name} from systemd's file descriptor store"),
            Err(error) => warn!("pinning the stored link {name}: {error}"),
        }
    }
}

/// An interface named and present whose link type the programs cannot parse stops the start
/// before anything is attached anywhere.
pub(super) fn check_link_types(specs: &[IfaceSpec]) -> Result<()> {
    for spec in specs {
        if let IfaceSpec::Name(name) = spec {
            if ifaces::ifindex(name).is_some() {
                crate::host::link::link_layer(name)?;
            }
        }
    }
    Ok(())
}

/// The first attach at start: every interface present that `held` names is attached, or the
/// start fails with the reasons it was refused.
pub(super) fn attach_present(held: &mut Held, dataplane: &mut Dataplane) -> Result<()> {
    let changes = held.reconcile(&ifaces::present()?, dataplane);
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
    Ok(())
}

/// The interfaces filtered and those waited for, for systemd's status line.
pub(super) fn filtering_status(held: &Held) -> String {
    let mut status = format!("filtering {}", held.names().join(", "));
    let missing = held.missing();
    if !missing.is_empty() {
        status += &format!("; waiting for {}", missing.join(", "));
    }
    status
}

/// The kernel side of holding interfaces (see [`ifaces::Held`]): attaches and pins, and
/// hands the links to systemd's file descriptor store.
pub(super) struct Dataplane<'a> {
    pub(super) kernel: &'a mut Kernel,
    pub(super) pins: &'a Pins,
    pub(super) mode: AttachMode,
}

impl Dataplane<'_> {
    fn store_links(&self, iface: &str) {
        use std::os::fd::AsFd as _;
        for kind in [LinkKind::Xdp, LinkKind::Tc] {
            let path = self.pins.link_path(kind, iface);
            if let Ok(fd) = pins::open_pinned(&path) {
                notify::store(&pins::file_name(&path), fd.as_fd());
            }
        }
    }

    fn unstore_links(&self, iface: &str) {
        for kind in [LinkKind::Xdp, LinkKind::Tc] {
            notify::unstore(&pins::file_name(&self.pins.link_path(kind, iface)));
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

impl State {
    /// Link events: holds the interfaces as they are now. Rules that name interfaces are
    /// written again, as an interface created anew has another index.
    pub(super) fn follow_links(&mut self) {
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
        if let Ok(mut reloads) = self.reloads.lock() {
            reloads.not_filtered = self.held.not_filtered();
        }
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
}
