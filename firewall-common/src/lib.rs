//! The ABI shared by the XDP program and the daemon: map layouts, value types and constants.
//!
//! Every map that holds rules is double-buffered by *generation*: the daemon writes a complete
//! rule set into the idle generation, then flips [`ACTIVE_GENERATION`](crate) with one map update.
//! The XDP program reads the generation once per packet, so a packet is classified entirely by
//! the old rules or entirely by the new ones.
#![no_std]

pub mod bans;
mod flows;
pub mod proto;

pub use flows::*;

/// Most rules a rule set can hold; one bit per rule in a [`RuleBits`].
pub const MAX_RULES: usize = 1024;
/// 64-bit words in a [`RuleBits`].
pub const RULE_WORDS: usize = MAX_RULES / 64;
/// Headers the classifier reads must start within this many bytes of the frame (it keeps the
/// verifier's ranges small); deeper ones make the packet malformed, and an ICMP error quoting
/// a packet that deep quotes no flow.
pub const MAX_HEADER_OFFSET: usize = 4096;
/// Rule generations kept in the maps (live and idle).
pub const GENERATIONS: u32 = 2;
/// Destination ports per generation: the index space of the port-class map.
pub const PORTS: u32 = 1 << 16;
/// IP protocol numbers: the index space of the protocol map, per family.
pub const PROTOS: u32 = 256;
/// Protocol map slots per generation: inbound IPv4's protocols, inbound IPv6's, then the
/// same for outbound. A rule is only in its own direction's slots, so that the two
/// directions share the rule space and every other table. A rule whose addresses (in `from`
/// or in `to`) are all of one family is left out of the other family's sets, so that a
/// packet of that other family never looks up its addresses on the rule's account.
pub const PROTO_SLOTS: u32 = 4 * PROTOS;
/// Slot of an IP protocol of a family and direction in a generation's protocol map.
pub const fn proto_slot(outbound: bool, v6: bool, proto: u8) -> u32 {
    ((outbound as u32) * 2 + v6 as u32) * PROTOS + proto as u32
}
/// Distinct destination-port classes per generation. Class 0 is "packet has no port".
pub const MAX_PORT_CLASSES: u32 = 4096;
/// Distinct address rule bit sets per generation. The exact maps and tries store a class id
/// (`u32`) instead of a [`RuleBits`], and [`map_names::ADDRESS_CLASSES`] holds each class's
/// bits: a million-entry blocklist has a handful of classes. The array is preallocated:
/// `GENERATIONS * MAX_ADDRESS_CLASSES * size_of::<RuleBits>()` = 2 * 16,384 * 136 bytes =
/// 4.25 MiB of kernel memory, against 136 bytes saved per address entry.
pub const MAX_ADDRESS_CLASSES: u32 = 16384;
/// Entries per address trie (both generations together, so two full rule sets of up to a
/// million networks). LPM tries allocate per entry, so unused capacity costs nothing.
pub const MAX_TRIE_ENTRIES: u32 = 1 << 21;

/// Verdicts stored per rule and as default policy.
pub const ACTION_ALLOW: u32 = 0;
pub const ACTION_DENY: u32 = 1;
/// The verdict bits of a rule's action word; the flags below ride along.
pub const ACTION_MASK: u32 = 0xff;
/// Log the rule's matches (rate-limited).
pub const ACTION_LOG: u32 = 1 << 8;
/// An allow rule with a per-source rate limit (see [`RateLimit`]).
pub const ACTION_LIMITED: u32 = 1 << 9;

