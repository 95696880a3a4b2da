//! Attaching to an interface: the tc egress program, then XDP; with pins, taking over the
//! links an earlier daemon pinned, and pinning new ones.
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _, Result};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::SchedClassifierLink;
use aya::programs::xdp::XdpLink;
use aya::programs::{tc, SchedClassifier, TcAttachType, Xdp, XdpMode};

use crate::dataplane::pins::LinkKind;
use crate::dataplane::Kernel;
use crate::host::link::{self, LinkLayer};

/// How to attach: `Auto` tries native (driver) XDP and falls back to generic (skb) XDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    Auto,
    Native,
    Skb,
}

/// What the log says of a link taken over from its pin.
const TAKEN_OVER: &str = "taken over from the pinned link";

/// A program that can run in a link an earlier daemon pinned.
trait TakeOver {
    /// What the link is called in messages.
    const KIND: &'static str;
    /// Swaps this program into `link` atomically; the pin keeps holding the link.
    fn take_over(&mut self, link: FdLink, iface: &str) -> Result<()>;
}

/// [`TakeOver`] for a program type and the link type it attaches through.
macro_rules! take_over_through {
    ($program:ty, $link:ty, $kind:literal) => {
        impl TakeOver for $program {
            const KIND: &'static str = $kind;
            fn take_over(&mut self, link: FdLink, iface: &str) -> Result<()> {
                let id = self
                    .attach_to_link(<$link>::try_from(link)?)
                    .with_context(|| format!("taking over the {} link of {iface}", Self::KIND))?;
                // The pin holds the link: releasing the interface is unpinning it.
                drop(self.take_link(id)?);
                Ok(())
            }
        }
    };
}

take_over_through!(Xdp, XdpLink, "XDP");
take_over_through!(SchedClassifier, SchedClassifierLink, "tc");

/// Takes over the link pinned at `pin` if there is one; returns whether it did.
fn take_over_pinned(program: &mut impl TakeOver, pin: Option<&Path>, iface: &str) -> Result<bool> {
    let Some(pin) = pin.filter(|pin| pin.exists()) else {
        return Ok(false);
    };
    program.take_over(FdLink::from(PinnedLink::from_pin(pin)?), iface)?;
    Ok(true)
}

fn pin_link(link: FdLink, pin: &Path) -> Result<()> {
    link.pin(pin)
        .with_context(|| format!("pinning {}", pin.display()))?;
    Ok(())
}

impl Kernel {
    /// Attaches to `iface`: first the tc egress program, so that the host's flows are being
    /// recorded before the XDP program starts to judge their replies; then XDP. With pins,
    /// links pinned by an earlier daemon are taken over (the program they run is swapped for
    /// ours atomically), and new links are pinned. Returns what was done, for the log.
    /// The programs are those of the interface's link layer ([`link::link_layer`]);
    /// interfaces of other link types are refused.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<String> {
        let layer = link::link_layer(iface)?;
        self.load_layer(layer)?;
        let tc = self.attach_egress(iface, layer)?;
        let xdp = self.attach_xdp(iface, layer, mode)?;
        let layer = match layer {
            LinkLayer::Ethernet => "",
            LinkLayer::Ip => " (frames start at the IP header)",
        };
        Ok(format!("XDP ingress: {xdp}; tc egress: {tc}{layer}"))
    }

    fn link_pin(&self, kind: LinkKind, iface: &str) -> Option<PathBuf> {
        self.pins.as_ref().map(|pins| pins.link_path(kind, iface))
    }

    fn attach_egress(&mut self, iface: &str, layer: LinkLayer) -> Result<&'static str> {
        let name = layer.egress_program();
        let pin = self.link_pin(LinkKind::Tc, iface);
        let egress: &mut SchedClassifier = self.program_mut("tc", name)?;
        if take_over_pinned(egress, pin.as_deref(), iface)? {
            return Ok(TAKEN_OVER);
        }
        if let Err(error) = tc::qdisc_add_clsact(iface) {
            // Already there (ours from an earlier run, or someone else's): share it.
            log::debug!("clsact on {iface}: {error}");
        }
        let id = egress
            .attach(iface, TcAttachType::Egress)
            .with_context(|| format!("attaching the tc egress program to {iface}"))?;
        let Some(pin) = pin else {
            return Ok("attached");
        };
        let link = egress.take_link(id)?;
        match FdLink::try_from(link) {
            Ok(link) => {
                pin_link(link, &pin)?;
                Ok("pinned")
            }
            Err(_) => {
                // Netlink tc filters (before Linux 6.6) have no link to pin: the filter stays
                // until the daemon detaches it, and one a killed daemon left behind stays for
                // good. Replace those (ours by name) rather than stack another.
                log::warn!("{iface}: tc egress is not pinned (no TCX before Linux 6.6)");
                let _ = tc::qdisc_detach_program(iface, TcAttachType::Egress, name);
                egress.attach(iface, TcAttachType::Egress)?;
                Ok("attached")
            }
        }
    }

    fn attach_xdp(
        &mut self,
        iface: &str,
        layer: LinkLayer,
        mode: AttachMode,
    ) -> Result<&'static str> {
        let name = layer.xdp_program();
        let pin = self.link_pin(LinkKind::Xdp, iface);
        let program: &mut Xdp = self.program_mut("XDP", name)?;
        if take_over_pinned(program, pin.as_deref(), iface)? {
            return Ok(TAKEN_OVER);
        }
        let attempts: &[(XdpMode, &'static str)] = match mode {
            AttachMode::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "skb")],
            AttachMode::Native => &[(XdpMode::Driver, "native")],
            AttachMode::Skb => &[(XdpMode::Skb, "skb")],
        };
        let mut last_error = None;
        for &(xdp_mode, name) in attempts {
            match program.attach(iface, xdp_mode) {
                Ok(id) => {
                    if let Some(pin) = pin {
                        let link = FdLink::try_from(program.take_link(id)?)
                            .context("this kernel attaches XDP without a link to pin")?;
                        pin_link(link, &pin)?;
                        return Ok(match name {
                            "native" => "native, pinned",
                            _ => "skb (generic), pinned",
                        });
                    }
                    return Ok(name);
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(anyhow!(last_error.expect("at least one attempt")))
            .with_context(|| format!("attaching XDP to {iface}"))
    }
}
