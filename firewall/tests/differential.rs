//! Differential test: the XDP program (through BPF_PROG_TEST_RUN on the real kernel) and the
//! reference evaluator must give the same verdict for every packet under random rule sets.
//!
//! Rules include ICMP and ICMPv6 rules with `icmp_types`, and ports equal to ICMP types.
//! Frames are drawn to hit the parser's edges: VLAN stacks (up to three tags), IPv4 options,
//! fragments, IPv6 extension-header chains (up to nine), truncations and corrupted bytes, with
//! addresses and ports from small pools so that rules and packets overlap. A quarter of the
//! frames start at the IP header (as on tun, WireGuard, PPP and ipip) and go through the
//! L3 program. Set `FW_SEED` to
//! replay a run, `FW_PACKETS` to change its length and `FW_RULE_SETS` the number of small rule
//! sets it is spread over.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;

use firewall::analysis::reference::{
    egress_flow, evaluate_egress, evaluate_layer, inbound_flow, parse_frame_on, FlowTable,
    PacketInfo, Parsed, Reason, Verdict,
};
use firewall::dataplane::monotonic_now_ns;
use firewall::dataplane::Kernel;
use firewall::host::link::LinkLayer;
use firewall::rules::compile::{compile_with_budget, EXACT_BUDGET};
use firewall::rules::model::{Action, Direction, Proto, Rule, RuleSet};
use firewall::testing::packet::{xdp_action, XDP_PASS};
use firewall_common::proto::IPPROTO_TCP;
use firewall_common::{FlowKey, FlowState, FLOW_ACCEPTED, FLOW_CLOSING};
use ipnet::IpNet;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ETH_HLEN: usize = 14;

const V4_POOL: &[[u8; 4]] = &[
    [10, 1, 2, 3],
    [10, 1, 2, 200],
    [10, 9, 0, 1],
    [192, 168, 1, 77],
    [8, 8, 8, 8],
    [0, 0, 0, 0],
    [255, 255, 255, 255],
];
const V6_POOL: &[[u16; 8]] = &[
    [0x2001, 0xdb8, 0, 0, 0, 0, 0, 1],
    [0x2001, 0xdb8, 1, 0, 0, 0, 0, 5],
    [0x2001, 0xdb9, 0, 0, 0, 0, 0, 1],
    [0xfe80, 0, 0, 0, 0, 0, 0, 1],
    [0, 0, 0, 0, 0, 0, 0, 1],
    [0xffff; 8],
];
/// Ports, among them ICMP and ICMPv6 type numbers (3, 8, 128, 135): a port rule must never
/// match an ICMP message whose type equals its port.
const PORT_POOL: &[u16] = &[
    1, 3, 8, 22, 53, 67, 68, 80, 128, 135, 443, 546, 547, 999, 1000, 2000, 2001, 8080, 65535,
];
/// ICMP and ICMPv6 types for `icmp_types`: echo, errors, neighbour discovery.
const ICMP_TYPE_POOL: &[u8] = &[0, 1, 2, 3, 4, 8, 11, 12, 128, 129, 133, 135, 136];

fn pool_addr(rng: &mut StdRng, v6: bool) -> IpAddr {
    if v6 {
        let mut words = V6_POOL[rng.gen_range(0..V6_POOL.len())];
        if rng.gen_bool(0.3) {
            words[7] ^= rng.gen::<u16>();
        }
        IpAddr::V6(Ipv6Addr::from(words))
    } else {
        let mut octets = V4_POOL[rng.gen_range(0..V4_POOL.len())];
        if rng.gen_bool(0.3) {
            octets[3] ^= rng.gen::<u8>();
        }
        IpAddr::V4(Ipv4Addr::from(octets))
    }
}

fn random_net(rng: &mut StdRng) -> IpNet {
    let v6 = rng.gen_bool(0.4);
    let addr = pool_addr(rng, v6);
    let max = if v6 { 128 } else { 32 };
    let len = match rng.gen_range(0..4) {
        0 => max,
        1 => 0,
        _ => rng.gen_range(0..=max),
    };
    IpNet::new(addr, len).unwrap().trunc()
}

fn random_port(rng: &mut StdRng) -> u16 {
    let port = PORT_POOL[rng.gen_range(0..PORT_POOL.len())];
    match rng.gen_range(0..6) {
        0 => port.saturating_add(1),
        1 => port.saturating_sub(1).max(1),
        2 => rng.gen_range(1..=u16::MAX),
        _ => port,
    }
}