/// Slots of the per-CPU [`Counter`] array: `gen * MAX_RULES + rule` for rule hits, then the
/// counters below, which do not depend on the generation.
pub const STAT_RULES: u32 = GENERATIONS * MAX_RULES as u32;
pub const STAT_DEFAULT_ALLOW: u32 = STAT_RULES;
pub const STAT_DEFAULT_DENY: u32 = STAT_RULES + 1;
/// Frames dropped because a header was truncated or inconsistent.
pub const STAT_MALFORMED: u32 = STAT_RULES + 2;
/// Non-IP frames (ARP and others), always passed.
pub const STAT_NON_IP: u32 = STAT_RULES + 3;
/// Log lines lost to a full log ring buffer (those the rate limit refuses, `LogLimit`
/// counts).
pub const STAT_LOG_SUPPRESSED: u32 = STAT_RULES + 4;
/// Replies to tracked flows, and ICMP errors quoting them, passed before the rules.
pub const STAT_ESTABLISHED: u32 = STAT_RULES + 5;
/// Essential ICMPv6 (neighbour discovery and friends) passed before the rules.
pub const STAT_ESSENTIAL: u32 = STAT_RULES + 6;
/// Packets an allow rule's per-source rate limit dropped.
pub const STAT_RATE_LIMITED: u32 = STAT_RULES + 7;
/// DHCP replies passed before the rules (the host asked on that interface just before).
pub const STAT_DHCP: u32 = STAT_RULES + 8;
/// Packets from banned sources (`firewall ban`), dropped before the rules.
pub const STAT_BANNED: u32 = STAT_RULES + 9;
/// Outbound packets (with outbound filtering on, see [`CHECK_OUTBOUND`]) no out rule matched:
/// passed and dropped by the outbound default.
pub const STAT_OUT_DEFAULT_ALLOW: u32 = STAT_RULES + 10;
pub const STAT_OUT_DEFAULT_DENY: u32 = STAT_RULES + 11;
/// Outbound packets of tracked flows (the host's own, or connections it accepted), passed
/// before the out rules.
pub const STAT_OUT_ESTABLISHED: u32 = STAT_RULES + 12;
pub const STAT_SLOTS: u32 = STAT_RULES + 13;

/// Bit set of rule indices; bit `i` of word `i / 64` is rule `i`. Lowest set bit wins.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleBits {
    /// Bit `w` is set when `words[w]` is not zero: the kernel ANDs the summaries first and
    /// reads only the words that can have a common rule.
    pub summary: u64,
    pub words: [u64; RULE_WORDS],
}

impl RuleBits {
    pub const EMPTY: RuleBits = RuleBits {
        summary: 0,
        words: [0; RULE_WORDS],
    };

    pub fn set(&mut self, rule: usize) {
        self.words[rule / 64] |= 1 << (rule % 64);
        self.summary |= 1 << (rule / 64);
    }

    pub fn union_with(&mut self, other: &RuleBits) {
        self.summary |= other.summary;
        for (word, other) in self.words.iter_mut().zip(other.words) {
            *word |= other;
        }
    }

    pub fn contains(&self, rule: usize) -> bool {
        self.words[rule / 64] & (1 << (rule % 64)) != 0
    }
}

impl Default for RuleBits {
    fn default() -> Self {
        Self::EMPTY
    }
}

/// Per-generation settings: everything about a rule set that is not a per-field bit set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenerationConfig {
    /// `ACTION_ALLOW` or `ACTION_DENY` when no rule matches.
    pub default_action: u32,
    /// Bit `TRIE_*`: that address trie holds prefixes other than `/0` (otherwise the kernel
    /// reads the `/0` bits from `ANY_ADDRESS` instead of searching it).
    pub tries_in_use: u32,
    /// Nanoseconds of credit one drop log line costs (`1e9 / lines per second`; 0 = off).
    pub log_line_ns: u64,
    /// Most credit a CPU can save up: `log_line_ns * burst`.
    pub log_burst_ns: u64,
    /// `CHECK_*` bits: what is decided before the rules.
    pub checks: u32,
    /// Bit `field * EXACT_BITS_PER_FIELD + level index`: the exact map holds entries of that
    /// field and level (see [`V4_LEVELS`]).
    pub exact_in_use: u32,
    /// Idle timeouts of tracked flows, in nanoseconds.
    pub tcp_timeout_ns: u64,
    /// TCP flows after the host sent a FIN or RST (the peer's do not count: they could be
    /// spoofed).
    pub tcp_closing_timeout_ns: u64,
    pub udp_timeout_ns: u64,
    pub icmp_timeout_ns: u64,
    /// `ACTION_ALLOW` or `ACTION_DENY` for outbound packets no out rule matches (read only
    /// with [`CHECK_OUTBOUND`]).
    pub outbound_action: u32,
    pub _pad: u32,
}

