//! The reference evaluator's outbound side: what the tc egress program decides about a
//! packet the host sends, and what it records, restated from the rules' meaning.
use firewall_common::proto::{Echo, IPPROTO_TCP, IPPROTO_UDP};
use firewall_common::{FlowKey, DHCP4_PORTS, DHCP6_PORTS, FLOW_CLOSING};

use super::{
    classify_direction, is_essential, own_flow, parse_frame_on, Decision, FlowTable, PacketInfo,
    Parsed, Reason, Verdict,
};
use crate::host::link::LinkLayer;
use crate::rules::model::{Direction, RuleSet};

/// The connection an inbound packet opens or continues, keyed as the host's replies to it
/// look: TCP/UDP by ports (a SYN too), echo requests by identifier.
pub fn accepted_flow(packet: &PacketInfo) -> Option<FlowKey> {
    own_flow(packet, false, Echo::Request)
}

/// Whether tracked flow `key` was seen within its idle timeout.
pub fn is_live(rules: &RuleSet, flows: &FlowTable, key: &FlowKey) -> bool {
    let Some(state) = flows.flows.get(key) else {
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

/// The flow an outbound packet belongs to, keyed as its replies look; the host's echo
/// replies as the request they answer.
pub fn egress_flow(packet: &PacketInfo) -> Option<FlowKey> {
    own_flow(packet, true, Echo::Request).or_else(|| own_flow(packet, true, Echo::Reply))
}

fn is_dhcp_request(packet: &PacketInfo) -> bool {
    let (client, server) = if packet.src.is_ipv6() {
        DHCP6_PORTS
    } else {
        DHCP4_PORTS
    };
    packet.proto == IPPROTO_UDP && packet.sport == Some(client) && packet.dport == Some(server)
}

/// The verdict on a frame of link layer `layer` the host sends by interface `iface`, and
/// what that does to `flows` (the tc egress program's part). Without outbound filtering
/// every frame passes and every IP packet is recorded, as the host's flow. With it: non-IP
/// passes; malformed is dropped; essential ICMPv6, DHCP requests and packets of live tracked
/// flows (the host's own, or connections it accepted) pass; then the first out rule, else
/// the outbound default. Only what passes is recorded; audit mode passes everything.
pub fn evaluate_egress(
    rules: &RuleSet,
    layer: LinkLayer,
    frame: &[u8],
    iface: Option<&str>,
    flows: &mut FlowTable,
) -> Decision {
    let pass = |reason| Decision {
        verdict: Verdict::Pass,
        reason,
    };
    let parsed = parse_frame_on(layer, frame);
    if !rules.filters_outbound() {
        if let Parsed::Ip(packet) = &parsed {
            flows.record_outbound(packet);
            record_dhcp_request(flows, packet, iface);
        }
        return pass(Reason::Default);
    }
    let packet = match parsed {
        Parsed::NonIp => return pass(Reason::NonIp),
        Parsed::Malformed if rules.audit => return pass(Reason::Malformed),
        Parsed::Malformed => {
            return Decision {
                verdict: Verdict::Drop,
                reason: Reason::Malformed,
            }
        }
        Parsed::Ip(packet) => packet,
    };
    let key = egress_flow(&packet);
    let mut decision = if rules.essentials && is_essential(&packet) {
        pass(Reason::Essential)
    } else if rules.dhcp && is_dhcp_request(&packet) {
        pass(Reason::Dhcp)
    } else if key.is_some_and(|key| is_live(rules, flows, &key)) {
        pass(Reason::Established)
    } else {
        classify_direction(rules, &packet, iface, Direction::Out)
    };
    if rules.audit {
        decision.verdict = Verdict::Pass;
    }
    if decision.verdict == Verdict::Pass {
        if let Some(key) = key {
            record_egress(flows, &packet, key);
        }
        record_dhcp_request(flows, &packet, iface);
    }
    decision
}

/// The host sent `packet` of flow `key` with outbound filtering on: as
/// [`FlowTable::record_outbound`], but an echo reply only refreshes the entry of the request
/// it answers (which stays an accepted one) and creates none.
fn record_egress(flows: &mut FlowTable, packet: &PacketInfo, key: FlowKey) {
    let echo_reply = packet
        .icmp
        .is_some_and(|(kind, _)| kind == Echo::Reply.kind(packet.src.is_ipv6()));
    if echo_reply {
        let now_ns = flows.now_ns;
        if let Some(state) = flows.flows.get_mut(&key) {
            state.last_seen_ns = now_ns;
        }
        return;
    }
    flows.record_outbound(packet);
}

fn record_dhcp_request(flows: &mut FlowTable, packet: &PacketInfo, iface: Option<&str>) {
    if let Some(iface) = iface.filter(|_| is_dhcp_request(packet)) {
        flows.dhcp_requests.insert(iface.to_string(), flows.now_ns);
    }
}
