//! Link layers: what an interface's frames start with, which decides the programs it gets.
//! XDP and tc hand a program the frame from the link header on (XDP in generic mode: from
//! the skb's mac header): an Ethernet header on Ethernet (and loopback, whose frames carry a
//! zeroed one), the IP header itself on tun, WireGuard, PPP, raw-IP modems and IPv4-in-IPv4
//! tunnels. Any other link type is refused rather than let through unjudged.
//!
//! Refused although they carry IP: GRE (`ARPHRD_IPGRE`) points the mac header of received
//! packets at the outer IP header (its header_ops read the peer's address there), so XDP
//! would judge the tunnel's own packet, not what it carries; and on GRE devices without a
//! fixed remote, tc egress sees the outer headers too. sit, ip6tnl and ip6gre are not listed
//! either: which header their received packets start at in XDP has changed between kernel
//! versions.
use anyhow::{anyhow, bail, Context as _, Result};
use firewall_common::{EGRESS_PROGRAM, EGRESS_PROGRAM_L3, XDP_PROGRAM, XDP_PROGRAM_L3};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkLayer {
    /// Frames start with an Ethernet header (up to two VLAN tags may follow).
    Ethernet,
    /// Frames start with the IPv4 or IPv6 header.
    Ip,
}

impl LinkLayer {
    /// The XDP program for interfaces of this link layer.
    pub fn xdp_program(self) -> &'static str {
        match self {
            LinkLayer::Ethernet => XDP_PROGRAM,
            LinkLayer::Ip => XDP_PROGRAM_L3,
        }
    }

    /// The tc egress program for interfaces of this link layer.
    pub fn egress_program(self) -> &'static str {
        match self {
            LinkLayer::Ethernet => EGRESS_PROGRAM,
            LinkLayer::Ip => EGRESS_PROGRAM_L3,
        }
    }
}

/// `ARPHRD_*` values (include/uapi/linux/if_arp.h) the firewall knows.
pub const ARPHRD_ETHER: u16 = 1;
pub const ARPHRD_PPP: u16 = 512;
pub const ARPHRD_RAWIP: u16 = 519;
pub const ARPHRD_TUNNEL: u16 = 768;
pub const ARPHRD_TUNNEL6: u16 = 769;
pub const ARPHRD_LOOPBACK: u16 = 772;
pub const ARPHRD_SIT: u16 = 776;
pub const ARPHRD_IPGRE: u16 = 778;
pub const ARPHRD_IP6GRE: u16 = 823;
pub const ARPHRD_NONE: u16 = 0xfffe;

/// The link layer of link type `arphrd`, or `None` for types the firewall cannot parse.
pub fn link_layer_of(arphrd: u16) -> Option<LinkLayer> {
    match arphrd {
        ARPHRD_ETHER | ARPHRD_LOOPBACK => Some(LinkLayer::Ethernet),
        // tun and WireGuard (NONE; WireGuard resets the mac header to the decrypted packet),
        // PPP (its header is pulled on receive and added after tc on send), raw-IP modems,
        // IPv4 in IPv4 (ipip resets the mac header to the inner packet since Linux 5.14; the
        // firewall needs 6.1).
        ARPHRD_NONE | ARPHRD_PPP | ARPHRD_RAWIP | ARPHRD_TUNNEL => Some(LinkLayer::Ip),
        _ => None,
    }
}

/// A readable name of a link type, for messages.
pub fn arphrd_name(arphrd: u16) -> &'static str {
    match arphrd {
        ARPHRD_ETHER => "ether",
        ARPHRD_PPP => "ppp",
        ARPHRD_RAWIP => "rawip",
        ARPHRD_TUNNEL => "tunnel",
        ARPHRD_TUNNEL6 => "tunnel6",
        ARPHRD_LOOPBACK => "loopback",
        ARPHRD_SIT => "sit",
        ARPHRD_IPGRE => "ipgre",
        ARPHRD_IP6GRE => "ip6gre",
        ARPHRD_NONE => "none",
        24 => "ieee1394",
        32 => "infiniband",
        280 => "can",
        801 => "ieee80211",
        803 => "ieee80211_radiotap",
        804 => "ieee802154",
        820 => "phonet",
        822 => "caif",
        824 => "netlink",
        825 => "6lowpan",
        826 => "vsockmon",
        _ => "unknown",
    }
}

/// The link type (`ARPHRD_*`) of `iface`, from sysfs.
pub fn arphrd(iface: &str) -> Result<u16> {
    if iface.is_empty() || iface.contains('/') || iface.starts_with('.') {
        bail!("{iface:?} is not an interface name");
    }
    let path = format!("/sys/class/net/{iface}/type");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("interface {iface}: {path}"))?;
    text.trim()
        .parse()
        .map_err(|_| anyhow!("interface {iface}: {path} holds {:?}", text.trim()))
}

/// What the frames of `iface` start with; an error naming the interface and its link type
/// for link types the firewall cannot parse.
pub fn link_layer(iface: &str) -> Result<LinkLayer> {
    let arphrd = arphrd(iface)?;
    check(iface, arphrd)
}

