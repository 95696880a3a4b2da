//! Classification by bit vectors: one lookup per packet field returns the set of rules that
//! field matches; the lowest rule in the intersection is the first match. The cost is five
//! lookups (an address can take a few) plus an AND of the sets' word summaries and of the words both summaries allow,
//! whatever the number of rules.
use aya_ebpf::maps::{lpm_trie::Key, LpmTrie};
use firewall_common::{
    exact_word, GenerationConfig, RuleBits, V4KeyData, V6KeyData, ADDRESS_FIELDS, CHECK_IFACES,
    EXACT_BITS_PER_FIELD, GEN_PREFIX_BITS, MAX_ADDRESS_CLASSES, MAX_PORT_CLASSES, PORTS, PROTOS,
    RULE_WORDS, TRIE_DST_V4, TRIE_DST_V6, TRIE_SRC_V4, TRIE_SRC_V6, V4_LEVELS,
};

use crate::{
    maps::{
        ADDRESS_CLASSES, ANY_ADDRESS, DST_V4, DST_V6, EXACT_V4, EXACT_V6, IFACE_BITS, OTHER_IFACES,
        PORT_BITS, PORT_CLASS, PROTO_BITS, SRC_V4, SRC_V6,
    },
    parse::Packet,
};

/// Index of the first rule matching `packet` in generation `gen`, if any.
#[inline(always)]
pub fn first_match(
    gen: u32,
    config: &GenerationConfig,
    packet: &Packet,
    ifindex: u32,
) -> Option<u32> {
    let (src, dst) = if packet.v6 {
        (
            address_v6(gen, config, TRIE_SRC_V6, &SRC_V6, &packet.src)?,
            address_v6(gen, config, TRIE_DST_V6, &DST_V6, &packet.dst)?,
        )
    } else {
        (
            address_v4(gen, config, TRIE_SRC_V4, &SRC_V4, packet.src[0])?,
            address_v4(gen, config, TRIE_DST_V4, &DST_V4, packet.dst[0])?,
        )
    };
    let proto = PROTO_BITS.get(gen * PROTOS + u32::from(packet.proto))?;
    let class = match packet.dport() {
        Some(port) => *PORT_CLASS.get(gen * PORTS + u32::from(port))?,
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
/// longest prefix in the trie, else (trie holding only `/0`) the `/0` bits.
#[inline(always)]
fn address_v4(
    gen: u32,
    config: &GenerationConfig,
    field: u32,
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
    ANY_ADDRESS.get(gen * ADDRESS_FIELDS + field)
}

/// As [`address_v4`], with hosts as the only exact level.
#[inline(always)]
fn address_v6(
    gen: u32,
    config: &GenerationConfig,
    field: u32,
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
    ANY_ADDRESS.get(gen * ADDRESS_FIELDS + field)
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

#[inline(always)]
fn lowest_common_rule(sets: [&RuleBits; 5]) -> Option<u32> {
    let candidates =
        sets[0].summary & sets[1].summary & sets[2].summary & sets[3].summary & sets[4].summary;
    if candidates == 0 {
        return None;
    }
    for word in 0..RULE_WORDS {
        if candidates & (1 << word) == 0 {
            continue;
        }
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

/// Index of the lowest set bit of a non-zero word (BPF has no count-trailing-zeros).
#[inline(always)]
fn lowest_bit(mut word: u64) -> u32 {
    let mut index = 0;
    for shift in [32u32, 16, 8, 4, 2, 1] {
        let low_mask = (1u64 << shift) - 1;
        if word & low_mask == 0 {
            word >>= shift;
            index += shift;
        }
    }
    index
}
