//! Classification by bit vectors: one lookup per packet field returns the set of rules that
//! field matches; the lowest rule in the intersection is the first match. The cost is four
//! lookups plus an AND of the sets' word summaries and of the words both summaries allow,
//! whatever the number of rules.
use aya_ebpf::maps::lpm_trie::Key;
use firewall_common::{
    GenerationConfig, RuleBits, V4KeyData, V6KeyData, ADDRESS_FIELDS, GEN_PREFIX_BITS,
    MAX_PORT_CLASSES, RULE_WORDS, TRIE_DST_V4, TRIE_DST_V6, TRIE_SRC_V4, TRIE_SRC_V6,
};

use crate::{
    maps::{
        ANY_ADDRESS, DST_V4, DST_V6, PORTS, PORT_BITS, PORT_CLASS, PROTOS, PROTO_BITS, SRC_V4,
        SRC_V6,
    },
    parse::Packet,
};

/// Index of the first rule matching `packet` in generation `gen`, if any.
#[inline(always)]
pub fn first_match(gen: u32, config: &GenerationConfig, packet: &Packet) -> Option<u32> {
    let in_use = |field: u32| config.tries_in_use & (1 << field) != 0;
    let any = |field: u32| ANY_ADDRESS.get(gen * ADDRESS_FIELDS + field);
    let (src, dst) = if packet.v6 {
        (
            if in_use(TRIE_SRC_V6) {
                SRC_V6.get(v6_key(gen, &packet.src))
            } else {
                any(TRIE_SRC_V6)
            }?,
            if in_use(TRIE_DST_V6) {
                DST_V6.get(v6_key(gen, &packet.dst))
            } else {
                any(TRIE_DST_V6)
            }?,
        )
    } else {
        (
            if in_use(TRIE_SRC_V4) {
                SRC_V4.get(v4_key(gen, &packet.src))
            } else {
                any(TRIE_SRC_V4)
            }?,
            if in_use(TRIE_DST_V4) {
                DST_V4.get(v4_key(gen, &packet.dst))
            } else {
                any(TRIE_DST_V4)
            }?,
        )
    };
    let proto = PROTO_BITS.get(gen * PROTOS + u32::from(packet.proto))?;
    let class = match packet.dport {
        Some(port) => *PORT_CLASS.get(gen * PORTS + u32::from(port))?,
        None => 0,
    };
    if class >= MAX_PORT_CLASSES {
        return None;
    }
    let ports = PORT_BITS.get(gen * MAX_PORT_CLASSES + class)?;
    lowest_common_rule([src, dst, proto, ports])
}

#[inline(always)]
fn lowest_common_rule(sets: [&RuleBits; 4]) -> Option<u32> {
    let candidates = sets[0].summary & sets[1].summary & sets[2].summary & sets[3].summary;
    if candidates == 0 {
        return None;
    }
    for word in 0..RULE_WORDS {
        if candidates & (1 << word) == 0 {
            continue;
        }
        let common =
            sets[0].words[word] & sets[1].words[word] & sets[2].words[word] & sets[3].words[word];
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

#[inline(always)]
fn v4_key(gen: u32, addr: &[u32; 4]) -> Key<V4KeyData> {
    Key::new(GEN_PREFIX_BITS + 32, [gen.to_be(), addr[0]])
}

#[inline(always)]
fn v6_key(gen: u32, addr: &[u32; 4]) -> Key<V6KeyData> {
    Key::new(
        GEN_PREFIX_BITS + 128,
        [gen.to_be(), addr[0], addr[1], addr[2], addr[3]],
    )
}
