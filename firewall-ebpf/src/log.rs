//! Drop logging with a per-CPU token bucket in the kernel, so a flood of dropped packets
//! cannot turn into a flood of log lines.
use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::XdpContext};
use aya_log_ebpf::info;
use core::net::{Ipv4Addr, Ipv6Addr};
use firewall_common::{GenerationConfig, STAT_LOG_SUPPRESSED};

use crate::{
    maps::{count, LOG_BUCKET},
    parse::Packet,
};

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// Takes one token if the bucket has one; counts a suppressed line otherwise.
#[inline(always)]
fn take_token(config: &GenerationConfig) -> bool {
    if config.log_per_sec == 0 {
        return false;
    }
    let Some(bucket) = LOG_BUCKET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    let bucket = unsafe { &mut *bucket };
    let now = unsafe { bpf_ktime_get_ns() };
    let cost = NANOS_PER_SEC / u64::from(config.log_per_sec);
    let cap = cost * u64::from(config.log_burst.max(1));
    let credit = bucket.credit_ns + (now - bucket.last_ns);
    bucket.last_ns = now;
    let credit = if credit > cap { cap } else { credit };
    if credit < cost {
        bucket.credit_ns = credit;
        count(STAT_LOG_SUPPRESSED, 0);
        return false;
    }
    bucket.credit_ns = credit - cost;
    true
}

/// Logs a dropped packet; `rule` is `None` for the default policy.
#[inline(always)]
pub fn log_drop(ctx: &XdpContext, config: &GenerationConfig, packet: &Packet, rule: Option<u32>) {
    if !take_token(config) {
        return;
    }
    let rule = match rule {
        Some(rule) => rule as i64 + 1,
        None => -1,
    };
    let port = match packet.dport {
        Some(port) => i32::from(port),
        None => -1,
    };
    if packet.v6 {
        let src = Ipv6Addr::from(packet.src);
        let dst = Ipv6Addr::from(packet.dst);
        info!(ctx, "drop rule={} proto={} {} -> {} dport={}", rule, packet.proto, src, dst, port);
    } else {
        let src = Ipv4Addr::new(packet.src[0], packet.src[1], packet.src[2], packet.src[3]);
        let dst = Ipv4Addr::new(packet.dst[0], packet.dst[1], packet.dst[2], packet.dst[3]);
        info!(ctx, "drop rule={} proto={} {} -> {} dport={}", rule, packet.proto, src, dst, port);
    }
}
