//! Packet logging: a fixed record per line into a ring buffer the daemon reads, behind a
//! per-CPU rate limit, so a flood of dropped packets cannot turn into a flood of log lines.
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use firewall_common::{
    GenerationConfig, LogEvent, LOGGED_AUDIT, LOGGED_DROP, LOGGED_LIMIT, LOGGED_PASS,
    STAT_LOG_SUPPRESSED,
};

use crate::{
    maps::{count, LOG_EVENTS, LOG_LIMIT},
    parse::Packet,
    Verdict,
};

/// Whether the rate limit lets a line through now; the limit counts the ones it refuses.
#[inline(always)]
fn take_token(config: &GenerationConfig) -> bool {
    if config.log_line_ns == 0 {
        return false;
    }
    let Some(limit) = LOG_LIMIT.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    let limit = unsafe { &mut *limit };
    // A coarse clock (tick resolution) is plenty for a few lines a second, and cheaper.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    limit.take(now, config.log_line_ns, config.log_burst_ns)
}

/// Logs a packet that arrived on interface `ifindex` (or, `outbound`, leaves by it): `rule` is
/// the 1-based rule number, 0 for the default policy; ports are 0 for packets without them.
/// The daemon formats the line;
/// its first word is the verdict: `pass`, `drop`, `limit` (over an allow rule's rate), or
/// `audit` for a drop that audit mode let through.
#[inline(always)]
pub fn log_packet(
    config: &GenerationConfig,
    packet: &Packet,
    ifindex: u32,
    rule: u32,
    verdict: Verdict,
    audit: bool,
    outbound: bool,
) {
    if !take_token(config) {
        return;
    }
    let outcome = match verdict {
        Verdict::Pass => LOGGED_PASS,
        _ if audit => LOGGED_AUDIT,
        Verdict::Drop => LOGGED_DROP,
        Verdict::Limit => LOGGED_LIMIT,
    };
    let event = LogEvent {
        src: packet.src,
        dst: packet.dst,
        rule,
        ifindex,
        // Both 0 for packets without ports (`Packet::new` zeroes the source port).
        sport: packet.sport,
        dport: packet.dport().unwrap_or(0),
        proto: packet.proto,
        v6: u8::from(packet.v6),
        outcome,
        outbound: u8::from(outbound),
    };
    // A full ring (no daemon reading) loses the line, which the suppressed count shows.
    if LOG_EVENTS.output::<LogEvent>(&event, 0).is_err() {
        count(STAT_LOG_SUPPRESSED, 0);
    }
}