fn random_rule(rng: &mut StdRng, index: usize) -> Rule {
    let proto = [
        Proto::Any,
        Proto::Tcp,
        Proto::Udp,
        Proto::Icmp,
        Proto::Icmpv6,
    ][rng.gen_range(0..5)];
    let nets = |rng: &mut StdRng| {
        rng.gen_bool(0.5)
            .then(|| (0..rng.gen_range(1..=3)).map(|_| random_net(rng)).collect())
    };
    let ports_allowed = !matches!(proto, Proto::Icmp | Proto::Icmpv6);
    let ports = (ports_allowed && rng.gen_bool(0.5)).then(|| {
        (0..rng.gen_range(1..=3))
            .map(|_| {
                let a = random_port(rng);
                let b = if rng.gen_bool(0.5) {
                    a
                } else {
                    random_port(rng)
                };
                a.min(b)..=a.max(b)
            })
            .collect::<Vec<RangeInclusive<u16>>>()
    });
    // Mostly types of the pool, a few edges or anything.
    let icmp_types = (!ports_allowed && rng.gen_bool(0.6)).then(|| {
        let mut types: Vec<u8> = (0..rng.gen_range(1..=3))
            .map(|_| match rng.gen_range(0..8) {
                0 => rng.gen(),
                1 => [0, 255][rng.gen_range(0..2)],
                _ => ICMP_TYPE_POOL[rng.gen_range(0..ICMP_TYPE_POOL.len())],
            })
            .collect();
        types.sort_unstable();
        types.dedup();
        types
    });
    Rule {
        name: format!("rule {}", index + 1),
        // A third are out rules, judged by the egress program.
        direction: if rng.gen_bool(0.3) {
            Direction::Out
        } else {
            Direction::In
        },
        action: if rng.gen_bool(0.5) {
            Action::Allow
        } else {
            Action::Deny
        },
        proto,
        from: nets(rng),
        to: nets(rng),
        ports,
        icmp_types,
        comment: None,
        // BPF_PROG_TEST_RUN delivers frames on the loopback device: rules on "lo" apply,
        // rules on an interface that does not exist never do.
        iface: rng.gen_bool(0.2).then(|| match rng.gen_range(0..3) {
            0 => vec!["lo".to_string()],
            1 => vec!["nope0".to_string()],
            _ => vec!["nope0".to_string(), "lo".to_string()],
        }),
        // Rate limits depend on time, which the reference does not model: the packet tests
        // cover them.
        limit: None,
        // Logging does not change verdicts, but runs on the same path.
        log: rng.gen_bool(0.3),
    }
}

fn random_rule_set(rng: &mut StdRng, max_rules: usize) -> RuleSet {
    let count = rng.gen_range(0..=max_rules);
    let default_policy = if rng.gen_bool(0.5) {
        Action::Allow
    } else {
        Action::Deny
    };
    let mut set = RuleSet::new(
        default_policy,
        (0..count).map(|i| random_rule(rng, i)).collect(),
    );
    set.established = rng.gen_bool(0.8);
    set.essentials = rng.gen_bool(0.8);
    set.dhcp = rng.gen_bool(0.8);
    set.audit = rng.gen_bool(0.05);
    if rng.gen_bool(0.3) {
        set.outbound_policy = Action::Deny;
    }
    // Short timeouts, so that expired flows (twice the longest timeout old) are at most a few
    // minutes old.
    let longest = longest_timeout();
    set.timeouts.tcp = rng.gen_range(10..longest);
    set.timeouts.tcp_closing = rng.gen_range(5..10);
    set.timeouts.udp = rng.gen_range(10..longest);
    set.timeouts.icmp = rng.gen_range(10..longest);
    set
}