/// [`link_layer`] given the link type.
pub fn check(iface: &str, arphrd: u16) -> Result<LinkLayer> {
    link_layer_of(arphrd).ok_or_else(|| {
        anyhow!(
            "interface {iface} has link type {} (ARPHRD {arphrd}), which the firewall cannot \
             parse: only Ethernet, loopback, tun/WireGuard, PPP, raw-IP and ipip \
             interfaces are supported",
            arphrd_name(arphrd)
        )
    })
}

/// How XDP runs on interface `ifindex`, as the kernel reports it (`IFLA_XDP_ATTACHED` of an
/// RTM_GETLINK answer): `native` (in the driver), `skb` (generic), `offload`, `multi`; `None`
/// when no XDP program is attached.
pub fn xdp_mode(ifindex: u32) -> std::io::Result<Option<&'static str>> {
    use std::io::Error;
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    const IFLA_XDP_ATTACHED: u16 = 2;
    const NLA_F_NESTED: u16 = 1 << 15;
    #[repr(C)]
    struct Request {
        header: libc::nlmsghdr,
        info: libc::ifinfomsg,
    }
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero netlink headers are valid; the fields that matter are set below.
    let mut request: Request = unsafe { std::mem::zeroed() };
    request.header.nlmsg_len = size_of::<Request>() as u32;
    request.header.nlmsg_type = libc::RTM_GETLINK;
    request.header.nlmsg_flags = libc::NLM_F_REQUEST as u16;
    request.header.nlmsg_seq = 1;
    request.info.ifi_family = libc::AF_UNSPEC as u8;
    request.info.ifi_index = ifindex as i32;
    // SAFETY: sends the request struct, of the size given.
    let sent = unsafe {
        libc::send(
            fd.as_raw_fd(),
            (&request as *const Request).cast(),
            size_of::<Request>(),
            0,
        )
    };
    if sent < 0 {
        return Err(Error::last_os_error());
    }
    fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
        Some(u16::from_ne_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
    }
    /// Attributes (length, type, value padded to 4 bytes).
    fn attributes(bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
        let mut at = 0;
        std::iter::from_fn(move || {
            let len = usize::from(u16_at(bytes, at)?);
            let kind = u16_at(bytes, at + 2)? & !NLA_F_NESTED;
            let value = bytes.get(at + 4..at + len)?;
            at += len.div_ceil(4) * 4;
            (len >= 4).then_some((kind, value))
        })
    }
    let mut buffer = vec![0u8; 65536];
    // SAFETY: receives into a buffer we own, of the size given.
    let got = unsafe { libc::recv(fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), 0) };
    if got < 0 {
        return Err(Error::last_os_error());
    }
    let message = &buffer[..got as usize];
    let header = size_of::<libc::nlmsghdr>();
    if u16_at(message, 4) == Some(libc::NLMSG_ERROR as u16) {
        let code = i32::from_ne_bytes(message[header..header + 4].try_into().unwrap());
        return Err(Error::from_raw_os_error(-code));
    }
    let body = message
        .get(header + size_of::<libc::ifinfomsg>()..)
        .unwrap_or(&[]);
    for (kind, value) in attributes(body) {
        if kind != libc::IFLA_XDP {
            continue;
        }
        for (kind, value) in attributes(value) {
            if kind == IFLA_XDP_ATTACHED {
                return Ok(match value.first() {
                    Some(1) => Some("native"),
                    Some(2) => Some("skb"),
                    Some(3) => Some("offload"),
                    Some(4) => Some("multi"),
                    _ => None,
                });
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_link_types_are_refused_by_name_and_number() {
        let error = check("ib0", 32).unwrap_err().to_string();
        assert!(error.contains("ib0"), "{error}");
        assert!(error.contains("infiniband"), "{error}");
        assert!(error.contains("ARPHRD 32"), "{error}");
        let error = check("can0", 280).unwrap_err().to_string();
        assert!(error.contains("can0") && error.contains("can (ARPHRD 280)"));
        assert!(check("x", 0xffff).is_err());
    }

    #[test]
    fn known_link_types() {
        assert_eq!(check("eth0", 1).unwrap(), LinkLayer::Ethernet);
        assert_eq!(check("lo", 772).unwrap(), LinkLayer::Ethernet);
        for arphrd in [0xfffe, 512, 519, 768] {
            assert_eq!(check("t", arphrd).unwrap(), LinkLayer::Ip, "{arphrd}");
        }
        // GRE hands XDP the outer IP header.
        let error = check("gre1", 778).unwrap_err().to_string();
        assert!(
            error.contains("gre1") && error.contains("ipgre (ARPHRD 778)"),
            "{error}"
        );
        for arphrd in [769, 776, 823] {
            assert!(check("t", arphrd).is_err(), "{arphrd}");
        }
        assert_eq!(LinkLayer::Ip.xdp_program(), XDP_PROGRAM_L3);
        assert_eq!(LinkLayer::Ethernet.egress_program(), EGRESS_PROGRAM);
    }

    #[test]
    fn loopback_has_no_xdp_and_missing_interfaces_are_errors() {
        assert_eq!(xdp_mode(1).unwrap(), None);
        assert!(xdp_mode(u32::MAX - 1).is_err());
    }

    #[test]
    fn loopback_is_read_from_sysfs() {
        assert_eq!(link_layer("lo").unwrap(), LinkLayer::Ethernet);
        let error = link_layer("no-such-if0").unwrap_err().to_string();
        assert!(error.contains("no-such-if0"), "{error}");
    }
}
