//! Classification by bit vectors: one lookup per packet field (the port field is an ICMP
//! message's type for ICMP) returns the set of rules that field matches; the lowest rule in
//! the intersection is the first match. The cost is five lookups (an address can take a few)
//! plus an AND of the sets' word summaries and of the words they all allow, whatever the
//! number of rules.
//!
//! The cheap fields come first: protocol, port and interface are array reads, addresses are
//! hash and trie lookups. When no rule allows the packet's protocol, port and interface, or
//! the first rule that does matches every address, the addresses are never looked up; that
//! is what a flood to a closed port costs.
use aya_ebpf::maps::{lpm_trie::Key, LpmTrie};
use firewall_common::{
    exact_word, proto_slot, GenerationConfig, RuleBits, V4KeyData, V6KeyData, ADDRESS_FIELDS,
    CHECK_IFACES, EXACT_BITS_PER_FIELD, GEN_PREFIX_BITS, MAX_ADDRESS_CLASSES, MAX_PORT_CLASSES,
    PORTS, PROTO_SLOTS, RULE_WORDS, TRIE_DST_V4, TRIE_DST_V6, TRIE_SRC_V4, TRIE_SRC_V6, V4_LEVELS,
};

use crate::{
    maps::{
        ADDRESS_CLASSES, ANY_ADDRESS, DST_V4, DST_V6, EXACT_V4, EXACT_V6, IFACE_BITS, OTHER_IFACES,
        PORT_BITS, PORT_CLASS, PROTO_BITS, SRC_V4, SRC_V6,
    },
    parse::Packet,
};

/// Index of the first rule of the packet's direction (in rules if not `outbound`, out rules
/// if it is) matching `packet` in generation `gen`, if any. `ifindex` is the interface it
/// arrived on or leaves by.
#[inline(always)]
pub fn first_match(
    gen: u32,
    config: &GenerationConfig,
    packet: &Packet,
    ifindex: u32,
    outbound: bool,
) -> Option<u32> {
    // The direction is part of the protocol slot: the other direction's rules are in none.
    let slot = proto_slot(outbound, packet.v6, packet.proto);
    let proto = PROTO_BITS.get(gen * PROTO_SLOTS + slot)?;
    // A TCP/UDP destination port or an ICMP type: both index the same class table.
    let class = match packet.port_class_key() {
        Some(key) => *PORT_CLASS.get(gen * PORTS + u32::from(key))?,
        None => 0,
    };
    if class >= MAX_PORT_CLASSES {
        return None;
    }
    let ports = PORT_BITS.get(gen * MAX_PORT_CLASSES + class)?;
    // Without interface rules the fifth set is the protocol set again: ANDing it twice is
    // free of branches in the loop below.
    let iface = if config.checks & CHECK_IFACES != 0 {
        match IFACE_BITS.get_ptr([gen.to_be(), ifindex]) {
            // SAFETY: map values stay valid while the program runs (RCU).
            Some(bits) => unsafe { &*bits },
            None => OTHER_IFACES.get(gen)?,
        }
    } else {
        proto
    };
    // The first rule the cheap fields allow, and whether it holds for every address.
    let first = lowest_common_rule([proto, ports, iface, proto, proto])?;
    let (src_field, dst_field) = if packet.v6 {
        (TRIE_SRC_V6, TRIE_DST_V6)
    } else {
        (TRIE_SRC_V4, TRIE_DST_V4)
    };
    let any_src = ANY_ADDRESS.get(gen * ADDRESS_FIELDS + src_field)?;
    let any_dst = ANY_ADDRESS.get(gen * ADDRESS_FIELDS + dst_field)?;
    if holds(any_src, first) && holds(any_dst, first) {
        return Some(first);
    }
    let (src, dst) = if packet.v6 {
        (
            address_v6(gen, config, (TRIE_SRC_V6, any_src), &SRC_V6, &packet.src)?,
            address_v6(gen, config, (TRIE_DST_V6, any_dst), &DST_V6, &packet.dst)?,
        )
    } else {
        (
            address_v4(gen, config, (TRIE_SRC_V4, any_src), &SRC_V4, packet.src[0])?,
            address_v4(gen, config, (TRIE_DST_V4, any_dst), &DST_V4, packet.dst[0])?,
        )
    };
    lowest_common_rule([src, dst, proto, ports, iface])
}

/// `V4_LEVELS` as masks of an address word holding its bytes in network order.
const V4_LEVEL_MASKS: [u32; V4_LEVELS.len()] = {
    let mut masks = [0; V4_LEVELS.len()];
    let mut index = 0;
    while index < masks.len() {
        masks[index] = (u32::MAX << (32 - V4_LEVELS[index] as u32)).to_be();
        index += 1;
    }
    masks
};

