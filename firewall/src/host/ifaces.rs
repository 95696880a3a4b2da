//! The interfaces the daemon filters. `--iface` names them (`eth0`), matches them by pattern
//! (`en*`, `wg?`) or takes them `all` (every interface but `lo`). Interfaces come and go while
//! the daemon runs (a VPN, VLAN or bond restarts, a driver reloads, a USB NIC is plugged): the
//! daemon follows the kernel's link events and holds every matching interface present,
//! attaching to new ones, re-attaching to ones deleted and created anew, following renames.
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use log::{error, info, warn};
use tokio::io::unix::AsyncFd;

/// One `--iface` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IfaceSpec {
    /// Every interface but loopback.
    All,
    /// A name with `*` (any run of characters) or `?` (one character).
    Pattern(String),
    Name(String),
}

impl IfaceSpec {
    pub fn parse(text: &str) -> IfaceSpec {
        if text == "all" {
            IfaceSpec::All
        } else if text.contains(['*', '?']) {
            IfaceSpec::Pattern(text.to_string())
        } else {
            IfaceSpec::Name(text.to_string())
        }
    }

    pub fn matches(&self, name: &str) -> bool {
        match self {
            IfaceSpec::All => name != "lo",
            IfaceSpec::Pattern(pattern) => glob(pattern.as_bytes(), name.as_bytes()),
            IfaceSpec::Name(wanted) => wanted == name,
        }
    }
}

fn glob(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            glob(&pattern[1..], name) || (!name.is_empty() && glob(pattern, &name[1..]))
        }
        (Some(b'?'), Some(_)) => glob(&pattern[1..], &name[1..]),
        (Some(p), Some(n)) if p == n => glob(&pattern[1..], &name[1..]),
        _ => false,
    }
}

/// The index of interface `name` in this network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The name of interface `index` in this network namespace, if there is one.
pub fn name_of(index: u32) -> Option<String> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as if_indextoname requires.
    let found = unsafe { libc::if_indextoname(index, name.as_mut_ptr()) };
    if found.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// The interfaces of this network namespace, by name.
