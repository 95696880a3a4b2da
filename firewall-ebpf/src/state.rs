//! Connection state: the tc egress program records the host's own flows; the XDP program lets
//! their replies, and ICMP errors quoting them, in before the rules (like nftables'
//! `ct state established,related`). Timeouts are idle times since the host's last packet of
//! the flow; the host's own FIN or RST switches TCP to the closing timeout.
//!
//! Only the host's FIN/RST counts, never the peer's: the XDP program sees a packet before the
//! host's TCP stack has checked its sequence number, so an off-path sender that knows (or
//! guesses) the addresses and ports could otherwise shorten any of the host's flows with a
//! blind RST. Egress sees only what the host's stack sends. The cost: a flow the peer resets
//! keeps its long timeout (or until the LRU evicts it), admitting only packets from that
//! peer's address and port to that local port, which the host's stack then answers with RST.
use aya_ebpf::bindings::BPF_NOEXIST;
use aya_ebpf::helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use firewall_common::proto::{Echo, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use firewall_common::{
    local_port_slot, local_port_tick, FlowKey, FlowState, GenerationConfig, FLOW_ACCEPTED,
    FLOW_CLOSING, LOCAL_PORT_SLACK_TICKS, LOCAL_PORT_TICK_SHIFT,
};

use crate::{
    maps::{FLOWS, LOCAL_PORTS},
    parse::Packet,
};

#[inline(always)]
fn key(packet: &Packet, remote: [u32; 4], local: [u32; 4]) -> FlowKey {
    FlowKey {
        remote,
        local,
        remote_port: 0,
        local_port: 0,
        proto: packet.proto,
        v6: packet.v6 as u8,
        _pad: [0; 2],
    }
}

/// The flow an outbound packet belongs to, keyed as its replies will look. With
/// `echo_replies`, the host's echo replies too: keyed as the request they answer was (see
/// [`accepted_key`]).
#[inline(always)]
pub fn outbound_key(packet: &Packet, echo_replies: bool) -> Option<FlowKey> {
    let mut key = key(packet, packet.dst, packet.src);
    if let Some(dport) = packet.dport() {
        key.remote_port = dport;
        key.local_port = packet.sport;
        return Some(key);
    }
    let icmp = packet.icmp()?;
    let request = icmp.kind == Echo::Request.kind(packet.v6);
    let reply = echo_replies && icmp.kind == Echo::Reply.kind(packet.v6);
    if !(request || reply) {
        return None;
    }
    key.local_port = icmp.id;
    Some(key)
}

/// Whether the packet is an ICMP echo reply (ICMPv6's in IPv6).
#[inline(always)]
pub fn is_echo_reply(packet: &Packet) -> bool {
    packet
        .icmp()
        .is_some_and(|icmp| icmp.kind == Echo::Reply.kind(packet.v6))
}

/// The flow of an arriving packet, keyed as the host's packets of it are on egress (the
/// mirror image of [`outbound_key`]): TCP/UDP by ports, ICMP echoes of kind `echo` by
/// identifier.
#[inline(always)]
fn arriving_key(packet: &Packet, echo: Echo) -> Option<FlowKey> {
    let mut key = key(packet, packet.src, packet.dst);
    if let Some(dport) = packet.dport() {
        key.remote_port = packet.sport;
        key.local_port = dport;
        return Some(key);
    }
    let icmp = packet.icmp()?;
    if icmp.kind != echo.kind(packet.v6) {
        return None;
    }
    key.local_port = icmp.id;
    Some(key)
}

/// The connection an inbound packet opens or continues (an echo request: the exchange it
/// starts).
#[inline(always)]
fn accepted_key(packet: &Packet) -> Option<FlowKey> {
    arriving_key(packet, Echo::Request)
}

/// Records a connection the rules accepted inbound (outbound filtering on), unless its flow
/// is tracked already: the host's replies to it then pass out.
#[inline(always)]
pub fn record_accepted(packet: &Packet) {
    let Some(key) = accepted_key(packet) else {
        return;
    };
    let state = FlowState {
        last_seen_ns: unsafe { bpf_ktime_get_ns() },
        flags: FLOW_ACCEPTED,
        _pad: 0,
    };
    let _ = FLOWS.insert(key, state, BPF_NOEXIST as u64);
}

/// Whether flow `key`, in `state`, is still alive at `now` (idle no longer than its timeout).
#[inline(always)]
fn is_live(config: &GenerationConfig, key: &FlowKey, state: &FlowState, now: u64) -> bool {
    let timeout = match key.proto {
        IPPROTO_TCP if state.flags & FLOW_CLOSING != 0 => config.tcp_closing_timeout_ns,
        IPPROTO_TCP => config.tcp_timeout_ns,
        IPPROTO_UDP => config.udp_timeout_ns,
        _ => config.icmp_timeout_ns,
    };
    now.saturating_sub(state.last_seen_ns) <= timeout
}

/// With outbound filtering: whether outbound flow `key` is tracked and alive (the host's
/// own, or one it accepted); if so, the packet refreshes it as [`record_outbound`] would, in
/// the same lookup. `own` as `insert` there.
#[inline(always)]
pub fn pass_tracked(config: &GenerationConfig, packet: &Packet, key: FlowKey, own: bool) -> bool {
    let Some(state) = FLOWS.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: a value of the map; concurrent writers store whole words.
    let state = unsafe { &mut *state };
    let now = unsafe { bpf_ktime_get_ns() };
    if !is_live(config, &key, state, now) {
        return false;
    }
    stamp_if_ported(&key, now);
    refresh(state, packet, &key, now, own);
    true
}

/// The flow an inbound packet would reply to (for an ICMP error, the flow it quotes from the
/// frame between `start` and `end`).
#[inline(always)]
fn inbound_key(packet: &Packet, start: usize, end: usize) -> Option<FlowKey> {
    if packet.has_quote() {
        return crate::parse::quoted_flow(start, end, packet);
    }
    // A TCP SYN without ACK opens a connection: it is never a reply, so skip the lookup.
    if packet.proto == IPPROTO_TCP && packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        return None;
    }
    arriving_key(packet, Echo::Reply)
}