/// Replies to the host's own flows (and ICMP errors quoting them) pass before the rules.
pub const CHECK_ESTABLISHED: u32 = 1;
/// ICMPv6 that IPv6 cannot work without passes before the rules.
pub const CHECK_ESSENTIALS: u32 = 2;
/// Some rule names interfaces: the ingress interface is a fifth classified field.
pub const CHECK_IFACES: u32 = 4;
/// Audit mode: everything is classified, counted and logged, nothing is dropped.
pub const CHECK_AUDIT: u32 = 8;
/// DHCP replies (DHCPv4 server port 67 to client port 68, DHCPv6 547 to 546) pass before
/// the rules on an interface where the host sent a DHCP request in the last
/// [`DHCP_WINDOW_NS`].
pub const CHECK_DHCP: u32 = 16;
/// Outbound filtering: the tc egress program judges outbound packets (out rules, then
/// `outbound_action`) and the XDP program records the connections the rules accepted, so
/// that the host's replies pass out. Off (egress only records flows) when the rule set has
/// no out rule and allows outbound by default.
pub const CHECK_OUTBOUND: u32 = 32;

/// How long after the host's last DHCP request on an interface replies pass there.
pub const DHCP_WINDOW_NS: u64 = 60_000_000_000;
/// Interfaces whose last DHCP request is remembered (least recently used go first).
pub const MAX_DHCP_IFACES: u32 = 1024;
/// UDP ports of DHCP: (client, server) for DHCPv4 and DHCPv6.
pub const DHCP4_PORTS: (u16, u16) = (68, 67);
pub const DHCP6_PORTS: (u16, u16) = (546, 547);

/// Packet and byte counter, one per CPU per slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// A rule's name, NUL-padded (cut to fit), for `firewall stats` to read from the pins. The
/// XDP program does not read it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleName {
    pub bytes: [u8; RULE_NAME_BYTES],
}
pub const RULE_NAME_BYTES: usize = 48;

impl Default for RuleName {
    fn default() -> Self {
        RuleName {
            bytes: [0; RULE_NAME_BYTES],
        }
    }
}

/// A rule's per-source rate: a token every `interval_ns`, at most `burst_ns / interval_ns`
/// saved up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    pub interval_ns: u64,
    pub burst_ns: u64,
}

/// A source's bucket for one rule of one generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateKey {
    /// As in [`FlowKey`]: IPv4 in word 0.
    pub addr: [u32; 4],
    /// `gen * MAX_RULES + rule`.
    pub rule: u32,
    pub v6: u32,
}

/// A token bucket whose credit is time: a token costs `cost_ns` of credit, credit grows by
/// the nanoseconds that pass, up to `burst_ns`. The kernel keeps one per (rule, source) for
/// rate limits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenBucket {
    pub credit_ns: u64,
    pub last_ns: u64,
}

impl TokenBucket {
    /// A bucket first used at `now_ns`: full, less the token it was created for.
    #[inline(always)]
    pub fn full_less_one(now_ns: u64, cost_ns: u64, burst_ns: u64) -> TokenBucket {
        TokenBucket {
            credit_ns: burst_ns.saturating_sub(cost_ns),
            last_ns: now_ns,
        }
    }

    /// Takes a token at `now_ns` if the credit covers `cost_ns`. Saturating throughout: a
    /// clock that reads earlier than `last_ns` (another CPU updated the bucket between our
    /// clock read and our write) refills nothing instead of wrapping around.
    #[inline(always)]
    pub fn take(&mut self, now_ns: u64, cost_ns: u64, burst_ns: u64) -> bool {
        let refill = now_ns.saturating_sub(self.last_ns);
        let mut credit = self.credit_ns.saturating_add(refill);
        if credit > burst_ns {
            credit = burst_ns;
        }
        self.last_ns = now_ns;
        if credit < cost_ns {
            self.credit_ns = credit;
            return false;
        }
        self.credit_ns = credit - cost_ns;
        true
    }
}