/// The longest flow timeout (exclusive) for random rule sets: 100 s, or less on a machine up
/// for less than 201 s (a test VM), where a flow twice as old cannot exist, after waiting for
/// it to be up for a minute. Replays (`FW_SEED`) are exact between machines up long enough.
fn longest_timeout() -> u64 {
    const SECOND: u64 = 1_000_000_000;
    while monotonic_now_ns() < 60 * SECOND {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    (monotonic_now_ns() / SECOND / 2).min(100)
}

/// ICMP errors (v4: unreachable, time exceeded, parameter problem; v6: 1-4) quoting a packet,
/// echo replies, essential ICMPv6, or other types.
fn icmp_message(rng: &mut StdRng, v6: bool) -> Vec<u8> {
    let kind = match (v6, rng.gen_range(0..6)) {
        (false, 0) => 3,
        (false, 1) => 11,
        (false, 2) => 12,
        (true, 0..=2) => rng.gen_range(1..=4),
        (false, 3) => 0,
        (true, 3) => 129,
        (true, 4) => [133, 134, 135, 136, 137, 143, 130][rng.gen_range(0..7)],
        _ => rng.gen(),
    };
    let mut icmp = vec![kind, 0, 0, 0];
    icmp.extend_from_slice(&rng.gen::<[u8; 4]>());
    // Errors quote the offending packet: usually its IP header and 8 bytes, sometimes less.
    if rng.gen_bool(0.6) {
        let quoted = if v6 {
            ipv6_packet(rng)
        } else {
            ipv4_packet(rng)
        };
        let keep = rng.gen_range(0..=quoted.len()).max(quoted.len().min(48));
        icmp.extend_from_slice(&quoted[..keep]);
    }
    icmp
}

fn push16(frame: &mut Vec<u8>, value: u16) {
    frame.extend_from_slice(&value.to_be_bytes());
}

/// An L4 header (and a little payload) for `proto`.
fn l4_bytes(rng: &mut StdRng, proto: u8) -> Vec<u8> {
    let mut l4 = Vec::new();
    match proto {
        6 => {
            push16(&mut l4, random_port(rng));
            push16(&mut l4, random_port(rng));
            l4.extend_from_slice(&[0; 8]);
            let flags = [0x02, 0x12, 0x10, 0x11, 0x04, 0x18][rng.gen_range(0..6)];
            l4.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        }
        // DHCP replies and requests of either family (in a packet of either family).
        17 if rng.gen_bool(0.15) => {
            let (sport, dport) = [(67, 68), (547, 546), (68, 67), (546, 547)][rng.gen_range(0..4)];
            push16(&mut l4, sport);
            push16(&mut l4, dport);
            l4.extend_from_slice(&[0, 8, 0, 0]);
        }
        17 => {
            push16(&mut l4, random_port(rng));
            push16(&mut l4, random_port(rng));
            l4.extend_from_slice(&[0, 8, 0, 0]);
        }
        1 | 58 if rng.gen_bool(0.5) => return icmp_message(rng, proto == 58),
        _ => {
            let kind = match rng.gen_range(0..4) {
                0 | 1 => [8, 0, 128, 129][rng.gen_range(0..4)],
                2 => ICMP_TYPE_POOL[rng.gen_range(0..ICMP_TYPE_POOL.len())],
                _ => rng.gen(),
            };
            l4.extend_from_slice(&[kind, 0, 0, 0, 0, rng.gen_range(0..3), 0, 1]);
        }
    }
    let payload = rng.gen_range(0..16);
    l4.extend((0..payload).map(|_| rng.gen::<u8>()));
    l4
}

fn random_proto(rng: &mut StdRng) -> u8 {
    match rng.gen_range(0..10) {
        0..=2 => 6,
        3..=5 => 17,
        6 => 1,
        7 => 58,
        8 => 47,
        _ => rng.gen(),
    }
}

fn ipv4_packet(rng: &mut StdRng) -> Vec<u8> {
    let proto = random_proto(rng);
    let options = if rng.gen_bool(0.2) {
        rng.gen_range(1..=10) * 4
    } else {
        0
    };
    let l4 = l4_bytes(rng, proto);
    let header_len = 20 + options;
    let total = header_len + l4.len();
    let mut ip = Vec::new();
    ip.push(0x40 | (header_len / 4) as u8);
    ip.push(0);
    push16(&mut ip, total as u16);
    push16(&mut ip, rng.gen());
    let fragment = match rng.gen_range(0..10) {
        0 => 0x2000,                               // first fragment (MF)
        1 => rng.gen_range(1..0x2000u16),          // later fragment
        2 => 0x2000 | rng.gen_range(1..0x2000u16), // middle fragment
        3 => 0x4000,                               // DF
        _ => 0,
    };
    push16(&mut ip, fragment);
    ip.push(64);
    ip.push(proto);
    push16(&mut ip, 0);
    for _ in 0..2 {
        let IpAddr::V4(addr) = pool_addr(rng, false) else {
            unreachable!()
        };
        ip.extend_from_slice(&addr.octets());
    }
    ip.extend((0..options).map(|_| rng.gen::<u8>()));
    ip.extend_from_slice(&l4);
    ip
}

fn ipv6_packet(rng: &mut StdRng) -> Vec<u8> {
    const EXT: &[u8] = &[0, 43, 60, 51, 44];
    let chain_len = match rng.gen_range(0..10) {
        0..=4 => 0,
        5..=8 => rng.gen_range(1..=3),
        _ => rng.gen_range(7..=10),
    };
    let chain: Vec<u8> = (0..chain_len)
        .map(|_| EXT[rng.gen_range(0..EXT.len())])
        .collect();
    let upper = random_proto(rng);
    let mut payload = Vec::new();
    for (i, &kind) in chain.iter().enumerate() {
        let next = chain.get(i + 1).copied().unwrap_or(upper);
        match kind {
            44 => {
                let offset: u16 = if rng.gen_bool(0.3) {
                    rng.gen_range(1..0x2000)
                } else {
                    0
                };
                payload.extend_from_slice(&[next, 0]);
                push16(&mut payload, offset << 3 | u16::from(rng.gen_bool(0.5)));
                payload.extend_from_slice(&rng.gen::<[u8; 4]>());
            }
            51 => {
                let words = rng.gen_range(1..4u8); // AH payload length field
                let len = (usize::from(words) + 2) * 4;
                payload.extend_from_slice(&[next, words]);
                payload.extend((2..len).map(|_| rng.gen::<u8>()));
            }
            _ => {
                let units = rng.gen_range(0..3u8);
                let len = (usize::from(units) + 1) * 8;
                payload.extend_from_slice(&[next, units]);
                payload.extend((2..len).map(|_| rng.gen::<u8>()));
            }
        }
    }
    payload.extend(l4_bytes(rng, upper));
    let first = chain.first().copied().unwrap_or(upper);
    let mut ip = vec![0x60, 0, 0, 0];
    push16(&mut ip, payload.len() as u16);
    ip.push(first);
    ip.push(64);
    for _ in 0..2 {
        let IpAddr::V6(addr) = pool_addr(rng, true) else {
            unreachable!()
        };
        ip.extend_from_slice(&addr.octets());
    }
    ip.extend_from_slice(&payload);
    ip
}

/// A random frame of a random link layer: a quarter start at the IP header (with a random
/// version nibble now and then).
fn random_layered_frame(rng: &mut StdRng) -> (LinkLayer, Vec<u8>) {
    if !rng.gen_bool(0.25) {
        return (LinkLayer::Ethernet, random_frame(rng));
    }
    let mut packet = if rng.gen_bool(0.5) {
        ipv4_packet(rng)
    } else {
        ipv6_packet(rng)
    };
    match rng.gen_range(0..20) {
        0..=2 => packet.truncate(rng.gen_range(0..=packet.len())),
        3 | 4 => {
            let at = rng.gen_range(0..packet.len());
            packet[at] = rng.gen();
        }
        5 if !packet.is_empty() => packet[0] = rng.gen::<u8>() & 0xf0 | packet[0] & 0x0f,
        6 => packet.extend((0..rng.gen_range(1..20)).map(|_| 0u8)),
        _ => {}
    }
    (LinkLayer::Ip, packet)
}

fn random_frame(rng: &mut StdRng) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    let tags = match rng.gen_range(0..10) {
        0 | 1 => 1,
        2 => 2,
        3 => 3,
        _ => 0,
    };
    for _ in 0..tags {
        push16(&mut frame, if rng.gen_bool(0.5) { 0x8100 } else { 0x88a8 });
        push16(&mut frame, rng.gen_range(1..4095));
    }
    let (ethertype, l3) = match rng.gen_range(0..20) {
        0 => (0x0806, vec![0u8; 28]),           // ARP
        1 => (rng.gen::<u16>(), vec![0u8; 30]), // anything
        2..=10 => (0x0800, ipv4_packet(rng)),
        _ => (0x86dd, ipv6_packet(rng)),
    };
    push16(&mut frame, ethertype);
    frame.extend_from_slice(&l3);
    // Ethernet pads short frames; the IP length must be what bounds the packet.
    if rng.gen_bool(0.2) {
        frame.extend((0..rng.gen_range(1..20)).map(|_| 0u8));
    }
    match rng.gen_range(0..20) {
        0..=2 => frame.truncate(rng.gen_range(0..=frame.len())),
        3 | 4 => {
            let at = rng.gen_range(0..frame.len());
            frame[at] = rng.gen();
        }
        _ => {}
    }
    frame
}

