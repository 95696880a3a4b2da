//! DHCP client essentials: a host that configures an interface by DHCP sends its requests to
//! a broadcast or multicast address, and the server's replies (from the server's own address)
//! match no tracked flow. The tc egress program notes when the host sent a request on an
//! interface; for a short while after, the XDP program lets DHCP replies in on that
//! interface before the rules.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use firewall_common::{proto::IPPROTO_UDP, DHCP4_PORTS, DHCP6_PORTS, DHCP_WINDOW_NS};

use crate::{maps::DHCP_REQUESTS, parse::Packet};

/// The (source, destination) ports of a DHCP request and of a reply, for the family.
#[inline(always)]
fn ports(v6: bool) -> (u16, u16) {
    if v6 {
        DHCP6_PORTS
    } else {
        DHCP4_PORTS
    }
}

/// Whether an outbound packet is a DHCP request (client port to server port).
#[inline(always)]
pub fn is_request(packet: &Packet) -> bool {
    let (client, server) = ports(packet.v6);
    packet.proto == IPPROTO_UDP && packet.dport() == Some(server) && packet.sport == client
}

/// Records an outbound DHCP request on interface `ifindex` (called from tc egress).
#[inline(always)]
pub fn record_request(packet: &Packet, ifindex: u32) {
    if !is_request(packet) {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let _ = DHCP_REQUESTS.insert(ifindex, now, 0);
}

/// Whether an inbound packet is a DHCP reply on an interface where the host asked recently.
#[inline(always)]
pub fn is_expected_reply(packet: &Packet, ifindex: u32) -> bool {
    let (client, server) = ports(packet.v6);
    if packet.proto != IPPROTO_UDP || packet.dport() != Some(client) || packet.sport != server {
        return false;
    }
    // SAFETY: a value of the map, read once.
    let Some(&sent) = (unsafe { DHCP_REQUESTS.get(ifindex) }) else {
        return false;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    now.saturating_sub(sent) < DHCP_WINDOW_NS
}
