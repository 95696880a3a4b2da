//! Drop logging with a per-CPU token bucket in the kernel, so a flood of dropped packets
//! cannot turn into a flood of log lines.
use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use aya_log_ebpf::info;
use core::net::{Ipv4Addr, Ipv6Addr};
use firewall_common::{GenerationConfig, STAT_LOG_SUPPRESSED};

use crate::{
    maps::{count, LOG_BUCKET},
    parse::Packet,
    Verdict,
};

/// Takes one token if the bucket has one; counts a suppressed line otherwise.
#[inline(always)]
fn take_token(config: &GenerationConfig) -> bool {
    if config.log_line_ns == 0 {
        return false;
    }
    let Some(bucket) = LOG_BUCKET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    let bucket = unsafe { &mut *bucket };
    // A coarse clock (tick resolution) is plenty for a few lines a second, and cheaper.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let cost = config.log_line_ns;
    let credit = bucket.credit_ns + (now - bucket.last_ns);
    bucket.last_ns = now;
    let credit = if credit > config.log_burst_ns {
        config.log_burst_ns
    } else {
        credit
    };
    if credit < cost {
        bucket.credit_ns = credit;
        count(STAT_LOG_SUPPRESSED, 0);
        return false;
    }
    bucket.credit_ns = credit - cost;
    true
}

/// Logs a packet: `rule` is the 1-based rule number, 0 for the default policy; ports are 0
/// for packets without them. The first word is the verdict: `pass`, `drop`, `limit` (over an
/// allow rule's rate), or `audit` for a drop that audit mode let through.
#[inline(always)]
pub fn log_packet(
    ctx: &XdpContext,
    config: &GenerationConfig,
    packet: &Packet,
    rule: u32,
    verdict: Verdict,
    audit: bool,
) {
    if !take_token(config) {
        return;
    }
    let verdict: &str = match verdict {
        Verdict::Pass => "pass",
        _ if audit => "audit",
        Verdict::Drop => "drop",
        Verdict::Limit => "limit",
    };
    let dport = match packet.dport {
        Some(port) => u32::from(port),
        None => 0,
    };
    let sport = u32::from(packet.sport);
    let proto = u32::from(packet.proto);
    if packet.v6 {
        let src = Ipv6Addr::from(words_to_bytes(&packet.src));
        let dst = Ipv6Addr::from(words_to_bytes(&packet.dst));
        info!(
            ctx,
            "{} rule={} proto={} [{}]:{} -> [{}]:{}", verdict, rule, proto, src, sport, dst, dport
        );
    } else {
        let src = Ipv4Addr::from(packet.src[0].to_ne_bytes());
        let dst = Ipv4Addr::from(packet.dst[0].to_ne_bytes());
        info!(
            ctx,
            "{} rule={} proto={} {}:{} -> {}:{}", verdict, rule, proto, src, sport, dst, dport
        );
    }
}

/// Wire-order address words back to bytes (only on the rare logging path).
#[inline(always)]
fn words_to_bytes(words: &[u32; 4]) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    for (i, word) in words.iter().enumerate() {
        let b = word.to_ne_bytes();
        bytes[4 * i] = b[0];
        bytes[4 * i + 1] = b[1];
        bytes[4 * i + 2] = b[2];
        bytes[4 * i + 3] = b[3];
    }
    bytes
}
