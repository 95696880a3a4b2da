//! Per-source rate limits of allow rules (`limit = "20/s"`): a token bucket per (rule,
//! source address) in an LRU map, as `ufw limit` does for SSH.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use firewall_common::{RateKey, TokenBucket};

use crate::{
    maps::{RATE_BUCKETS, RULE_LIMITS},
    parse::Packet,
};

/// Takes a token from the bucket of `packet`'s source for rule slot `slot`; false when the
/// source has used its rate up.
#[inline(always)]
pub fn take(slot: u32, packet: &Packet) -> bool {
    let Some(limit) = RULE_LIMITS.get(slot) else {
        return true;
    };
    if limit.interval_ns == 0 {
        return true;
    }
    let key = RateKey {
        addr: packet.src,
        rule: slot,
        v6: u32::from(packet.v6),
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(bucket) = RATE_BUCKETS.get_ptr_mut(key) {
        // SAFETY: a valid map value; concurrent updates from other CPUs can only make the
        // count slightly off, never unsafe.
        return unsafe { &mut *bucket }.take(now, limit.interval_ns, limit.burst_ns);
    }
    // A new source starts with a full bucket, less this packet's token.
    let bucket = TokenBucket::full_less_one(now, limit.interval_ns, limit.burst_ns);
    let _ = RATE_BUCKETS.insert(key, bucket, 0);
    true
}
