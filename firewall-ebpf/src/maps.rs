//! The BPF maps: rule bit sets per packet field, double-buffered by generation (see
//! `firewall_common`), plus counters and the drop-log token bucket. Userspace lists every map
//! here in its inventory (`firewall/src/dataplane/maps.rs`); a test checks the two agree.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use firewall_common::{
    bans::{self, Ban},
    Counter, FlowKey, FlowState, GenerationConfig, IfaceKey, LogLimit, RateKey, RateLimit,
    RuleBits, RuleName, TokenBucket, V4KeyData, V6KeyData, ADDRESS_FIELDS, GENERATIONS,
    LOG_EVENTS_BYTES, MAX_ADDRESS_CLASSES, MAX_DHCP_IFACES, MAX_EXACT_V4, MAX_EXACT_V6, MAX_FLOWS,
    MAX_IFACES, MAX_PORT_CLASSES, MAX_RATE_SOURCES, MAX_RULES, MAX_TRIE_ENTRIES, PORTS,
    PROTO_SLOTS, STAT_SLOTS,
};

/// One element: the generation packets are classified with.
#[map(name = "FW_ACTIVE_GEN")]
pub static ACTIVE_GEN: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "FW_GEN_CONFIG")]
pub static GEN_CONFIG: Array<GenerationConfig> = Array::with_max_entries(GENERATIONS, 0);

/// `gen * MAX_RULES + rule` -> ACTION_ALLOW / ACTION_DENY.
#[map(name = "FW_RULE_ACTIONS")]
pub static RULE_ACTIONS: Array<u32> = Array::with_max_entries(GENERATIONS * MAX_RULES as u32, 0);

/// `gen * MAX_RULES + rule` -> its name, for `firewall stats`; never read here.
#[map(name = "FW_RULE_NAMES")]
pub static RULE_NAMES: Array<RuleName> = Array::with_max_entries(GENERATIONS * MAX_RULES as u32, 0);

/// `gen * MAX_RULES + rule` -> its per-source rate limit (zero: none).
#[map(name = "FW_RULE_LIMITS")]
pub static RULE_LIMITS: Array<RateLimit> =
    Array::with_max_entries(GENERATIONS * MAX_RULES as u32, 0);

/// Per (rule, source) token buckets of rate-limited rules.
#[map(name = "FW_RATE_BUCKETS")]
pub static RATE_BUCKETS: LruHashMap<RateKey, TokenBucket> =
    LruHashMap::with_max_entries(MAX_RATE_SOURCES, 0);

/// `gen * ADDRESS_FIELDS + TRIE_*` -> the `/0` bits of that trie, read instead of the trie
/// when it holds nothing else.
#[map(name = "FW_ANY_ADDRESS")]
pub static ANY_ADDRESS: Array<RuleBits> = Array::with_max_entries(GENERATIONS * ADDRESS_FIELDS, 0);

/// `gen * MAX_ADDRESS_CLASSES + class` -> the rules of every address entry of that class
/// (the tries and exact maps below store class ids: a blocklist has few distinct bit sets).
#[map(name = "FW_ADDRESS_CLASSES")]
pub static ADDRESS_CLASSES: Array<RuleBits> =
    Array::with_max_entries(GENERATIONS * MAX_ADDRESS_CLASSES, 0);

/// Source / destination prefix -> class of the rules whose `from` / `to` contains it.
#[map(name = "FW_SRC_V4")]
pub static SRC_V4: LpmTrie<V4KeyData, u32> = LpmTrie::with_max_entries(MAX_TRIE_ENTRIES, 0);
#[map(name = "FW_DST_V4")]
pub static DST_V4: LpmTrie<V4KeyData, u32> = LpmTrie::with_max_entries(MAX_TRIE_ENTRIES, 0);
#[map(name = "FW_SRC_V6")]
pub static SRC_V6: LpmTrie<V6KeyData, u32> = LpmTrie::with_max_entries(MAX_TRIE_ENTRIES, 0);
#[map(name = "FW_DST_V6")]
pub static DST_V6: LpmTrie<V6KeyData, u32> = LpmTrie::with_max_entries(MAX_TRIE_ENTRIES, 0);

