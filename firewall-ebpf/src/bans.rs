//! Runtime bans (`firewall ban`): a banned source is dropped before the connection state and
//! the rules, so a ban also cuts the connections it already has (as fail2ban's chain at the
//! top of INPUT does). Essential ICMPv6 and the host's DHCP replies are judged before bans:
//! no ban can cut the host off its neighbours or its lease.
use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, maps::lpm_trie::Key};
use firewall_common::bans::{self, Ban, IN_USE_HOSTS, IN_USE_PREFIXES};

use crate::{
    maps::{BANS_IN_USE, BAN_HOSTS, BAN_PREFIXES},
    parse::Packet,
};

/// Whether `packet`'s source is under a ban that has not expired.
#[inline(always)]
pub fn is_banned(packet: &Packet) -> bool {
    let in_use = match BANS_IN_USE.get(0) {
        Some(&bits) if bits != 0 => bits,
        _ => return false,
    };
    let addr = bans::key(packet.v6, packet.src);
    if in_use & IN_USE_HOSTS != 0 {
        // SAFETY: a map value, copied out.
        if let Some(ban) = unsafe { BAN_HOSTS.get(addr) } {
            if holds(ban) {
                return true;
            }
        }
    }
    // A host whose own ban expired may still be in a banned prefix.
    if in_use & IN_USE_PREFIXES != 0 {
        if let Some(ban) = BAN_PREFIXES.get(Key::new(128, addr)) {
            return holds(ban);
        }
    }
    false
}

#[inline(always)]
fn holds(ban: &Ban) -> bool {
    // Permanent bans skip the clock; the coarse one is plenty for bans of seconds or more.
    ban.expires_ns == 0 || ban.holds(unsafe { bpf_ktime_get_coarse_ns() })
}
