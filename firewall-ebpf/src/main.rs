//! The XDP program: parse the frame, classify it against the live rule generation, count,
//! and pass or drop.
// Built for the BPF target; on the host (`cargo clippy --workspace`) it is an empty binary.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod bans;
mod classify;
mod dhcp;
mod log;
mod maps;
mod parse;
mod rate;
mod state;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use firewall_common::{
    proto, FlowKey, GenerationConfig, ACTION_ALLOW, ACTION_DENY, ACTION_LIMITED, ACTION_LOG,
    ACTION_MASK, CHECK_AUDIT, CHECK_DHCP, CHECK_ESSENTIALS, CHECK_ESTABLISHED, CHECK_OUTBOUND,
    MAX_RULES, STAT_BANNED, STAT_DEFAULT_ALLOW, STAT_DEFAULT_DENY, STAT_DHCP, STAT_ESSENTIAL,
    STAT_ESTABLISHED, STAT_MALFORMED, STAT_NON_IP, STAT_OUT_DEFAULT_ALLOW, STAT_OUT_DEFAULT_DENY,
    STAT_OUT_ESTABLISHED, STAT_RATE_LIMITED,
};

use crate::{
    maps::{count, ACTIVE_GEN, GEN_CONFIG, RULE_ACTIONS},
    parse::{Packet, Parsed},
};

/// The XDP program of Ethernet interfaces.
#[xdp]
pub fn firewall(ctx: XdpContext) -> u32 {
    judge::<false>(ctx)
}

/// The XDP program of interfaces whose frames start at the IP header (tun, WireGuard, PPP,
/// raw IP, ipip).
#[xdp]
pub fn firewall_l3(ctx: XdpContext) -> u32 {
    judge::<true>(ctx)
}

/// Parses, classifies, counts; `L3` as in [`parse::parse`].
#[inline(always)]
fn judge<const L3: bool>(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let mut packet = Packet::new();
    let parsed = parse::parse::<L3>(ctx.data(), ctx.data_end(), &mut packet);
    if let Parsed::NonIp = parsed {
        count(STAT_NON_IP, bytes);
        return xdp_action::XDP_PASS;
    }
    // Read the generation once: every lookup below uses the same rule set.
    let live = ACTIVE_GEN
        .get(0)
        .and_then(|&gen| Some((gen & 1, GEN_CONFIG.get(gen & 1)?)));
    if let Parsed::Malformed = parsed {
        count(STAT_MALFORMED, bytes);
        return match live {
            Some((_, config)) if config.checks & CHECK_AUDIT != 0 => xdp_action::XDP_PASS,
            _ => xdp_action::XDP_DROP,
        };
    }
    let Some((gen, config)) = live else {
        return xdp_action::XDP_PASS;
    };
    if config.checks & CHECK_ESSENTIALS != 0 && is_essential_icmpv6(&packet) {
        count(STAT_ESSENTIAL, bytes);
        return xdp_action::XDP_PASS;
    }
    if config.checks & CHECK_DHCP != 0
        && dhcp::is_expected_reply(&packet, ctx.ingress_ifindex() as u32)
    {
        count(STAT_DHCP, bytes);
        return xdp_action::XDP_PASS;
    }
    if bans::is_banned(&packet) {
        count(STAT_BANNED, bytes);
        return if config.checks & CHECK_AUDIT != 0 {
            xdp_action::XDP_PASS
        } else {
            xdp_action::XDP_DROP
        };
    }
    if config.checks & CHECK_ESTABLISHED != 0
        && state::is_established(config, &packet, ctx.data(), ctx.data_end())
    {
        count(STAT_ESTABLISHED, bytes);
        return xdp_action::XDP_PASS;
    }
    // `rule_number` is 1-based for the log; 0 is the default policy.
    let (action, rule_number, slot) =
        match classify::first_match(gen, config, &packet, ctx.ingress_ifindex() as u32, false) {
            Some(rule) => {
                let slot = gen * MAX_RULES as u32 + rule;
                let action = RULE_ACTIONS.get(slot).copied().unwrap_or(ACTION_DENY);
                (action, rule + 1, slot)
            }
            // The default policy's drops are logged; its passes are not.
            None if config.default_action == ACTION_DENY => {
                (ACTION_DENY | ACTION_LOG, 0, STAT_DEFAULT_DENY)
            }
            None => (config.default_action, 0, STAT_DEFAULT_ALLOW),
        };
    count(slot, bytes);
    let audit = config.checks & CHECK_AUDIT != 0;
    let mut verdict = if action & ACTION_MASK == ACTION_DENY {
        Verdict::Drop
    } else {
        Verdict::Pass
    };
    if action & ACTION_LIMITED != 0 && !rate::take(slot, &packet) {
        count(STAT_RATE_LIMITED, bytes);
        verdict = Verdict::Limit;
    }
    if action & ACTION_LOG != 0 || verdict == Verdict::Limit {
        let ifindex = ctx.ingress_ifindex() as u32;
        log::log_packet(config, &packet, ifindex, rule_number, verdict, audit, false);
    }
    if verdict == Verdict::Pass && config.checks & CHECK_OUTBOUND != 0 {
        // So that the host's replies pass the outbound rules.
        state::record_accepted(&packet);
    }
    match verdict {
        Verdict::Pass => xdp_action::XDP_PASS,
        _ if audit => xdp_action::XDP_PASS,
        _ => xdp_action::XDP_DROP,
    }
}