/// `(exact_word(gen, field, level), address cut to the level)` -> class, looked up before the
/// tries. Allocated per entry like the tries.
#[map(name = "FW_EXACT_V4")]
pub static EXACT_V4: HashMap<V4KeyData, u32> =
    HashMap::with_max_entries(MAX_EXACT_V4, BPF_F_NO_PREALLOC);
#[map(name = "FW_EXACT_V6")]
pub static EXACT_V6: HashMap<V6KeyData, u32> =
    HashMap::with_max_entries(MAX_EXACT_V6, BPF_F_NO_PREALLOC);

/// `(gen, ingress ifindex)` -> rules that apply on that interface (those without `iface` and
/// those naming it).
#[map(name = "FW_IFACE_BITS")]
pub static IFACE_BITS: HashMap<IfaceKey, RuleBits> =
    HashMap::with_max_entries(GENERATIONS * MAX_IFACES, 0);

/// Per generation: the rules that apply on interfaces no rule names.
#[map(name = "FW_OTHER_IFACES")]
pub static OTHER_IFACES: Array<RuleBits> = Array::with_max_entries(GENERATIONS, 0);

/// `gen * PROTO_SLOTS + proto_slot(v6, ip_proto)` -> rules that can match that protocol in
/// that family.
#[map(name = "FW_PROTO_BITS")]
pub static PROTO_BITS: Array<RuleBits> = Array::with_max_entries(GENERATIONS * PROTO_SLOTS, 0);

/// `gen * 65536 + dport` -> port class; class 0 means "no port".
#[map(name = "FW_PORT_CLASS")]
pub static PORT_CLASS: Array<u32> = Array::with_max_entries(GENERATIONS * PORTS, 0);

/// `gen * MAX_PORT_CLASSES + class` -> rules that match ports of that class.
#[map(name = "FW_PORT_BITS")]
pub static PORT_BITS: Array<RuleBits> = Array::with_max_entries(GENERATIONS * MAX_PORT_CLASSES, 0);

/// Per-CPU packet/byte counters, slots as in `firewall_common::STAT_*`.
#[map(name = "FW_STATS")]
pub static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(STAT_SLOTS, 0);

/// The host's own flows, written by the tc egress program, read by the XDP program.
#[map(name = "FW_FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, FlowState> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

/// `local_port_slot(udp, port)` -> tick of the host's last TCP/UDP packet from that local
/// port ([`firewall_common::LOCAL_PORT_TICK_SHIFT`]), written by the tc egress program.
#[map(name = "FW_LOCAL_PORTS")]
pub static LOCAL_PORTS: Array<u32> = Array::with_max_entries(2 * PORTS, 0);

/// Ifindex -> `bpf_ktime_get_ns` of the host's last DHCP request sent there, written by the
/// tc egress program, read by the XDP program.
#[map(name = "FW_DHCP_REQUESTS")]
pub static DHCP_REQUESTS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(MAX_DHCP_IFACES, 0);

/// Log lines for the daemon ([`firewall_common::LogEvent`] records).
#[map(name = "FW_LOG_EVENTS")]
pub static LOG_EVENTS: RingBuf = RingBuf::with_byte_size(LOG_EVENTS_BYTES, 0);

/// Runtime bans ([`firewall_common::bans`]): hosts, prefixes, and which of the two hold any.
#[map(name = "FW_BAN_HOSTS")]
pub static BAN_HOSTS: HashMap<[u32; 4], Ban> =
    HashMap::with_max_entries(bans::MAX_HOSTS, BPF_F_NO_PREALLOC);
#[map(name = "FW_BAN_PREFIXES")]
pub static BAN_PREFIXES: LpmTrie<[u32; 4], Ban> = LpmTrie::with_max_entries(bans::MAX_PREFIXES, 0);
#[map(name = "FW_BANS_IN_USE")]
pub static BANS_IN_USE: Array<u32> = Array::with_max_entries(1, 0);

/// The packet log's rate limit and its count of refused lines, per CPU.
#[map(name = "FW_LOG_LIMIT")]
pub static LOG_LIMIT: PerCpuArray<LogLimit> = PerCpuArray::with_max_entries(1, 0);

/// Adds one packet of `bytes` to counter `slot`.
#[inline(always)]
pub fn count(slot: u32, bytes: u64) {
    if let Some(counter) = STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes;
        }
    }
}
