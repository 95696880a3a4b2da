//! The reference evaluator: the rule semantics applied directly to frame bytes, written for
//! clarity rather than speed and independently of the map compiler. It is the oracle the
//! kernel is tested against, and the answer to "what would the rules do with this packet".
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use std::collections::HashMap;

use firewall_common::{
    address_words, FlowKey, FlowState, DHCP4_PORTS, DHCP6_PORTS, DHCP_WINDOW_NS, FLOW_CLOSING,
};

use crate::host::link::LinkLayer;
use crate::rules::model::{
    Action, Rule, RuleSet, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
};

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
    /// Essential ICMPv6 (neighbour discovery, MLD, packet too big), passed before the rules.
    Essential,
    /// A reply to a tracked flow, or an ICMP error quoting one, passed before the rules.
    Established,
    /// A DHCP reply on an interface where the host had just sent a DHCP request, passed
    /// before the rules.
    Dhcp,
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
    /// Source port, with `dport`.
    pub sport: Option<u16>,
    /// TCP flags byte.
    pub tcp_flags: u8,
    /// ICMP type and echo identifier (ICMP in IPv4, ICMPv6 in IPv6; not later fragments).
    pub icmp: Option<(u8, u16)>,
    /// For ICMP errors: the flow of the quoted packet, keyed as its replies look.
    pub quoted: Option<FlowKey>,
}

