//! The reference evaluator: the rule semantics applied directly to frame bytes, written for
//! clarity rather than speed and independently of the map compiler. It is the oracle the
//! kernel is tested against, and the answer to "what would the rules do with this packet".
//!
//! It restates the rule semantics (parsing, the checks before the rules, first match) on
//! purpose rather than sharing code with the XDP program or the compiler: a mistake in one
//! then shows up as a disagreement in the differential test instead of in both. Protocol
//! facts (numbers, ICMP types) come from [`firewall_common::proto`] like everywhere else.
use std::collections::HashMap;
use std::net::IpAddr;

use firewall_common::proto::{
    is_essential_icmpv6, Echo, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST,
    TCP_SYN,
};
use firewall_common::{
    address_words, FlowKey, FlowState, DHCP4_PORTS, DHCP6_PORTS, DHCP_WINDOW_NS, FLOW_ACCEPTED,
    FLOW_CLOSING,
};

use crate::host::link::LinkLayer;
use crate::rules::model::{Action, Direction, Rule, RuleSet};

mod egress;
mod frame;
pub use egress::{accepted_flow, egress_flow, evaluate_egress, is_live};
pub use frame::{parse_frame, parse_frame_on, PacketInfo, Parsed};

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
    /// Outbound: a packet of a tracked flow (the host's own, or a connection it accepted).
    Established,
    /// A DHCP reply on an interface where the host had just sent a DHCP request, passed
    /// before the rules. Outbound: the host's DHCP request.
    Dhcp,
    /// Rule index (0-based) that matched first.
    Rule(usize),
    /// No rule of the packet's direction matched (outbound: also when outbound packets are
    /// not filtered at all).
    Default,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
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

impl FlowTable {
    /// What the host sending `packet` does to the table (the tc egress program's part):
    /// the flow is seen now; TCP's FIN or RST starts its closing timeout, a SYN (a new
    /// connection on the same ports) ends it; a connection the host accepted becomes its own
    /// flow. Inbound packets change nothing, not even the
    /// peer's FIN or RST: that could be an off-path sender's guess (a blind RST).
    pub fn record_outbound(&mut self, packet: &PacketInfo) {
        let Some(key) = outbound_flow(packet) else {
            return;
        };
        let closing = packet.proto == IPPROTO_TCP && packet.tcp_flags & (TCP_FIN | TCP_RST) != 0;
        let reopened = packet.tcp_flags & TCP_SYN != 0;
        let state = self.flows.entry(key).or_default();
        state.last_seen_ns = self.now_ns;
        // A connection accepted inbound is the host's own flow once it answers.
        state.flags &= !FLOW_ACCEPTED;
        if closing {
            state.flags |= FLOW_CLOSING;
        } else if reopened {
            state.flags &= !FLOW_CLOSING;
        }
    }
}

impl FlowTable {
    /// What the XDP program does to the table with outbound filtering on: a connection the
    /// rules allowed inbound (`decision` on `packet`, before audit mode's pass) is recorded
    /// as accepted unless its flow is tracked already, so that the host's replies pass out.
    pub fn record_accepted(&mut self, rules: &RuleSet, packet: &PacketInfo, decision: Decision) {
        let allowed = match decision.reason {
            Reason::Rule(index) => rules.rules[index].action == Action::Allow,
            Reason::Default => rules.default_policy == Action::Allow,
            _ => false,
        };
        if !rules.filters_outbound() || !allowed {
            return;
        }
        if let Some(key) = accepted_flow(packet) {
            let now_ns = self.now_ns;
            self.flows.entry(key).or_insert(FlowState {
                last_seen_ns: now_ns,
                flags: FLOW_ACCEPTED,
                _pad: 0,
            });
        }
    }
}

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
        && packet
            .icmp
            .is_some_and(|(kind, _)| is_essential_icmpv6(kind))
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
    if packet.proto == IPPROTO_TCP && packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        return None;
    }
    own_flow(packet, false, Echo::Reply)
}

/// The flow an outbound packet starts or continues, keyed as its replies will look.
pub fn outbound_flow(packet: &PacketInfo) -> Option<FlowKey> {
    own_flow(packet, true, Echo::Request)
}

/// The host's flow `packet` belongs to, sent by the host if `outbound`: TCP/UDP by ports,
/// ICMP `echo` messages by identifier.
pub(crate) fn own_flow(packet: &PacketInfo, outbound: bool, echo: Echo) -> Option<FlowKey> {
    let (remote, local) = if outbound {
        (packet.dst, packet.src)
    } else {
        (packet.src, packet.dst)
    };
    if let (Some(sport), Some(dport)) = (packet.sport, packet.dport) {
        let (remote_port, local_port) = if outbound {
            (dport, sport)
        } else {
            (sport, dport)
        };
        return Some(flow_key(
            packet.proto,
            remote,
            local,
            remote_port,
            local_port,
        ));
    }
    match packet.icmp {
        Some((kind, id)) if kind == echo.kind(packet.src.is_ipv6()) => {
            Some(flow_key(packet.proto, remote, local, 0, id))
        }
        _ => None,
    }
}

/// A reply to a live flow of the host's. A connection accepted inbound and not answered yet
/// is no such flow: its packets go on to the rules.
fn is_established(rules: &RuleSet, packet: &PacketInfo, flows: &FlowTable) -> bool {
    let Some(key) = inbound_flow(packet) else {
        return false;
    };
    flows
        .flows
        .get(&key)
        .is_some_and(|state| state.flags & FLOW_ACCEPTED == 0 && is_live(rules, flows, &key))
}

/// First matching rule, else the default policy (interface not named by any rule).
pub fn classify(rules: &RuleSet, packet: &PacketInfo) -> Decision {
    classify_on(rules, packet, None)
}

/// First matching rule for a packet arriving on `iface`, else the default policy.
pub fn classify_on(rules: &RuleSet, packet: &PacketInfo, iface: Option<&str>) -> Decision {
    classify_direction(rules, packet, iface, Direction::In)
}

/// First matching rule of `direction` for a packet arriving on (`In`) or leaving by (`Out`)
/// `iface`, else that direction's default.
pub fn classify_direction(
    rules: &RuleSet,
    packet: &PacketInfo,
    iface: Option<&str>,
    direction: Direction,
) -> Decision {
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
        .position(|rule| rule.direction == direction && on_iface(rule) && matches(rule, packet))
    {
        Some(index) => Decision {
            verdict: verdict(rules.rules[index].action),
            reason: Reason::Rule(index),
        },
        None => Decision {
            verdict: verdict(match direction {
                Direction::In => rules.default_policy,
                Direction::Out => rules.outbound_policy,
            }),
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
    // The parser reads ICMP types only from ICMP in IPv4 and ICMPv6 in IPv6, and not from
    // later fragments: any other packet has no type a list could hold.
    let types_ok = match &rule.icmp_types {
        None => true,
        Some(types) => packet.icmp.is_some_and(|(kind, _)| types.contains(&kind)),
    };
    let in_any = |nets: &Option<Vec<ipnet::IpNet>>, addr: IpAddr| match nets {
        None => true,
        Some(nets) => nets.iter().any(|net| net.contains(&addr)),
    };
    proto_ok
        && ports_ok
        && types_ok
        && in_any(&rule.from, packet.src)
        && in_any(&rule.to, packet.dst)
}