fn reason_index(reason: Reason) -> usize {
    match reason {
        Reason::NonIp => 0,
        Reason::Malformed => 1,
        Reason::Essential => 2,
        Reason::Established => 3,
        Reason::Rule(_) => 4,
        Reason::Default => 5,
        Reason::Dhcp => 6,
    }
}

/// The interface the test runs see packets arrive on (BPF_PROG_TEST_RUN: the namespace's
/// loopback), and an ifindex no interface has.
const TEST_RUN_IFACE: &str = "lo";
const OTHER_IFACE: &str = "not-the-test-run-interface";
const OTHER_IFINDEX: u32 = 0x7fff_fff0;

/// The host's last DHCP request: none, on the test runs' interface (fresh or expired), or on
/// another interface; ages far from the one-minute window's edge.
fn random_dhcp_requests(rng: &mut StdRng, table: &mut FlowTable) {
    const SECOND: u64 = 1_000_000_000;
    let now = table.now_ns;
    let (iface, age) = match rng.gen_range(0..20) {
        0..=6 => return,
        7..=13 => (TEST_RUN_IFACE, rng.gen_range(0..50) * SECOND),
        14..=16 => (TEST_RUN_IFACE, rng.gen_range(70..3600) * SECOND),
        _ => (OTHER_IFACE, rng.gen_range(0..50) * SECOND),
    };
    // Expired ages need a machine up for longer (a test VM may have just booted).
    if age < now {
        table.dhcp_requests.insert(iface.to_string(), now - age);
    }
}