/// What became of a classified packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
    /// Matched an allow rule, over its source's rate: dropped.
    Limit,
}

/// ICMPv6 that IPv6 needs to work ([`proto::is_essential_icmpv6`]).
#[inline(always)]
fn is_essential_icmpv6(packet: &parse::Packet) -> bool {
    match packet.icmp() {
        Some(icmp) if packet.v6 => proto::is_essential_icmpv6(icmp.kind),
        _ => false,
    }
}

/// tc egress: records the host's outbound flows so that their replies pass, and its DHCP
/// requests; with outbound filtering on ([`CHECK_OUTBOUND`]), judges outbound packets too.
#[classifier]
pub fn track_egress(ctx: TcContext) -> i32 {
    track::<false>(ctx)
}

/// [`track_egress`] for interfaces whose frames start at the IP header.
#[classifier]
pub fn track_egress_l3(ctx: TcContext) -> i32 {
    track::<true>(ctx)
}

#[inline(always)]
fn track<const L3: bool>(ctx: TcContext) -> i32 {
    let mut packet = Packet::new();
    // SAFETY: the context's own skb.
    let (ifindex, wire_len) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).len) };
    // What the host sends keeps its headers in the skb's linear part, not always its payload.
    let (start, end) = (ctx.data(), ctx.data_end());
    let wire_len = (wire_len as usize).max(end - start);
    let parsed = parse::parse_linear::<L3>(start, end, wire_len, &mut packet);
    let live = ACTIVE_GEN
        .get(0)
        .and_then(|&gen| Some((gen & 1, GEN_CONFIG.get(gen & 1)?)));
    let filtering = match live {
        Some((gen, config)) if config.checks & CHECK_OUTBOUND != 0 => Some((gen, config)),
        _ => None,
    };
    let Some((gen, config)) = filtering else {
        // Outbound filtering off: record, never drop.
        if let Parsed::Ip = parsed {
            if let Some(key) = state::outbound_key(&packet, false) {
                state::record_outbound(&packet, key, true);
            }
            dhcp::record_request(&packet, ifindex);
        }
        return TC_ACT_OK;
    };
    let bytes = wire_len as u64;
    if let Parsed::NonIp = parsed {
        return TC_ACT_OK;
    }
    let audit = config.checks & CHECK_AUDIT != 0;
    if let Parsed::Malformed = parsed {
        count(STAT_MALFORMED, bytes);
        return if audit { TC_ACT_OK } else { TC_ACT_SHOT };
    }
    // The flow the packet belongs to, and whether it is the host's own (not an echo reply to
    // an accepted request), found once for the judgement and the record.
    let key = state::outbound_key(&packet, true);
    let own = !state::is_echo_reply(&packet);
    let judged = judge_outbound(gen, config, &packet, key, own, ifindex, bytes);
    if judged == Outbound::Drop && !audit {
        return TC_ACT_SHOT;
    }
    // Only what leaves starts or continues a flow (a tracked flow's entry is refreshed).
    if judged != Outbound::Refreshed {
        if let Some(key) = key {
            state::record_outbound(&packet, key, own);
        }
    }
    dhcp::record_request(&packet, ifindex);
    TC_ACT_OK
}

/// What the outbound judgement made of a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outbound {
    /// A packet of a live tracked flow: passes, its flow's entry refreshed already.
    Refreshed,
    Pass,
    Drop,
}

/// The verdict on an outbound packet of flow `key` (`own` as in [`state::pass_tracked`]):
/// essential ICMPv6, DHCP requests and packets of tracked flows pass; then the first out
/// rule, else the outbound default. Counts and logs.
#[inline(always)]
fn judge_outbound(
    gen: u32,
    config: &GenerationConfig,
    packet: &Packet,
    key: Option<FlowKey>,
    own: bool,
    ifindex: u32,
    bytes: u64,
) -> Outbound {
    if config.checks & CHECK_ESSENTIALS != 0 && is_essential_icmpv6(packet) {
        return Outbound::Pass;
    }
    if config.checks & CHECK_DHCP != 0 && dhcp::is_request(packet) {
        return Outbound::Pass;
    }
    if let Some(key) = key {
        if state::pass_tracked(config, packet, key, own) {
            count(STAT_OUT_ESTABLISHED, bytes);
            return Outbound::Refreshed;
        }
    }
    let (action, rule_number, slot) =
        match classify::first_match(gen, config, packet, ifindex, true) {
            Some(rule) => {
                let slot = gen * MAX_RULES as u32 + rule;
                let action = RULE_ACTIONS.get(slot).copied().unwrap_or(ACTION_DENY);
                (action, rule + 1, slot)
            }
            None if config.outbound_action == ACTION_DENY => {
                (ACTION_DENY, 0, STAT_OUT_DEFAULT_DENY)
            }
            None => (ACTION_ALLOW, 0, STAT_OUT_DEFAULT_ALLOW),
        };
    count(slot, bytes);
    let verdict = if action & ACTION_MASK == ACTION_DENY {
        Verdict::Drop
    } else {
        Verdict::Pass
    };
    if action & ACTION_LOG != 0 {
        let audit = config.checks & CHECK_AUDIT != 0;
        log::log_packet(config, packet, ifindex, rule_number, verdict, audit, true);
    }
    match verdict {
        Verdict::Pass => Outbound::Pass,
        _ => Outbound::Drop,
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