/// The packet log's per-CPU rate limit, kept as a schedule (the generic cell rate algorithm,
/// equivalent to a token bucket of `burst_ns / line_ns` lines refilled one per `line_ns`): a
/// line may be written while the schedule runs at most a burst ahead of now, and each line
/// moves it on by `line_ns`. A refused line, what every packet of a logged flood is, costs a
/// comparison and a count in the same cache line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogLimit {
    /// When the lines written so far would have been spread out (coarse monotonic ns).
    pub schedule_ns: u64,
    /// Lines refused on this CPU since the map was made.
    pub suppressed: u64,
}

impl LogLimit {
    /// Whether a line may be written at `now_ns`; counts it as suppressed if not.
    #[inline(always)]
    pub fn take(&mut self, now_ns: u64, line_ns: u64, burst_ns: u64) -> bool {
        let ahead = burst_ns.saturating_sub(line_ns);
        if self.schedule_ns.saturating_sub(ahead) > now_ns {
            self.suppressed += 1;
            return false;
        }
        // Idle time earns no more than the burst: the schedule starts again from now.
        let from = if self.schedule_ns > now_ns {
            self.schedule_ns
        } else {
            now_ns
        };
        self.schedule_ns = from + line_ns;
        true
    }
}

/// Sources tracked by rate limits at once (least recently seen go first).
pub const MAX_RATE_SOURCES: u32 = 65536;

impl Counter {
    /// The sum of per-CPU counters.
    pub fn sum<'a>(per_cpu: impl IntoIterator<Item = &'a Counter>) -> Counter {
        per_cpu
            .into_iter()
            .fold(Counter::default(), |sum, c| Counter {
                packets: sum.packets + c.packets,
                bytes: sum.bytes + c.bytes,
            })
    }
}

/// An address as the maps and records hold it: words in wire byte order, IPv4 in word 0.
pub fn address_words(addr: core::net::IpAddr) -> [u32; 4] {
    let mut words = [0u32; 4];
    match addr {
        core::net::IpAddr::V4(v4) => words[0] = u32::from_ne_bytes(v4.octets()),
        core::net::IpAddr::V6(v6) => {
            for (word, chunk) in words.iter_mut().zip(v6.octets().chunks_exact(4)) {
                *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
        }
    }
    words
}

/// The address in `words` (see [`address_words`]): IPv6 if `v6`, else IPv4 from word 0.
pub fn words_address(words: &[u32; 4], v6: bool) -> core::net::IpAddr {
    if !v6 {
        return core::net::Ipv4Addr::from(words[0].to_ne_bytes()).into();
    }
    let mut bytes = [0u8; 16];
    for (chunk, word) in bytes.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    core::net::Ipv6Addr::from(bytes).into()
}

/// One log line, as the XDP program hands it to the daemon through the
/// [`map_names::LOG_EVENTS`] ring buffer; the daemon formats it (and names the rule). A fixed
/// record written with one helper call: formatting in the kernel (aya-log) made the program
/// too large for the 6.1 verifier.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogEvent {
    /// Addresses in wire byte order; IPv4 uses word 0.
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// 1-based rule number; 0 for the default policy.
    pub rule: u32,
    /// Interface index the packet arrived on (left on, for an outbound packet).
    pub ifindex: u32,
    /// Ports, 0 for packets without them.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub v6: u8,
    /// One of the `LOGGED_*` values.
    pub outcome: u8,
    /// 1 for an outbound packet (judged by an out rule), 0 for an inbound one.
    pub outbound: u8,
}

// Every byte is a named field: the kernel writes the record from its stack, where the
// verifier rejects reads of bytes never written (implicit padding would be such bytes).
const _: () = assert!(core::mem::size_of::<LogEvent>() == 48);

/// [`LogEvent::outcome`]: passed, dropped, dropped over an allow rule's rate limit, or a drop
/// that audit mode let through.
pub const LOGGED_PASS: u8 = 0;
pub const LOGGED_DROP: u8 = 1;
pub const LOGGED_LIMIT: u8 = 2;
pub const LOGGED_AUDIT: u8 = 3;
/// Size of the log ring buffer: at the default 5 lines/s per CPU it never fills.
pub const LOG_EVENTS_BYTES: u32 = 1 << 16;

