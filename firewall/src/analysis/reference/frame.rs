//! The reference evaluator's frame parser: Ethernet (up to two VLAN tags) or bare IP frames,
//! IPv4 and IPv6 with extension headers, and the transport fields rules and connection state
//! look at, read with plain bounds-checked slicing.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use firewall_common::proto::{
    is_icmp_error, Echo, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_ICMP,
    IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, MAX_EXT_HEADERS, MAX_VLAN_TAGS, NEXTHDR_AUTH,
    NEXTHDR_DEST, NEXTHDR_FRAGMENT, NEXTHDR_HOP, NEXTHDR_ROUTING,
};
use firewall_common::{FlowKey, MAX_HEADER_OFFSET};

use super::flow_key;
use crate::host::link::LinkLayer;

/// The fields rules look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketInfo {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol; for IPv6 the header after the extension headers.
    pub proto: u8,
    /// Destination port of TCP/UDP, `None` for other protocols and non-first fragments.
    pub dport: Option<u16>,
    /// Source port, with `dport`.
    pub sport: Option<u16>,
    /// TCP flags byte.
    pub tcp_flags: u8,
    /// ICMP type and echo identifier (ICMP in IPv4, ICMPv6 in IPv6; not later fragments).
    pub icmp: Option<(u8, u16)>,
    /// For ICMP errors: the flow of the quoted packet, keyed as its replies look.
    pub quoted: Option<FlowKey>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    NonIp,
    Malformed,
    Ip(PacketInfo),
}

fn be16(frame: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]))
}

pub fn parse_frame(frame: &[u8]) -> Parsed {
    parse(frame).unwrap_or(Parsed::Malformed)
}

/// [`parse_frame`] for a frame of link layer `layer`. A frame that starts at the IP header is
/// IPv4 or IPv6 by its version nibble; any other version (or an empty frame) is malformed.
pub fn parse_frame_on(layer: LinkLayer, frame: &[u8]) -> Parsed {
    match layer {
        LinkLayer::Ethernet => parse_frame(frame),
        LinkLayer::Ip => {
            let parsed = match frame.first().map(|byte| byte >> 4) {
                Some(4) => ipv4(frame, 0),
                Some(6) => ipv6(frame, 0),
                _ => None,
            };
            parsed.map_or(Parsed::Malformed, Parsed::Ip)
        }
    }
}

/// `None` means malformed.
fn parse(frame: &[u8]) -> Option<Parsed> {
    let mut ethertype = be16(frame, 12)?;
    let mut cursor = 14;
    let mut tags = 0;
    while ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        if tags == MAX_VLAN_TAGS {
            return None;
        }
        ethertype = be16(frame, cursor + 2)?;
        cursor += 4;
        tags += 1;
    }
    match ethertype {
        ETH_P_IP => ipv4(frame, cursor).map(Parsed::Ip),
        ETH_P_IPV6 => ipv6(frame, cursor).map(Parsed::Ip),
        _ => Some(Parsed::NonIp),
    }
}