pub fn present() -> io::Result<BTreeMap<String, u32>> {
    // SAFETY: if_nameindex returns an array ended by a zero entry, freed below.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut present = BTreeMap::new();
    let mut entry = list;
    // SAFETY: entries up to the terminating zero one are valid, their names C strings.
    unsafe {
        while (*entry).if_index != 0 {
            let name = std::ffi::CStr::from_ptr((*entry).if_name);
            present.insert(name.to_string_lossy().into_owned(), (*entry).if_index);
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    Ok(present)
}

/// What holding an interface needs of the kernel side.
pub trait Attacher {
    /// Attaches to `iface`; returns what was done, for the log.
    fn attach(&mut self, iface: &str) -> anyhow::Result<String>;
    /// Lets go of `iface` (deleted, renamed away): its links are unpinned.
    fn release(&mut self, iface: &str) -> anyhow::Result<()>;
    /// `iface` was renamed `to` and is still held.
    fn renamed(&mut self, iface: &str, to: &str) -> anyhow::Result<()>;
}

/// The interfaces held, by name, with the index they had when attached.
pub struct Held {
    specs: Vec<IfaceSpec>,
    held: BTreeMap<String, u32>,
    /// Interfaces that could not be attached, by name and index, so that the error is logged
    /// once, not on every link event.
    failed: BTreeMap<String, u32>,
}

/// What [`Held::reconcile`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub attached: Vec<String>,
    pub released: Vec<String>,
    /// Named interfaces (not patterns) that could not be attached, with the error.
    pub refused: Vec<(String, String)>,
}

impl Changes {
    pub fn any(&self) -> bool {
        !self.attached.is_empty() || !self.released.is_empty()
    }
}

impl Held {
    pub fn new(specs: Vec<IfaceSpec>) -> Held {
        Held {
            specs,
            held: BTreeMap::new(),
            failed: BTreeMap::new(),
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.held.keys().cloned().collect()
    }

    /// The interfaces held, by name, with their index.
    pub fn held(&self) -> impl Iterator<Item = (&str, u32)> {
        self.held
            .iter()
            .map(|(name, &index)| (name.as_str(), index))
    }

    /// Interfaces that should be filtered and are not: named ones that are absent, and any
    /// that could not be attached (for readiness).
    pub fn not_filtered(&self) -> Vec<String> {
        let mut names = self.missing();
        names.extend(self.failed.keys().cloned());
        names.sort();
        names.dedup();
        names
    }

    /// Named interfaces that are not there (yet).
    pub fn missing(&self) -> Vec<String> {
        self.specs
            .iter()
            .filter_map(|spec| match spec {
                IfaceSpec::Name(name) if !self.held.contains_key(name) => Some(name.clone()),
                _ => None,
            })
            .collect()
    }

    fn wanted(&self, name: &str) -> bool {
        self.specs.iter().any(|spec| spec.matches(name))
    }

    fn named(&self, name: &str) -> bool {
        self.specs.contains(&IfaceSpec::Name(name.to_string()))
    }

    /// Makes the held interfaces those of `present` that the specs want: releases the ones
    /// gone (or renamed away), follows renames, re-attaches to ones created anew under the
    /// same name (a new index), attaches to new ones.
    pub fn reconcile(
        &mut self,
        present: &BTreeMap<String, u32>,
        kernel: &mut dyn Attacher,
    ) -> Changes {
        let mut changes = Changes::default();
        let by_index: BTreeMap<u32, &String> =
            present.iter().map(|(name, index)| (*index, name)).collect();
        for (name, index) in std::mem::take(&mut self.held) {
            if present.get(&name) == Some(&index) {
                self.held.insert(name, index);
                continue;
            }
            match by_index.get(&index) {
                Some(&new_name) if self.wanted(new_name) && !self.held.contains_key(new_name) => {
                    match kernel.renamed(&name, new_name) {
                        Ok(()) => {
                            info!("{name} was renamed {new_name}: still filtering it");
                            self.held.insert(new_name.clone(), index);
                            continue;
                        }
                        Err(error) => error!("following the rename of {name}: {error:#}"),
                    }
                }
                Some(&new_name) => {
                    info!("{name} was renamed {new_name}, which no --iface matches: released")
                }
                None if present.contains_key(&name) => {
                    info!("{name} was deleted and created anew: attaching again")
                }
                None => info!("{name} is gone: released"),
            }
            if let Err(error) = kernel.release(&name) {
                warn!("releasing {name}: {error:#}");
            }
            changes.released.push(name);
        }
        self.failed
            .retain(|name, index| present.get(name) == Some(index));
        for (name, &index) in present {
            if self.held.contains_key(name) || !self.wanted(name) {
                continue;
            }
            if self.failed.contains_key(name) {
                continue;
            }
            match kernel.attach(name) {
                Ok(how) => {
                    info!("attached to {name} ({how})");
                    self.held.insert(name.clone(), index);
                    changes.attached.push(name.clone());
                }
                Err(error) => {
                    let message = format!("{error:#}");
                    if self.named(name) {
                        error!("{name}: NOT FILTERED: {message}");
                        changes.refused.push((name.clone(), message));
                    } else {
                        warn!("{name} matches --iface but is skipped: {message}");
                    }
                    self.failed.insert(name.clone(), index);
                }
            }
        }
        changes
    }
}

/// The kernel's link events (RTM_NEWLINK, RTM_DELLINK) on an rtnetlink socket.
pub struct LinkEvents {
    socket: AsyncFd<OwnedFd>,
}

const RTMGRP_LINK: u32 = 1;

impl LinkEvents {
    pub fn open() -> io::Result<LinkEvents> {
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a zeroed sockaddr_nl is valid; we set family and groups.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = RTMGRP_LINK;
        // SAFETY: bind with a valid sockaddr_nl of the size given.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if bound != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the AsyncFd owns the descriptor for as long as it is registered.
        let socket = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(LinkEvents { socket })
    }

    /// Waits for link events and drains them; the caller then looks at the interfaces as they
    /// are (messages can be lost when the socket's buffer overflows, a fresh look cannot).
    pub async fn changed(&mut self) -> io::Result<()> {
        loop {
            let mut guard = self.socket.readable().await?;
            let mut buffer = [0u8; 16384];
            let mut got = false;
            loop {
                // SAFETY: recv into a buffer we own, of the size given.
                let n = unsafe {
                    libc::recv(
                        guard.get_inner().as_raw_fd(),
                        buffer.as_mut_ptr().cast(),
                        buffer.len(),
                        0,
                    )
                };
                if n >= 0 {
                    got = true;
                    continue;
                }
                let error = io::Error::last_os_error();
                match error.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    // Events were lost: look anyway.
                    Some(libc::ENOBUFS) => got = true,
                    Some(libc::EINTR) => {}
                    _ => return Err(error),
                }
            }
            guard.clear_ready();
            if got {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_match_names_patterns_and_all() {
        let all = IfaceSpec::parse("all");
        assert!(all.matches("eth0") && all.matches("wg0") && !all.matches("lo"));
        let en = IfaceSpec::parse("en*");
        assert_eq!(en, IfaceSpec::Pattern("en*".into()));
        assert!(en.matches("enp0s3") && en.matches("en") && !en.matches("eth0"));
        let wg = IfaceSpec::parse("wg?");
        assert!(wg.matches("wg0") && !wg.matches("wg10") && !wg.matches("wg"));
        let eth0 = IfaceSpec::parse("eth0");
        assert!(eth0.matches("eth0") && !eth0.matches("eth01"));
        assert!(IfaceSpec::parse("*.10").matches("bond0.10"));
    }

    /// Records what the reconciliation asked of the kernel.
    #[derive(Default)]
    struct Recorder {
        calls: Vec<String>,
        refuse: Vec<String>,
    }

    impl Attacher for Recorder {
        fn attach(&mut self, iface: &str) -> anyhow::Result<String> {
            self.calls.push(format!("attach {iface}"));
            if self.refuse.iter().any(|name| name == iface) {
                anyhow::bail!("{iface}: link type 32 (InfiniBand) is not supported");
            }
            Ok("native".into())
        }
        fn release(&mut self, iface: &str) -> anyhow::Result<()> {
            self.calls.push(format!("release {iface}"));
            Ok(())
        }
        fn renamed(&mut self, iface: &str, to: &str) -> anyhow::Result<()> {
            self.calls.push(format!("rename {iface} {to}"));
            Ok(())
        }
    }

    fn links(list: &[(&str, u32)]) -> BTreeMap<String, u32> {
        list.iter()
            .map(|(name, index)| (name.to_string(), *index))
            .collect()
    }

    #[test]
    fn interfaces_that_come_and_go_are_followed() {
        let mut held = Held::new(vec![IfaceSpec::parse("eth0"), IfaceSpec::parse("wg*")]);
        let mut kernel = Recorder::default();
        // eth0 is late: nothing to attach, and it is reported missing.
        held.reconcile(&links(&[("lo", 1), ("wg0", 3)]), &mut kernel);
        assert_eq!(kernel.calls, ["attach wg0"]);
        assert_eq!(held.missing(), ["eth0"]);
        kernel.calls.clear();
        // It appears.
        held.reconcile(&links(&[("lo", 1), ("eth0", 2), ("wg0", 3)]), &mut kernel);
        assert_eq!(kernel.calls, ["attach eth0"]);
        assert!(held.missing().is_empty());
        kernel.calls.clear();
        // Deleted and created anew under the same name (another index): attached again.
        held.reconcile(&links(&[("lo", 1), ("eth0", 7), ("wg0", 3)]), &mut kernel);
        assert_eq!(kernel.calls, ["release eth0", "attach eth0"]);
        kernel.calls.clear();
        // wg0 renamed wg1 (still matches): followed. Then renamed away: released.
        held.reconcile(&links(&[("lo", 1), ("eth0", 7), ("wg1", 3)]), &mut kernel);
        assert_eq!(kernel.calls, ["rename wg0 wg1"]);
        kernel.calls.clear();
        held.reconcile(&links(&[("lo", 1), ("eth0", 7), ("vpn", 3)]), &mut kernel);
        assert_eq!(kernel.calls, ["release wg1"]);
        assert_eq!(held.names(), ["eth0"]);
        kernel.calls.clear();
        // Nothing changed: nothing done.
        let changes = held.reconcile(&links(&[("lo", 1), ("eth0", 7), ("vpn", 3)]), &mut kernel);
        assert!(!changes.any() && kernel.calls.is_empty());
    }

    #[test]
    fn refused_interfaces_are_reported_once() {
        let mut held = Held::new(vec![IfaceSpec::parse("ib0"), IfaceSpec::All]);
        let mut kernel = Recorder {
            refuse: vec!["ib0".into(), "ib1".into()],
            ..Recorder::default()
        };
        let present = links(&[("lo", 1), ("ib0", 2), ("ib1", 3), ("eth0", 4)]);
        let changes = held.reconcile(&present, &mut kernel);
        // Named: refused (the caller fails at start); matched by `all`: skipped.
        assert_eq!(changes.refused.len(), 1);
        assert_eq!(changes.refused[0].0, "ib0");
        assert_eq!(changes.attached, ["eth0"]);
        kernel.calls.clear();
        held.reconcile(&present, &mut kernel);
        assert!(kernel.calls.is_empty(), "{:?}", kernel.calls);
    }
}