/// The DHCP request table as the kernel's map holds it.
fn dhcp_map(table: &FlowTable) -> Vec<(u32, u64)> {
    table
        .dhcp_requests
        .iter()
        .map(|(name, &sent)| {
            let index = if name == TEST_RUN_IFACE {
                let name = std::ffi::CString::new(name.as_str()).unwrap();
                // SAFETY: a NUL-terminated string.
                unsafe { libc::if_nametoindex(name.as_ptr()) }
            } else {
                OTHER_IFINDEX
            };
            (index, sent)
        })
        .collect()
}

/// Tracked flows for about a third of `inbound` frames (the flows they would reply to) and
/// of `outbound` frames (the flows they belong to), fresh, long expired, or (TCP) between the
/// closing and the open timeout; open, closing or accepted (a connection the rules let in,
/// which counts only outbound); timestamps are far from the timeouts' edges.
fn random_flows(
    rng: &mut StdRng,
    inbound: &[(LinkLayer, Vec<u8>)],
    outbound: &[(LinkLayer, Vec<u8>)],
    set: &RuleSet,
) -> FlowTable {
    let now_ns = monotonic_now_ns();
    let mut table = FlowTable {
        now_ns,
        ..Default::default()
    };
    let longest = set
        .timeouts
        .tcp
        .max(set.timeouts.udp)
        .max(set.timeouts.icmp);
    let frames = inbound
        .iter()
        .map(|frame| (frame, inbound_flow as fn(&PacketInfo) -> Option<FlowKey>))
        .chain(outbound.iter().map(|frame| (frame, egress_flow as _)));
    for ((layer, frame), flow) in frames {
        let Parsed::Ip(packet) = parse_frame_on(*layer, frame) else {
            continue;
        };
        let Some(key) = flow(&packet) else {
            continue;
        };
        if rng.gen_bool(0.35) {
            // Between the timeouts, a peer's FIN or RST must not shorten an open flow.
            let between = (set.timeouts.tcp_closing + set.timeouts.tcp) * 500_000_000;
            let age = match rng.gen_range(0..10) {
                0..6 => 0,
                6..8 if key.proto == IPPROTO_TCP => between,
                _ => 2 * longest * 1_000_000_000,
            };
            let flags = match rng.gen_range(0..10) {
                0..=2 => FLOW_CLOSING,
                3..=4 => FLOW_ACCEPTED,
                _ => 0,
            };
            let last_seen_ns = now_ns - age;
            table.flows.insert(
                key,
                FlowState {
                    last_seen_ns,
                    flags,
                    _pad: 0,
                },
            );
        }
    }
    table
}

