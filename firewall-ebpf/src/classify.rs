//! Classification by bit vectors: one lookup per packet field returns the set of rules that
//! field matches; the lowest rule in the intersection is the first match. The cost is four
//! lookups plus an AND of the sets' word summaries and of the words both summaries allow,
//! whatever the number of rules.
use aya_ebpf::maps::{lpm_trie::Key, HashMap, LpmTrie};
use firewall_common::{
    GenerationConfig, RuleBits, V4KeyData, V6KeyData, ADDRESS_FIELDS, CHECK_IFACES,
    GEN_PREFIX_BITS, HOSTS_SHIFT, MAX_PORT_CLASSES, RULE_WORDS, TRIE_DST_V4, TRIE_DST_V6,
    TRIE_SRC_V4, TRIE_SRC_V6,
};

use crate::{
    maps::{
        ANY_ADDRESS, DST_HOSTS_V4, DST_HOSTS_V6, DST_V4, DST_V6, IFACE_BITS, OTHER_IFACES, PORTS,
        PORT_BITS, PORT_CLASS, PROTOS, PROTO_BITS, SRC_HOSTS_V4, SRC_HOSTS_V6, SRC_V4, SRC_V6,
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
        let (src_key, dst_key) = (v6_key(gen, &packet.src), v6_key(gen, &packet.dst));
        (
            address(gen, config, TRIE_SRC_V6, &SRC_HOSTS_V6, &SRC_V6, src_key)?,
            address(gen, config, TRIE_DST_V6, &DST_HOSTS_V6, &DST_V6, dst_key)?,
        )
    } else {
        let (src_key, dst_key) = (v4_key(gen, &packet.src), v4_key(gen, &packet.dst));
        (
            address(gen, config, TRIE_SRC_V4, &SRC_HOSTS_V4, &SRC_V4, src_key)?,
            address(gen, config, TRIE_DST_V4, &DST_HOSTS_V4, &DST_V4, dst_key)?,
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

/// Rules an address satisfies: its host entry if it has one, else the longest prefix in the
/// trie, else (trie holding only `/0`) the `/0` bits from an array.
#[inline(always)]
fn address<K: Copy>(
    gen: u32,
    config: &GenerationConfig,
    field: u32,
    hosts: &'static HashMap<K, RuleBits>,
    trie: &'static LpmTrie<K, RuleBits>,
    key: Key<K>,
) -> Option<&'static RuleBits> {
    if config.tries_in_use & (1 << (HOSTS_SHIFT + field)) != 0 {
        let data = key.data;
        if let Some(bits) = hosts.get_ptr(data) {
            // SAFETY: map values stay valid while the program runs (RCU).
            return Some(unsafe { &*bits });
        }
    }
    if config.tries_in_use & (1 << field) != 0 {
        return trie.get(key);
    }
    ANY_ADDRESS.get(gen * ADDRESS_FIELDS + field)
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