/// LPM key data of the IPv4 tries: the generation as a big-endian word, then the address as
/// it appears on the wire. Whole words keep key building in the kernel free of byte copies.
pub type V4KeyData = [u32; 2];
/// LPM key data of the IPv6 tries: generation word, then the address.
pub type V6KeyData = [u32; 5];
/// Key of the interface map: generation word (big-endian, as in trie keys), ingress ifindex.
pub type IfaceKey = [u32; 2];
/// Interfaces named by rules, per generation.
pub const MAX_IFACES: u32 = 1024;

/// Bits of the generation word that prefix every trie key.
pub const GEN_PREFIX_BITS: u32 = 32;

/// Address fields, as bits of [`GenerationConfig::tries_in_use`] and indices (plus
/// `gen * ADDRESS_FIELDS`) of the `ANY_ADDRESS` map.
pub const TRIE_SRC_V4: u32 = 0;
pub const TRIE_DST_V4: u32 = 1;
pub const TRIE_SRC_V6: u32 = 2;
pub const TRIE_DST_V6: u32 = 3;
pub const ADDRESS_FIELDS: u32 = 4;
/// Exact-match levels. Before its trie, an address is looked up in the field's exact map at
/// each level in use, longest first; an entry there is the complete answer for every address
/// it covers. IPv4 prefixes are cut into entries of the next longer level (at most 8 each;
/// up to /15 into /16s, of which there are only 65,536), so a blocklist of a million networks
/// costs a few hash lookups instead of a 20-level trie walk. IPv6 keeps hosts exact.
pub const V4_LEVELS: [u8; 5] = [32, 28, 24, 20, 16];
pub const V6_LEVELS: [u8; 1] = [128];
/// Bits of [`GenerationConfig::exact_in_use`] per address field: bit `level index` of byte
/// `TRIE_*`.
pub const EXACT_BITS_PER_FIELD: u32 = 8;
/// First word of an exact-map key (stored big-endian like the trie keys' generation word).
pub const fn exact_word(gen: u32, field: u32, level: u32) -> u32 {
    gen | field << 4 | level << 8
}
/// The generation in a hash-map key word (after `u32::from_be`).
pub const GEN_MASK: u32 = 0xf;
/// Exact-map capacity: both generations and both directions share one map per family.
pub const MAX_EXACT_V4: u32 = 1 << 22;
pub const MAX_EXACT_V6: u32 = 1 << 21;

/// Map names, shared so userspace finds what the kernel declares (which of them are pinned:
/// the userspace inventory, `firewall::dataplane::maps`).
pub mod map_names {
    pub const ACTIVE_GENERATION: &str = "FW_ACTIVE_GEN";
    pub const GEN_CONFIG: &str = "FW_GEN_CONFIG";
    pub const RULE_ACTIONS: &str = "FW_RULE_ACTIONS";
    pub const ANY_ADDRESS: &str = "FW_ANY_ADDRESS";
    /// `gen * MAX_ADDRESS_CLASSES + class` -> the rules of the addresses of that class.
    pub const ADDRESS_CLASSES: &str = "FW_ADDRESS_CLASSES";
    pub const EXACT_V4: &str = "FW_EXACT_V4";
    pub const EXACT_V6: &str = "FW_EXACT_V6";
    pub const SRC_V4: &str = "FW_SRC_V4";
    pub const DST_V4: &str = "FW_DST_V4";
    pub const SRC_V6: &str = "FW_SRC_V6";
    pub const DST_V6: &str = "FW_DST_V6";
    pub const PROTO_BITS: &str = "FW_PROTO_BITS";
    pub const PORT_CLASS: &str = "FW_PORT_CLASS";
    pub const PORT_BITS: &str = "FW_PORT_BITS";
    pub const STATS: &str = "FW_STATS";
    pub const LOG_LIMIT: &str = "FW_LOG_LIMIT";
    pub const FLOWS: &str = "FW_FLOWS";
    pub const IFACE_BITS: &str = "FW_IFACE_BITS";
    pub const OTHER_IFACES: &str = "FW_OTHER_IFACES";
    pub const RULE_NAMES: &str = "FW_RULE_NAMES";
    pub const RULE_LIMITS: &str = "FW_RULE_LIMITS";
    pub const RATE_BUCKETS: &str = "FW_RATE_BUCKETS";
    /// Ingress ifindex -> when the host last sent a DHCP request there.
    pub const DHCP_REQUESTS: &str = "FW_DHCP_REQUESTS";
    /// Local TCP/UDP port -> tick of the host's last packet from it (`LOCAL_PORT_TICK_SHIFT`).
    pub const LOCAL_PORTS: &str = "FW_LOCAL_PORTS";
    /// Not pinned: each daemon reads the log lines of its own program.
    pub const LOG_EVENTS: &str = "FW_LOG_EVENTS";
}