/// The flow table's keys and flags, sorted (timestamps of flows a program wrote are its
/// clock's, not the reference's).
fn flow_flags<'a>(table: impl IntoIterator<Item = (&'a FlowKey, &'a FlowState)>) -> Vec<String> {
    let mut flags: Vec<String> = table
        .into_iter()
        .map(|(key, state)| format!("{key:?} {}", state.flags))
        .collect();
    flags.sort_unstable();
    flags
}

/// The tc action for a reference verdict.
fn tc_action(verdict: Verdict) -> u32 {
    match verdict {
        Verdict::Pass => 0,
        Verdict::Drop => 2,
    }
}

fn seed() -> u64 {
    match std::env::var("FW_SEED") {
        Ok(seed) => seed.parse().expect("FW_SEED is a number"),
        Err(_) => rand::random(),
    }
}

fn hex(frame: &[u8]) -> String {
    frame.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `rule_sets` random rule sets with `packets_per_set` frames each; panics with the seed
/// and the first disagreement.
fn differential(max_rules: usize, rule_sets: usize, packets_per_set: usize) {
    let seed = seed();
    eprintln!("differential: seed {seed} (FW_SEED={seed} replays it)");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut kernel = Kernel::load().expect("load the XDP program");
    kernel.load_layer(LinkLayer::Ip).unwrap();
    let mut verdicts = [0usize; 2];
    let mut reasons = [0usize; 7];
    let mut egress_verdicts = [0usize; 2];
    let mut egress_reasons = [0usize; 7];
    let mut egress_refused = 0usize;
    for set_index in 0..rule_sets {
        let set = random_rule_set(&mut rng, max_rules);
        // Mostly the real host-map budget; sometimes a small one, so that some prefixes are
        // cut into blocks and the rest stay in the trie.
        let budget = match rng.gen_range(0..4) {
            0 => rng.gen_range(0..64),
            _ => EXACT_BUDGET,
        };
        kernel
            .apply(&compile_with_budget(&set, budget).expect("compile"))
            .expect("apply");
        // Half as many frames the host sends as frames it receives.
        let frames: Vec<(LinkLayer, Vec<u8>)> = (0..packets_per_set)
            .map(|_| random_layered_frame(&mut rng))
            .collect();
        let sent: Vec<(LinkLayer, Vec<u8>)> = (0..packets_per_set / 2)
            .map(|_| random_layered_frame(&mut rng))
            .collect();
        let mut flows = random_flows(&mut rng, &frames, &sent, &set);
        random_dhcp_requests(&mut rng, &mut flows);
        let table: Vec<_> = flows.flows.iter().map(|(k, v)| (*k, *v)).collect();
        let initial = flows.flows.clone();
        kernel.set_flows(&table).expect("set flows");
        kernel
            .set_dhcp_requests(&dhcp_map(&flows))
            .expect("set DHCP requests");
        for (layer, frame) in frames {
            let expected = evaluate_layer(&set, layer, &frame, Some(TEST_RUN_IFACE), &flows);
            if frame.len() < ETH_HLEN {
                // The kernel hands XDP no frame shorter than an Ethernet header, and
                // BPF_PROG_TEST_RUN refuses one.
                assert_eq!(expected.reason, Reason::Malformed);
                reasons[1] += 1;
                continue;
            }
            let want = xdp_action(expected.verdict);
            let (got, _) = kernel.test_run_on(layer, &frame, 1).expect("test run");
            if got != want {
                panic!(
                    "kernel and reference disagree (seed {seed}, rule set {set_index}):\n\
                     {layer:?} frame {}\nreference {:?}, kernel XDP action {got}\nrules {:#?}\nflows and DHCP requests {:?}",
                    hex(&frame),
                    expected,
                    set,
                    flows
                );
            }
            verdicts[usize::from(want == XDP_PASS)] += 1;
            reasons[reason_index(expected.reason)] += 1;
            // With outbound filtering on, what the rules allowed is recorded as accepted.
            if let Parsed::Ip(packet) = parse_frame_on(layer, &frame) {
                flows.record_accepted(&set, &packet, expected);
            }
        }
        // Inbound packets change no flow but by recording accepted connections (the
        // reference has them do the same): not even the peer's FIN or RST.
        let held: std::collections::HashMap<_, _> =
            kernel.flows().expect("read flows").into_iter().collect();
        for (key, state) in &initial {
            assert_eq!(
                held.get(key),
                Some(state),
                "inbound packets changed a flow (seed {seed}, rule set {set_index})"
            );
        }
        assert_eq!(
            flow_flags(&held),
            flow_flags(&flows.flows),
            "inbound packets left other flows than the reference's (seed {seed}, rule set {set_index})"
        );
        // The host sends: the egress program's verdicts, and the flows it records.
        for (layer, frame) in sent {
            let expected = evaluate_egress(&set, layer, &frame, Some(TEST_RUN_IFACE), &mut flows);
            if frame.len() < ETH_HLEN {
                continue;
            }
            let got = match kernel.test_run_egress_on(layer, &frame) {
                Ok(action) => action,
                // The skb test run refuses some truncated IP headers (the host's stack
                // never sends one): only malformed frames may be refused.
                Err(error) => {
                    assert_eq!(
                        parse_frame_on(layer, &frame),
                        Parsed::Malformed,
                        "egress test run of {layer:?} {}: {error}",
                        hex(&frame)
                    );
                    egress_refused += 1;
                    continue;
                }
            };
            if got != tc_action(expected.verdict) {
                panic!(
                    "egress: kernel and reference disagree (seed {seed}, rule set {set_index}):\n\
                     {layer:?} frame {}\nreference {:?}, kernel tc action {got}\nrules {:#?}\nflows {:?}",
                    hex(&frame),
                    expected,
                    set,
                    flows
                );
            }
            egress_verdicts[usize::from(expected.verdict == Verdict::Pass)] += 1;
            egress_reasons[reason_index(expected.reason)] += 1;
        }
        let held: Vec<_> = kernel.flows().expect("read flows");
        assert_eq!(
            flow_flags(held.iter().map(|(key, state)| (key, state))),
            flow_flags(&flows.flows),
            "the egress program recorded other flows than the reference (seed {seed}, rule set {set_index})"
        );
    }
    eprintln!(
        "differential: {} packets agree ({} dropped, {} passed)",
        verdicts[0] + verdicts[1],
        verdicts[0],
        verdicts[1]
    );
    eprintln!("differential: by reason [non-IP, malformed, essential, established, rule, default, DHCP] = {reasons:?}");
    eprintln!(
        "differential: {} outbound packets agree ({} dropped, {} passed), by reason \
         {egress_reasons:?}; {egress_refused} malformed ones the test run refused",
        egress_verdicts[0] + egress_verdicts[1],
        egress_verdicts[0],
        egress_verdicts[1]
    );
    assert!(egress_verdicts[0] > rule_sets && egress_verdicts[1] > rule_sets);
    // Guard against a generator that leaves a path unexercised.
    assert!(verdicts[0] > rule_sets && verdicts[1] > rule_sets);
    // Large random rule sets nearly always contain a catch-all rule, so the default policy is
    // reached only with small ones.
    let paths = if max_rules > 100 {
        &reasons[..5]
    } else {
        &reasons[..]
    };
    assert!(
        paths.iter().all(|&n| n > 0),
        "a decision path was never taken: {reasons:?}"
    );
    let egress_paths = &egress_reasons[..paths.len()];
    assert!(
        egress_paths.iter().all(|&n| n > 0),
        "an outbound decision path was never taken: {egress_reasons:?}"
    );
}

fn packets() -> usize {
    std::env::var("FW_PACKETS")
        .ok()
        .map_or(1_000_000, |n| n.parse().expect("FW_PACKETS is a number"))
}

#[test]
fn kernel_matches_reference_on_small_rule_sets() {
    let total = packets();
    let sets = std::env::var("FW_RULE_SETS")
        .ok()
        .map_or(400, |n| n.parse().expect("FW_RULE_SETS is a number"));
    differential(24, sets, total / sets);
}

#[test]
fn kernel_matches_reference_on_large_rule_sets() {
    differential(1024, 10, 2_000);
}