/// Rules an IPv4 address satisfies: the entry of the longest exact level holding it, else the
/// longest prefix in the trie, else (trie holding only `/0`) `any`, the field's `/0` bits
/// (read once by the caller).
#[inline(always)]
fn address_v4(
    gen: u32,
    config: &GenerationConfig,
    (field, any): (u32, &'static RuleBits),
    trie: &'static LpmTrie<V4KeyData, u32>,
    addr: u32,
) -> Option<&'static RuleBits> {
    let levels = (config.exact_in_use >> (field * EXACT_BITS_PER_FIELD)) & 0xff;
    for (level, mask) in V4_LEVEL_MASKS.iter().enumerate() {
        // No level left in use (often none at all: rules without addresses).
        if levels >> level == 0 {
            break;
        }
        if levels & (1 << level) != 0 {
            let key = [exact_word(gen, field, level as u32).to_be(), addr & mask];
            if let Some(class) = EXACT_V4.get_ptr(key) {
                // SAFETY: map values stay valid while the program runs (RCU).
                return class_bits(gen, unsafe { *class });
            }
        }
    }
    if config.tries_in_use & (1 << field) != 0 {
        let class = trie.get(Key::new(GEN_PREFIX_BITS + 32, [gen.to_be(), addr]))?;
        return class_bits(gen, *class);
    }
    Some(any)
}

/// As [`address_v4`], with hosts as the only exact level.
#[inline(always)]
fn address_v6(
    gen: u32,
    config: &GenerationConfig,
    (field, any): (u32, &'static RuleBits),
    trie: &'static LpmTrie<V6KeyData, u32>,
    addr: &[u32; 4],
) -> Option<&'static RuleBits> {
    if config.exact_in_use & (1 << (field * EXACT_BITS_PER_FIELD)) != 0 {
        let key = [
            exact_word(gen, field, 0).to_be(),
            addr[0],
            addr[1],
            addr[2],
            addr[3],
        ];
        if let Some(class) = EXACT_V6.get_ptr(key) {
            // SAFETY: as above.
            return class_bits(gen, unsafe { *class });
        }
    }
    if config.tries_in_use & (1 << field) != 0 {
        let key = Key::new(
            GEN_PREFIX_BITS + 128,
            [gen.to_be(), addr[0], addr[1], addr[2], addr[3]],
        );
        return class_bits(gen, *trie.get(key)?);
    }
    Some(any)
}

/// Whether `set` holds `rule`. The word index is bounded where the verifier sees it: Linux 6.1
/// loses the bounds of the rule number LLVM builds (an OR of the word's offset and a table
/// entry), and LLVM would drop a mask it can prove redundant.
#[inline(always)]
fn holds(set: &RuleBits, rule: u32) -> bool {
    let word = core::hint::black_box(rule as usize / 64) % RULE_WORDS;
    set.words[word] & (1 << (rule % 64)) != 0
}

/// The rules of address class `class` in generation `gen` (the address maps store class ids).
#[inline(always)]
fn class_bits(gen: u32, class: u32) -> Option<&'static RuleBits> {
    // An id past the limit would read the other generation's classes.
    if class >= MAX_ADDRESS_CLASSES {
        return None;
    }
    ADDRESS_CLASSES.get(gen * MAX_ADDRESS_CLASSES + class)
}

/// The lowest rule in all five sets. Visits only the words every summary marks, lowest
/// first: a packet that only the last rules can match does not step through the words before
/// theirs (that walk was the program's hottest line under a flood at 1,024 rules).
#[inline(always)]
fn lowest_common_rule(sets: [&RuleBits; 5]) -> Option<u32> {
    let mut candidates =
        sets[0].summary & sets[1].summary & sets[2].summary & sets[3].summary & sets[4].summary;
    for _ in 0..RULE_WORDS {
        if candidates == 0 {
            return None;
        }
        // Bounded where the verifier sees it (summaries hold RULE_WORDS bits).
        let word = core::hint::black_box(lowest_bit(candidates) as usize) % RULE_WORDS;
        candidates &= candidates - 1;
        let common = sets[0].words[word]
            & sets[1].words[word]
            & sets[2].words[word]
            & sets[3].words[word]
            & sets[4].words[word];
        if common != 0 {
            return Some(word as u32 * 64 + lowest_bit(common));
        }
    }
    None
}

/// Index of the lowest set bit of a non-zero word: the bits below it counted without a
/// branch (BPF has no count-trailing-zeros; branches here multiply the verifier's paths).
#[inline(always)]
fn lowest_bit(word: u64) -> u32 {
    let below = (word & word.wrapping_neg()) - 1;
    let pairs = below - ((below >> 1) & 0x5555_5555_5555_5555);
    let nibbles = (pairs & 0x3333_3333_3333_3333) + ((pairs >> 2) & 0x3333_3333_3333_3333);
    let bytes = (nibbles + (nibbles >> 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    (bytes.wrapping_mul(0x0101_0101_0101_0101) >> 56) as u32
}
