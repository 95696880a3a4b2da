//! The reference evaluator: the rule semantics applied directly to frame bytes, written for
//! clarity rather than speed and independently of the map compiler. It is the oracle the
//! kernel is tested against, and the answer to "what would the rules do with this packet".
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::model::{Action, Rule, RuleSet, IPPROTO_TCP, IPPROTO_UDP};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IPv4 or IPv6: always passed.
    NonIp,
    /// A truncated or inconsistent header: always dropped.
    Malformed,
    /// Rule index (0-based) that matched first.
    Rule(usize),
    /// No rule matched.
    Default,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
}

/// The fields rules look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketInfo {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol; for IPv6 the header after the extension headers.
    pub proto: u8,
    /// Destination port of TCP/UDP, `None` for other protocols and non-first fragments.
    pub dport: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    NonIp,
    Malformed,
    Ip(PacketInfo),
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;
const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers followed before the packet counts as malformed.
pub const MAX_EXT_HEADERS: usize = 8;
/// Headers the classifier reads must start within this many bytes of the frame (it bounds
/// the kernel's offsets for the verifier); deeper ones make the packet malformed.
pub const MAX_HEADER_OFFSET: usize = 4096;

const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const AUTH: u8 = 51;
const DEST_OPTS: u8 = 60;

pub fn evaluate(rules: &RuleSet, frame: &[u8]) -> Decision {
    match parse_frame(frame) {
        Parsed::NonIp => Decision {
            verdict: Verdict::Pass,
            reason: Reason::NonIp,
        },
        Parsed::Malformed => Decision {
            verdict: Verdict::Drop,
            reason: Reason::Malformed,
        },
        Parsed::Ip(packet) => classify(rules, &packet),
    }
}

/// First matching rule, else the default policy.
pub fn classify(rules: &RuleSet, packet: &PacketInfo) -> Decision {
    let verdict = |action| match action {
        Action::Allow => Verdict::Pass,
        Action::Deny => Verdict::Drop,
    };
    match rules.rules.iter().position(|rule| matches(rule, packet)) {
        Some(index) => Decision {
            verdict: verdict(rules.rules[index].action),
            reason: Reason::Rule(index),
        },
        None => Decision {
            verdict: verdict(rules.default_policy),
            reason: Reason::Default,
        },
    }
}

pub fn matches(rule: &Rule, packet: &PacketInfo) -> bool {
    let proto_ok = rule.proto.matches(packet.proto);
    let ports_ok = match &rule.ports {
        None => true,
        Some(ranges) => {
            (packet.proto == IPPROTO_TCP || packet.proto == IPPROTO_UDP)
                && packet
                    .dport
                    .is_some_and(|port| ranges.iter().any(|range| range.contains(&port)))
        }
    };
    let in_any = |nets: &Option<Vec<ipnet::IpNet>>, addr: IpAddr| match nets {
        None => true,
        Some(nets) => nets.iter().any(|net| net.contains(&addr)),
    };
    proto_ok && ports_ok && in_any(&rule.from, packet.src) && in_any(&rule.to, packet.dst)
}

fn be16(frame: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]))
}

pub fn parse_frame(frame: &[u8]) -> Parsed {
    parse(frame).unwrap_or(Parsed::Malformed)
}

/// `None` means malformed.
fn parse(frame: &[u8]) -> Option<Parsed> {
    let mut ethertype = be16(frame, 12)?;
    let mut cursor = 14;
    let mut tags = 0;
    while ethertype == ETHERTYPE_VLAN || ethertype == ETHERTYPE_QINQ {
        if tags == MAX_VLAN_TAGS {
            return None;
        }
        ethertype = be16(frame, cursor + 2)?;
        cursor += 4;
        tags += 1;
    }
    match ethertype {
        ETHERTYPE_IPV4 => ipv4(frame, cursor).map(Parsed::Ip),
        ETHERTYPE_IPV6 => ipv6(frame, cursor).map(Parsed::Ip),
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
    let dport = if fragment_offset != 0 {
        None
    } else {
        l4_port(frame, proto, l3 + header_len, ip_end)?
    };
    Some(PacketInfo {
        src,
        dst,
        proto,
        dport,
    })
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
        let is_extension = matches!(next, HOP_BY_HOP | ROUTING | DEST_OPTS | AUTH | FRAGMENT);
        if !is_extension {
            let dport = l4_port(frame, next, offset, ip_end)?;
            return Some(PacketInfo {
                src,
                dst,
                proto: next,
                dport,
            });
        }
        if walked == MAX_EXT_HEADERS || offset > MAX_HEADER_OFFSET {
            return None;
        }
        walked += 1;
        let len = match next {
            FRAGMENT => 8,
            AUTH => (usize::from(*frame.get(offset + 1)?) + 2) * 4,
            _ => (usize::from(*frame.get(offset + 1)?) + 1) * 8,
        };
        if offset + len > ip_end {
            return None;
        }
        let header_next = frame[offset];
        if next == FRAGMENT {
            let fragment_offset = u16::from_be_bytes([frame[offset + 2], frame[offset + 3]]) >> 3;
            if fragment_offset != 0 {
                // A later fragment: the upper-layer header is in the first one.
                return Some(PacketInfo {
                    src,
                    dst,
                    proto: header_next,
                    dport: None,
                });
            }
        }
        next = header_next;
        offset += len;
    }
}

/// `Some(port)` for TCP/UDP, `Some(None)` for other protocols, `None` if the TCP/UDP header
/// does not fit in the IP packet.
fn l4_port(frame: &[u8], proto: u8, l4: usize, ip_end: usize) -> Option<Option<u16>> {
    let header_len = match proto {
        IPPROTO_TCP => 20,
        IPPROTO_UDP => 8,
        _ => return Some(None),
    };
    if l4 + header_len > ip_end || l4 + 2 > MAX_HEADER_OFFSET {
        return None;
    }
    be16(frame, l4 + 2).map(Some)
}