/// Records an outbound packet of flow `key` (called from the tc egress program). Without
/// `insert` (the host's echo replies) only an existing entry is refreshed.
#[inline(always)]
pub fn record_outbound(packet: &Packet, key: FlowKey, insert: bool) {
    let now = unsafe { bpf_ktime_get_ns() };
    stamp_if_ported(&key, now);
    if let Some(state) = FLOWS.get_ptr_mut(key) {
        // SAFETY: a value of the map; concurrent writers store whole words.
        refresh(unsafe { &mut *state }, packet, &key, now, insert);
        return;
    }
    if !insert {
        return;
    }
    let state = FlowState {
        last_seen_ns: now,
        flags: if closes(packet, &key) {
            FLOW_CLOSING
        } else {
            0
        },
        _pad: 0,
    };
    let _ = FLOWS.insert(key, state, 0);
}

/// Whether the host's packet closes its TCP connection (FIN or RST).
#[inline(always)]
fn closes(packet: &Packet, key: &FlowKey) -> bool {
    key.proto == IPPROTO_TCP && packet.tcp_flags & (TCP_FIN | TCP_RST) != 0
}

/// An existing flow's entry after an outbound packet of it at `now`; `own` (not an echo reply
/// to an accepted request) makes an accepted connection an ordinary flow.
#[inline(always)]
fn refresh(state: &mut FlowState, packet: &Packet, key: &FlowKey, now: u64, own: bool) {
    state.last_seen_ns = now;
    if own {
        state.flags &= !FLOW_ACCEPTED;
    }
    if closes(packet, key) {
        state.flags |= FLOW_CLOSING;
    } else if packet.tcp_flags & TCP_SYN != 0 {
        // A new connection reusing the ports.
        state.flags &= !FLOW_CLOSING;
    }
}

/// Stamps a TCP/UDP flow's local port (before its entry is written: see [`stamp_local_port`]).
#[inline(always)]
fn stamp_if_ported(key: &FlowKey, now: u64) {
    if key.proto == IPPROTO_TCP || key.proto == IPPROTO_UDP {
        stamp_local_port(key.proto == IPPROTO_UDP, key.local_port, now);
    }
}

/// Marks `port` as used by the host at `now_ns` (before the flow is written, so that no
/// reply finds the flow but not its port).
#[inline(always)]
fn stamp_local_port(udp: bool, port: u16, now_ns: u64) {
    let tick = local_port_tick(now_ns);
    if let Some(stamp) = LOCAL_PORTS.get_ptr_mut(local_port_slot(udp, port)) {
        // SAFETY: a value of the map; a u32 store is atomic. Written once a tick at most, so
        // that busy ports do not bounce the cache line between CPUs.
        unsafe {
            if *stamp != tick {
                *stamp = tick;
            }
        }
    }
}

/// Whether the host sent from local TCP/UDP `port` recently enough for a flow of it to be
/// alive: if not, no flow lookup can succeed.
#[inline(always)]
fn local_port_in_use(config: &GenerationConfig, udp: bool, port: u16) -> bool {
    let stamp = match LOCAL_PORTS.get(local_port_slot(udp, port)) {
        Some(0) => return false,
        Some(&stamp) => stamp,
        None => return true,
    };
    let timeout_ns = if udp {
        config.udp_timeout_ns
    } else if config.tcp_timeout_ns > config.tcp_closing_timeout_ns {
        config.tcp_timeout_ns
    } else {
        config.tcp_closing_timeout_ns
    };
    // The coarse clock lags the one the stamp came from: a stamp "from the future" is now.
    let now = (unsafe { bpf_ktime_get_coarse_ns() } >> LOCAL_PORT_TICK_SHIFT) as u32;
    let idle = now.saturating_sub(stamp);
    idle <= (timeout_ns >> LOCAL_PORT_TICK_SHIFT) as u32 + LOCAL_PORT_SLACK_TICKS
}

/// Whether an inbound packet replies to (or is an ICMP error about) a live tracked flow;
/// `start` and `end` are the packet pointers it was parsed from.
#[inline(always)]
pub fn is_established(
    config: &GenerationConfig,
    packet: &Packet,
    start: usize,
    end: usize,
) -> bool {
    let Some(key) = inbound_key(packet, start, end) else {
        return false;
    };
    // TCP/UDP flows (also when an ICMP error quotes one): is their local port in use at all?
    if (key.proto == IPPROTO_TCP || key.proto == IPPROTO_UDP)
        && !local_port_in_use(config, key.proto == IPPROTO_UDP, key.local_port)
    {
        return false;
    }
    // Read only: no inbound packet changes a flow (see the module comment).
    // SAFETY: a value of the map, copied out.
    let Some(state) = (unsafe { FLOWS.get(key) }) else {
        return false;
    };
    // A connection accepted inbound that the host has not answered yet is not established:
    // its packets pass by the rules, as without outbound filtering.
    state.flags & FLOW_ACCEPTED == 0 && is_live(config, &key, state, unsafe { bpf_ktime_get_ns() })
}
