//! Per-source rate limits of allow rules (`limit = "20/s"`): a token bucket per (rule,
//! source address) in an LRU map, as `ufw limit` does for SSH.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use firewall_common::{RateBucket, RateKey};

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
        let bucket = unsafe { &mut *bucket };
        let refill = now.saturating_sub(bucket.last_ns);
        let mut credit = bucket.credit_ns.saturating_add(refill);
        if credit > limit.burst_ns {
            credit = limit.burst_ns;
        }
        bucket.last_ns = now;
        if credit < limit.interval_ns {
            bucket.credit_ns = credit;
            return false;
        }
        bucket.credit_ns = credit - limit.interval_ns;
        return true;
    }
    // A new source starts with a full bucket, less this packet's token.
    let bucket = RateBucket {
        credit_ns: limit.burst_ns.saturating_sub(limit.interval_ns),
        last_ns: now,
    };
    let _ = RATE_BUCKETS.insert(key, bucket, 0);
    true
}