/// Name of the XDP program in the object file (for Ethernet interfaces).
pub const XDP_PROGRAM: &str = "firewall";
/// Name of the tc egress program that records the host's flows (Ethernet interfaces).
pub const EGRESS_PROGRAM: &str = "track_egress";
/// The same two programs for interfaces whose frames start at the IP header (tun, WireGuard,
/// PPP, raw IP, ipip): they share all code with the Ethernet ones but read no link header.
pub const XDP_PROGRAM_L3: &str = "firewall_l3";
pub const EGRESS_PROGRAM_L3: &str = "track_egress_l3";

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain `repr(C)` integer aggregates without padding.
    unsafe impl aya::Pod for RuleBits {}
    unsafe impl aya::Pod for GenerationConfig {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for RuleName {}
    unsafe impl aya::Pod for RateLimit {}
    unsafe impl aya::Pod for RateKey {}
    unsafe impl aya::Pod for TokenBucket {}
    unsafe impl aya::Pod for LogLimit {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowState {}
}

#[cfg(test)]
mod tests {
    use super::{LogLimit, TokenBucket};

    #[test]
    fn log_limit_allows_a_burst_then_one_line_per_interval() {
        // Lines every 10 ns, bursts of three; a fresh (all zero) limit starts with its burst.
        let mut limit = LogLimit::default();
        for _ in 0..3 {
            assert!(limit.take(1_000, 10, 30));
        }
        assert!(!limit.take(1_000, 10, 30), "the burst is spent");
        assert!(!limit.take(1_009, 10, 30));
        assert!(limit.take(1_010, 10, 30), "10 ns later one line is due");
        assert!(!limit.take(1_010, 10, 30));
        assert_eq!(limit.suppressed, 3);
        // A long pause earns the burst again, not more.
        for _ in 0..3 {
            assert!(limit.take(1_000_000, 10, 30));
        }
        assert!(!limit.take(1_000_000, 10, 30));
        assert_eq!(limit.suppressed, 4);
    }

    #[test]
    fn log_limit_with_a_burst_of_one_spaces_every_line() {
        let mut limit = LogLimit::default();
        assert!(limit.take(100, 10, 10));
        assert!(!limit.take(105, 10, 10));
        assert!(limit.take(110, 10, 10));
        // A clock that reads earlier (another CPU's coarse tick) refuses, never wraps.
        assert!(!limit.take(50, 10, 10));
    }

    #[test]
    fn token_bucket_spends_refills_and_caps_at_burst() {
        // Three tokens of 10 ns in a burst of 30 ns.
        let mut bucket = TokenBucket::full_less_one(1_000, 10, 30);
        assert!(bucket.take(1_000, 10, 30));
        assert!(bucket.take(1_000, 10, 30));
        assert!(!bucket.take(1_000, 10, 30), "the burst is spent");
        assert!(bucket.take(1_010, 10, 30), "10 ns later one token is back");
        assert!(!bucket.take(1_010, 10, 30));
        // A long pause refills to the burst, not beyond.
        for _ in 0..3 {
            assert!(bucket.take(1_000_000, 10, 30));
        }
        assert!(!bucket.take(1_000_000, 10, 30));
    }

    #[test]
    fn token_bucket_ignores_a_clock_that_reads_earlier() {
        let mut bucket = TokenBucket::full_less_one(1_000, 10, 30);
        assert!(bucket.take(500, 10, 30));
        assert!(bucket.take(400, 10, 30));
        assert!(!bucket.take(300, 10, 30), "spent: no wrap-around refill");
        // An empty per-CPU bucket (all zero) starts full at its first use.
        let mut fresh = TokenBucket::default();
        assert!(fresh.take(5_000_000_000, 10, 30));
    }
}
