//! The flow table's key and value, shared by the tc egress program that records flows, the
//! XDP program that lets their replies in, and the daemon.

use crate::PORTS;

/// A flow the host started, keyed as its replies look from the host: `remote` is the peer.
/// ICMP echo flows use `local_port` for the echo identifier and 0 for `remote_port`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Addresses in wire byte order; IPv4 uses word 0.
    pub remote: [u32; 4],
    pub local: [u32; 4],
    pub remote_port: u16,
    pub local_port: u16,
    pub proto: u8,
    pub v6: u8,
    pub _pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the host's last packet of the flow.
    pub last_seen_ns: u64,
    /// `FLOW_CLOSING` once the host sent a FIN or RST; `FLOW_ACCEPTED`.
    pub flags: u32,
    pub _pad: u32,
}

pub const FLOW_CLOSING: u32 = 1;
/// A connection the rules accepted inbound, recorded by the XDP program with outbound
/// filtering on, so that the host's replies pass out. Inbound, such an entry counts for
/// nothing (inbound packets pass by the rules as before); the host's first reply clears the
/// bit (TCP/UDP), making the flow an ordinary tracked one. Echo requests' entries keep it.
pub const FLOW_ACCEPTED: u32 = 2;
/// Flows tracked at once (LRU: the least recently used is evicted).
pub const MAX_FLOWS: u32 = 262_144;

/// The `LOCAL_PORTS` map keeps, per local TCP and UDP port, the tick (`ns >>
/// LOCAL_PORT_TICK_SHIFT`, about a second) of the host's last packet sent from it; 0 means
/// never (the first tick after boot is stored as 1). A reply can only belong to a live flow if
/// its destination port was used that recently, so the XDP program skips the flow lookup for
/// every other port: a flood to a port the host does not send from never pays for it.
pub const LOCAL_PORT_TICK_SHIFT: u32 = 30;
/// The `LOCAL_PORTS` tick of CLOCK_MONOTONIC `now_ns`, never 0 (which means never).
pub const fn local_port_tick(now_ns: u64) -> u32 {
    let tick = (now_ns >> LOCAL_PORT_TICK_SHIFT) as u32;
    if tick == 0 {
        1
    } else {
        tick
    }
}
/// Slot of a local port in `LOCAL_PORTS`: TCP ports first, then UDP.
pub const fn local_port_slot(udp: bool, port: u16) -> u32 {
    (udp as u32) * PORTS + port as u32
}
/// Ticks a port stays in use past its flows' idle timeout: the tick is cut down from the
/// flow's own clock, and the XDP program reads a coarser clock that lags it.
pub const LOCAL_PORT_SLACK_TICKS: u32 = 2;
