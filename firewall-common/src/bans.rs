//! Runtime bans (`firewall ban`): sources dropped before the rules, until they expire. They
//! live outside the rule generations, in maps pinned apart from any build's (`DIR/bans-v1/`),
//! so that reloads, restarts and upgrades keep them; a change of this layout takes a new
//! directory name.

/// Where the ban maps are pinned, under the pin directory.
pub const PIN_SUBDIR: &str = "bans-v1";

/// Host bans (/32, /128) at once: an exact-match hash, allocated per entry.
pub const MAX_HOSTS: u32 = 1 << 20;
/// Prefix bans at once: a longest-prefix-match trie.
pub const MAX_PREFIXES: u32 = 1 << 16;

/// Bits of the one-element `IN_USE` map: which ban maps hold entries, so that a host without
/// bans pays one array read per packet and no hash or trie lookup.
pub const IN_USE_HOSTS: u32 = 1;
pub const IN_USE_PREFIXES: u32 = 2;

/// A ban's value: when it ends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ban {
    /// CLOCK_MONOTONIC (`bpf_ktime_get_ns`) nanoseconds at which the ban ends; 0: never.
    pub expires_ns: u64,
}

impl Ban {
    /// Whether the ban holds at `now_ns`: the kernel checks this on every banned packet, so an
    /// expired entry the daemon has not swept yet drops nothing.
    #[inline(always)]
    pub fn holds(&self, now_ns: u64) -> bool {
        self.expires_ns == 0 || now_ns < self.expires_ns
    }
}

/// An address as the ban maps key it: IPv6, IPv4 as IPv4-mapped (`::ffff:a.b.c.d`), words in
/// wire byte order. `addr` as packets and records hold it (IPv4 in word 0).
#[inline(always)]
pub const fn key(v6: bool, addr: [u32; 4]) -> [u32; 4] {
    if v6 {
        addr
    } else {
        [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), addr[0]]
    }
}

/// Prefix length in the ban trie of an IPv4 (`v6` false) or IPv6 prefix of `len` bits.
pub const fn key_prefix_len(v6: bool, len: u8) -> u32 {
    if v6 {
        len as u32
    } else {
        96 + len as u32
    }
}

pub mod map_names {
    /// Mapped address -> [`super::Ban`], for hosts.
    pub const HOSTS: &str = "FW_BAN_HOSTS";
    /// Mapped prefix -> [`super::Ban`].
    pub const PREFIXES: &str = "FW_BAN_PREFIXES";
    /// One u32 of `IN_USE_*` bits.
    pub const IN_USE: &str = "FW_BANS_IN_USE";
}

#[cfg(feature = "user")]
// SAFETY: a `repr(C)` u64 without padding.
unsafe impl aya::Pod for Ban {}