/// The host's tracked flows at one moment, as the kernel's flow map holds them, and when
/// it last sent a DHCP request on each interface.
#[derive(Clone, Debug, Default)]
pub struct FlowTable {
    pub flows: HashMap<FlowKey, FlowState>,
    /// Interface name -> CLOCK_MONOTONIC nanoseconds of the host's last DHCP request there.
    pub dhcp_requests: HashMap<String, u64>,
    /// CLOCK_MONOTONIC now, in nanoseconds.
    pub now_ns: u64,
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
/// the kernel's offsets for the verifier); deeper ones make the packet malformed (and an ICMP
/// error quoting a packet that deep quotes no flow).
pub const MAX_HEADER_OFFSET: usize = 4096;

const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const AUTH: u8 = 51;
const DEST_OPTS: u8 = 60;

/// The verdict with no tracked flows.
pub fn evaluate(rules: &RuleSet, frame: &[u8]) -> Decision {
    evaluate_with_flows(rules, frame, &FlowTable::default())
}

/// The verdict given the host's tracked flows, for a frame arriving on an interface no rule
/// names.
pub fn evaluate_with_flows(rules: &RuleSet, frame: &[u8], flows: &FlowTable) -> Decision {
    evaluate_on(rules, frame, None, flows)
}

/// The verdict for a frame arriving on interface `iface`, given the host's tracked flows.
pub fn evaluate_on(
    rules: &RuleSet,
    frame: &[u8],
    iface: Option<&str>,
    flows: &FlowTable,
) -> Decision {
    evaluate_layer(rules, LinkLayer::Ethernet, frame, iface, flows)
}

/// [`evaluate_on`] for a frame of link layer `layer` (for [`LinkLayer::Ip`], starting at the
/// IP header).
pub fn evaluate_layer(
    rules: &RuleSet,
    layer: LinkLayer,
    frame: &[u8],
    iface: Option<&str>,
    flows: &FlowTable,
) -> Decision {
    let pass = |reason| Decision {
        verdict: Verdict::Pass,
        reason,
    };
    let decision = match parse_frame_on(layer, frame) {
        Parsed::Ip(packet) if rules.essentials && is_essential(&packet) => pass(Reason::Essential),
        Parsed::Ip(packet) if rules.dhcp && is_expected_dhcp_reply(&packet, iface, flows) => {
            pass(Reason::Dhcp)
        }
        Parsed::Ip(packet) if rules.established && is_established(rules, &packet, flows) => {
            pass(Reason::Established)
        }
        Parsed::NonIp => Decision {
            verdict: Verdict::Pass,
            reason: Reason::NonIp,
        },
        Parsed::Malformed => Decision {
            verdict: Verdict::Drop,
            reason: Reason::Malformed,
        },
        Parsed::Ip(packet) => classify_on(rules, &packet, iface),
    };
    if rules.audit {
        // Judged and counted as ever, but passed.
        return pass(decision.reason);
    }
    decision
}

fn is_essential(packet: &PacketInfo) -> bool {
    packet.src.is_ipv6()
        && packet.proto == IPPROTO_ICMPV6
        && matches!(packet.icmp, Some((2 | 130..=137 | 143, _)))
}

/// A DHCP reply (UDP from the server port to the client port of the packet's family)
/// arriving on an interface where the host sent a DHCP request less than a minute ago.
fn is_expected_dhcp_reply(packet: &PacketInfo, iface: Option<&str>, flows: &FlowTable) -> bool {
    let (client, server) = if packet.src.is_ipv6() {
        DHCP6_PORTS
    } else {
        DHCP4_PORTS
    };
    let is_reply =
        packet.proto == IPPROTO_UDP && packet.sport == Some(server) && packet.dport == Some(client);
    let asked = iface
        .and_then(|name| flows.dhcp_requests.get(name))
        .is_some_and(|&sent| flows.now_ns.saturating_sub(sent) < DHCP_WINDOW_NS);
    is_reply && asked
}

/// The key of the flow a packet from `remote` to `local` belongs to.
fn flow_key(
    proto: u8,
    remote: IpAddr,
    local: IpAddr,
    remote_port: u16,
    local_port: u16,
) -> FlowKey {
    FlowKey {
        remote: address_words(remote),
        local: address_words(local),
        remote_port,
        local_port,
        proto,
        v6: u8::from(remote.is_ipv6()),
        _pad: [0; 2],
    }
}

/// The flow an inbound packet answers: TCP/UDP by ports, echo replies by identifier, ICMP
/// errors by the packet they quote.
pub fn inbound_flow(packet: &PacketInfo) -> Option<FlowKey> {
    if packet.quoted.is_some() {
        return packet.quoted;
    }
    // A TCP SYN without ACK opens a connection; it never answers one.
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    if packet.proto == IPPROTO_TCP && packet.tcp_flags & (SYN | ACK) == SYN {
        return None;
    }
    if let (Some(sport), Some(dport)) = (packet.sport, packet.dport) {
        return Some(flow_key(packet.proto, packet.src, packet.dst, sport, dport));
    }
    let echo_reply = if packet.src.is_ipv6() { 129 } else { 0 };
    match packet.icmp {
        Some((kind, id)) if kind == echo_reply => {
            Some(flow_key(packet.proto, packet.src, packet.dst, 0, id))
        }
        _ => None,
    }
}

/// The flow an outbound packet starts or continues, keyed as its replies will look.
pub fn outbound_flow(packet: &PacketInfo) -> Option<FlowKey> {
    if let (Some(sport), Some(dport)) = (packet.sport, packet.dport) {
        return Some(flow_key(packet.proto, packet.dst, packet.src, dport, sport));
    }
    let echo_request = if packet.src.is_ipv6() { 128 } else { 8 };
    match packet.icmp {
        Some((kind, id)) if kind == echo_request => {
            Some(flow_key(packet.proto, packet.dst, packet.src, 0, id))
        }
        _ => None,
    }
}

fn is_established(rules: &RuleSet, packet: &PacketInfo, flows: &FlowTable) -> bool {
    let Some(key) = inbound_flow(packet) else {
        return false;
    };
    let Some(state) = flows.flows.get(&key) else {
        return false;
    };
    let timeout = match key.proto {
        IPPROTO_TCP if state.flags & FLOW_CLOSING != 0 => rules.timeouts.tcp_closing,
        IPPROTO_TCP => rules.timeouts.tcp,
        IPPROTO_UDP => rules.timeouts.udp,
        _ => rules.timeouts.icmp,
    };
    flows.now_ns.saturating_sub(state.last_seen_ns) <= timeout * 1_000_000_000
}

/// First matching rule, else the default policy (interface not named by any rule).
pub fn classify(rules: &RuleSet, packet: &PacketInfo) -> Decision {
    classify_on(rules, packet, None)
}

/// First matching rule for a packet arriving on `iface`, else the default policy.
pub fn classify_on(rules: &RuleSet, packet: &PacketInfo, iface: Option<&str>) -> Decision {
    let verdict = |action| match action {
        Action::Allow => Verdict::Pass,
        Action::Deny => Verdict::Drop,
    };
    let on_iface = |rule: &Rule| match &rule.iface {
        None => true,
        Some(names) => iface.is_some_and(|iface| names.iter().any(|name| name == iface)),
    };
    match rules
        .rules
        .iter()
        .position(|rule| on_iface(rule) && matches(rule, packet))
    {
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
        let is_extension = matches!(next, HOP_BY_HOP | ROUTING | DEST_OPTS | AUTH | FRAGMENT);
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
            let is_error = if v6 {
                (1..=4).contains(&kind)
            } else {
                [3, 11, 12].contains(&kind)
            };
            if is_error {
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
    let echo_request = if v6 { 128 } else { 8 };
    match proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let local_port = u16::from_be_bytes([l4[0], l4[1]]);
            let remote_port = u16::from_be_bytes([l4[2], l4[3]]);
            Some(flow_key(proto, remote, local, remote_port, local_port))
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 if l4[0] == echo_request => Some(flow_key(
            proto,
            remote,
            local,
            0,
            u16::from_be_bytes([l4[4], l4[5]]),
        )),
        _ => None,
    }
}