fn ipv4(frame: &[u8], l3: usize) -> Option<PacketInfo> {
    let header = frame.get(l3..l3 + 20)?;
    if header[0] >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(header[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    if header_len < 20 || total_len < header_len || l3 + total_len > frame.len() {
        return None;
    }
    let ip_end = l3 + total_len;
    let proto = header[9];
    let src = IpAddr::V4(Ipv4Addr::new(
        header[12], header[13], header[14], header[15],
    ));
    let dst = IpAddr::V4(Ipv4Addr::new(
        header[16], header[17], header[18], header[19],
    ));
    let fragment_offset = u16::from_be_bytes([header[6], header[7]]) & 0x1fff;
    let mut packet = PacketInfo::new(src, dst, proto);
    if fragment_offset == 0 {
        transport(frame, &mut packet, l3 + header_len, ip_end)?;
    }
    Some(packet)
}

fn ipv6(frame: &[u8], l3: usize) -> Option<PacketInfo> {
    let header = frame.get(l3..l3 + 40)?;
    if header[0] >> 4 != 6 {
        return None;
    }
    let ip_end = l3 + 40 + usize::from(u16::from_be_bytes([header[4], header[5]]));
    if ip_end > frame.len() {
        return None;
    }
    let src = IpAddr::V6(Ipv6Addr::from(
        <[u8; 16]>::try_from(&header[8..24]).unwrap(),
    ));
    let dst = IpAddr::V6(Ipv6Addr::from(
        <[u8; 16]>::try_from(&header[24..40]).unwrap(),
    ));
    let mut next = header[6];
    let mut offset = l3 + 40;
    let mut walked = 0;
    loop {
        let is_extension = matches!(
            next,
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT
        );
        if !is_extension {
            let mut packet = PacketInfo::new(src, dst, next);
            transport(frame, &mut packet, offset, ip_end)?;
            return Some(packet);
        }
        if walked == MAX_EXT_HEADERS || offset > MAX_HEADER_OFFSET {
            return None;
        }
        walked += 1;
        let len = match next {
            NEXTHDR_FRAGMENT => 8,
            NEXTHDR_AUTH => (usize::from(*frame.get(offset + 1)?) + 2) * 4,
            _ => (usize::from(*frame.get(offset + 1)?) + 1) * 8,
        };
        if offset + len > ip_end {
            return None;
        }
        let header_next = frame[offset];
        if next == NEXTHDR_FRAGMENT {
            let fragment_offset = u16::from_be_bytes([frame[offset + 2], frame[offset + 3]]) >> 3;
            if fragment_offset != 0 {
                // A later fragment: the upper-layer header is in the first one.
                return Some(PacketInfo::new(src, dst, header_next));
            }
        }
        next = header_next;
        offset += len;
    }
}

impl PacketInfo {
    fn new(src: IpAddr, dst: IpAddr, proto: u8) -> PacketInfo {
        PacketInfo {
            src,
            dst,
            proto,
            dport: None,
            sport: None,
            tcp_flags: 0,
            icmp: None,
            quoted: None,
        }
    }
}

/// Fills in the transport fields from the header at `l4`; `None` (malformed) when a TCP
/// (20 bytes), UDP or ICMP (8 bytes) header does not fit in the IP packet.
fn transport(frame: &[u8], packet: &mut PacketInfo, l4: usize, ip_end: usize) -> Option<()> {
    let header_len = match packet.proto {
        IPPROTO_TCP => 20,
        IPPROTO_UDP | IPPROTO_ICMP | IPPROTO_ICMPV6 => 8,
        _ => return Some(()),
    };
    if l4 + header_len > ip_end || l4 > MAX_HEADER_OFFSET {
        return None;
    }
    let header = &frame[l4..l4 + header_len];
    let v6 = packet.src.is_ipv6();
    match packet.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            packet.sport = Some(u16::from_be_bytes([header[0], header[1]]));
            packet.dport = Some(u16::from_be_bytes([header[2], header[3]]));
            if packet.proto == IPPROTO_TCP {
                packet.tcp_flags = header[13];
            }
        }
        // ICMP fields count only in their own family.
        proto if (proto == IPPROTO_ICMPV6) == v6 => {
            let kind = header[0];
            packet.icmp = Some((kind, u16::from_be_bytes([header[4], header[5]])));
            if is_icmp_error(v6, kind) {
                packet.quoted = quoted_flow(&frame[..ip_end], l4 + 8, v6);
            }
        }
        _ => {}
    }
    Some(())
}

/// The flow of the host's own packet quoted by an ICMP error (IP header without options plus
/// at least 8 bytes of TCP, UDP or ICMP echo request), keyed as its replies look.
fn quoted_flow(packet: &[u8], inner: usize, v6: bool) -> Option<FlowKey> {
    if inner > MAX_HEADER_OFFSET {
        return None;
    }
    let (proto, local, remote, l4) = if v6 {
        let header = packet.get(inner..inner + 40)?;
        if header[0] >> 4 != 6 {
            return None;
        }
        let local = Ipv6Addr::from(<[u8; 16]>::try_from(&header[8..24]).unwrap());
        let remote = Ipv6Addr::from(<[u8; 16]>::try_from(&header[24..40]).unwrap());
        (header[6], IpAddr::V6(local), IpAddr::V6(remote), inner + 40)
    } else {
        let header = packet.get(inner..inner + 20)?;
        let header_len = usize::from(header[0] & 0x0f) * 4;
        // Quotes of IPv4 packets with options are not followed.
        if header[0] >> 4 != 4 || header_len != 20 {
            return None;
        }
        let local = Ipv4Addr::new(header[12], header[13], header[14], header[15]);
        let remote = Ipv4Addr::new(header[16], header[17], header[18], header[19]);
        (
            header[9],
            IpAddr::V4(local),
            IpAddr::V4(remote),
            inner + header_len,
        )
    };
    if l4 > MAX_HEADER_OFFSET {
        return None;
    }
    let l4 = packet.get(l4..l4 + 8)?;
    match proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let local_port = u16::from_be_bytes([l4[0], l4[1]]);
            let remote_port = u16::from_be_bytes([l4[2], l4[3]]);
            Some(flow_key(proto, remote, local, remote_port, local_port))
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 if l4[0] == Echo::Request.kind(v6) => Some(flow_key(
            proto,
            remote,
            local,
            0,
            u16::from_be_bytes([l4[4], l4[5]]),
        )),
        _ => None,
    }
}
