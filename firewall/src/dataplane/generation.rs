//! Writing a compiled rule set into the idle generation of the maps and flipping to it: only
//! the entries that differ from what the generation holds are written, so a reload that
//! changes one rule costs a handful of map updates.
use std::borrow::Cow;
use std::collections::{HashMap as StdHashMap, HashSet};
use std::hash::Hash;

use anyhow::{Context as _, Result};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues};
use aya::util::nr_cpus;
use aya::Pod;
use firewall_common::map_names::*;
use firewall_common::{
    exact_word, Counter, GenerationConfig, IfaceKey, RuleBits, V4KeyData, V6KeyData,
    EXACT_BITS_PER_FIELD, GEN_PREFIX_BITS, MAX_RULES, TRIE_DST_V4, TRIE_DST_V6, TRIE_SRC_V4,
    TRIE_SRC_V6,
};
use ipnet::{Ipv4Net, Ipv6Net};

use crate::dataplane::maps::{self, Generations};
use crate::dataplane::sys::{secs_to_ns, wait_for_packets_in_flight};
use crate::dataplane::{batch, Held, Kernel};
use crate::host::ifaces::ifindex;
use crate::rules::compile::{AddressTable, Compiled, Prefix};

/// An address field: its trie, its `TRIE_*` number, and where a rule set keeps its table.
type AddressField<N> = (&'static str, u32, fn(&Compiled) -> &AddressTable<N>);

const V4_FIELDS: [AddressField<Ipv4Net>; 2] = [
    (SRC_V4, TRIE_SRC_V4, |c| &c.src_v4),
    (DST_V4, TRIE_DST_V4, |c| &c.dst_v4),
];
const V6_FIELDS: [AddressField<Ipv6Net>; 2] = [
    (SRC_V6, TRIE_SRC_V6, |c| &c.src_v6),
    (DST_V6, TRIE_DST_V6, |c| &c.dst_v6),
];

impl Kernel {
    /// Writes `compiled` into the idle generation, then makes it live with one map update.
    /// On error the live generation is untouched. Returns the map updates it took.
    pub fn apply(&mut self, compiled: &Compiled) -> Result<usize> {
        let gen = self.active_generation()? ^ 1;
        // Until this write completes, nobody knows what the idle generation holds.
        let held = std::mem::replace(&mut self.held[gen as usize], Held::Unknown);
        let old = match held {
            Held::Rules(old) => Some(*old),
            Held::Zeroed => None,
            Held::Unknown => {
                self.clear_generation(gen)
                    .context("clearing what an interrupted write left")?;
                None
            }
        };
        let updates = self
            .write_generation(gen, compiled, old.as_ref())
            .context("writing the new rules into the kernel maps")?;
        let mut active: Array<&mut MapData, u32> =
            Array::try_from(self.map_mut(ACTIVE_GENERATION)?)?;
        active
            .set(0, gen, 0)
            .context("switching to the new rules")?;
        // A packet that read the old generation number just before the switch may still be
        // classified with it (its CPU may even be descheduled meanwhile): the next apply must
        // not overwrite that generation until every such packet is through.
        wait_for_packets_in_flight();
        self.held[gen as usize] = Held::Rules(Box::new(compiled.clone()));
        Ok(updates + 1)
    }

    /// Forgets what the idle generation holds, as a write into it that failed half-way does;
    /// the next apply clears it first. For tests of that path.
    #[cfg(feature = "testing")]
    pub fn forget_idle_generation(&mut self) -> Result<()> {
        let idle = self.active_generation()? ^ 1;
        self.held[idle as usize] = Held::Unknown;
        Ok(())
    }

    /// Zeroes generation `gen` in every rule map, after a write into it failed half-way (the
    /// only time its contents are unknown).
    fn clear_generation(&mut self, gen: u32) -> Result<()> {
        for spec in maps::MAPS {
            match spec.generations {
                Generations::Array { slots, zero } => zero(self.map_mut(spec.name)?, gen, slots)?,
                Generations::Keyed { clear } => clear(self.map_mut(spec.name)?, gen)?,
                Generations::Shared | Generations::Slot => {}
            }
        }
        Ok(())
    }

    fn write_generation(
        &mut self,
        gen: u32,
        new: &Compiled,
        old: Option<&Compiled>,
    ) -> Result<usize> {
        let mut updates = 0;
        let any_address = |c: &Compiled| {
            [
                c.src_v4.any(),
                c.dst_v4.any(),
                c.src_v6.any(),
                c.dst_v6.any(),
            ]
            .map(|class| c.address_classes[class as usize])
            .to_vec()
        };
        let names = Contents {
            new: padded(&new.names, old.map(|o| o.names.len())).into(),
            old: old.map(|o| o.names.as_slice().into()),
        };
        let any = Contents {
            new: any_address(new).into(),
            old: old.map(|o| any_address(o).into()),
        };
        let arrays: [(&str, &dyn ArrayWrite); 8] = [
            (
                ADDRESS_CLASSES,
                &Contents::of(new, old, |c| &c.address_classes),
            ),
            (RULE_ACTIONS, &Contents::of(new, old, |c| &c.actions)),
            (RULE_LIMITS, &Contents::of(new, old, |c| &c.limits)),
            (RULE_NAMES, &names),
            (PROTO_BITS, &Contents::of(new, old, |c| &c.proto_bits)),
            (PORT_CLASS, &Contents::of(new, old, |c| &c.port_class)),
            (PORT_BITS, &Contents::of(new, old, |c| &c.port_bits)),
            (ANY_ADDRESS, &any),
        ];
        for (name, contents) in arrays {
            updates += contents.write(self.map_mut(name)?, gen * maps::slots(name))?;
        }
        for (trie, field, table) in V4_FIELDS {
            let tables = (table(new), old.map(table));
            updates += self.write_addresses((trie, EXACT_V4), field, gen, tables, v4_key)?;
        }
        for (trie, field, table) in V6_FIELDS {
            let tables = (table(new), old.map(table));
            updates += self.write_addresses((trie, EXACT_V6), field, gen, tables, v6_key)?;
        }
        updates += self.write_interfaces(gen, new, old.is_none())?;
        self.reset_rule_counters(gen, new.actions.len())?;
        let config = GenerationConfig {
            default_action: new.default_action,
            tries_in_use: tries_in_use(new),
            checks: new.checks,
            exact_in_use: exact_in_use(new),
            tcp_timeout_ns: secs_to_ns(new.timeouts.tcp),
            tcp_closing_timeout_ns: secs_to_ns(new.timeouts.tcp_closing),
            udp_timeout_ns: secs_to_ns(new.timeouts.udp),
            icmp_timeout_ns: secs_to_ns(new.timeouts.icmp),
            log_line_ns: new.log_line_ns,
            log_burst_ns: new.log_burst_ns,
            outbound_action: new.outbound_action,
            _pad: 0,
        };
        let mut configs: Array<&mut MapData, GenerationConfig> =
            Array::try_from(self.map_mut(GEN_CONFIG)?)?;
        configs.set(gen, config, 0)?;
        Ok(updates + 1)
    }

    /// One address field (`new`, and what the generation holds): exact entries into the
    /// family's exact map, the rest into the trie.
    fn write_addresses<N: Prefix + Copy + Ord, K: Pod + AsMut<[u32]>>(
        &mut self,
        (trie, exact_map): (&str, &str),
        field: u32,
        gen: u32,
        (new, old): (&AddressTable<N>, Option<&AddressTable<N>>),
        key: fn(u32, &N) -> Key<K>,
    ) -> Result<usize> {
        let prefixes = sorted_diff(old.map_or(&[], |o| o.trie.as_slice()), &new.trie);
        let mut map: LpmTrie<&mut MapData, K, u32> = LpmTrie::try_from(self.map_mut(trie)?)?;
        for net in &prefixes.stale {
            map.remove(&key(gen, net))?;
        }
        for (net, class) in &prefixes.changed {
            map.insert(&key(gen, net), *class, 0)?;
        }
        let exact_key = |net: &N| -> K {
            let mut data = key(gen, net).data();
            data.as_mut()[0] = exact_word(gen, field, level_index::<N>(net.length())).to_be();
            data
        };
        let exact = sorted_diff(old.map_or(&[], |o| o.exact.as_slice()), &new.exact);
        let stale: Vec<K> = exact.stale.iter().map(exact_key).collect();
        let changed: Vec<(K, u32)> = exact
            .changed
            .iter()
            .map(|(net, class)| (exact_key(net), *class))
            .collect();
        let map = self.map_mut(exact_map)?;
        batch::remove::<K, u32>(map, &stale)?;
        batch::insert(map, &changed)?;
        Ok(prefixes.updates() + exact.updates())
    }

    /// The interface map of generation `gen`, by ifindex; `fresh`: the generation holds
    /// nothing. Interfaces that do not exist (yet) are skipped with a warning: rules naming
    /// only them match nothing.
    fn write_interfaces(&mut self, gen: u32, new: &Compiled, fresh: bool) -> Result<usize> {
        let new_list: Vec<(u32, RuleBits)> = new
            .ifaces
            .iter()
            .filter_map(|(name, bits)| match ifindex(name) {
                Some(index) => Some((index, *bits)),
                None => {
                    log::warn!("interface {name} named by rules does not exist here");
                    None
                }
            })
            .collect();
        // What the generation holds: nothing when it is fresh or was just cleared.
        let old_map = std::mem::take(&mut self.ifaces_written[gen as usize]);
        let old_map = if fresh { StdHashMap::new() } else { old_map };
        let ifaces = diff(&old_map, &new_list);
        let new_map: StdHashMap<u32, RuleBits> = new_list.into_iter().collect();
        let mut map: HashMap<&mut MapData, IfaceKey, RuleBits> =
            HashMap::try_from(self.map_mut(IFACE_BITS)?)?;
        for index in &ifaces.stale {
            let _ = map.remove(&[gen.to_be(), *index]);
        }
        for (index, bits) in &ifaces.changed {
            map.insert([gen.to_be(), *index], bits, 0)?;
        }
        self.ifaces_written[gen as usize] = new_map;
        let mut other: Array<&mut MapData, RuleBits> =
            Array::try_from(self.map_mut(OTHER_IFACES)?)?;
        other.set(gen, new.other_ifaces, 0)?;
        Ok(ifaces.updates() + 1)
    }

    fn reset_rule_counters(&mut self, gen: u32, rules: usize) -> Result<()> {
        let mut stats: PerCpuArray<&mut MapData, Counter> =
            PerCpuArray::try_from(self.map_mut(STATS)?)?;
        let cpus = nr_cpus().map_err(|(_, error)| error)?;
        for rule in 0..rules as u32 {
            let zero = PerCpuValues::try_from(vec![Counter::default(); cpus])?;
            stats.set(gen * MAX_RULES as u32 + rule, zero, 0)?;
        }
        Ok(())
    }
}

/// What turns the entries `old` into `new`.
struct Diff<K, V> {
    /// Keys only `old` has: to remove.
    stale: Vec<K>,
    /// Entries that are new or changed: to write.
    changed: Vec<(K, V)>,
}

impl<K, V> Diff<K, V> {
    fn updates(&self) -> usize {
        self.stale.len() + self.changed.len()
    }
}

/// Changed entries come in `new`'s order (the compiler's, which is sorted), so a generation is
/// written in the same order on every run.
fn diff<K: Copy + Eq + Hash, V: Copy + PartialEq>(
    old: &StdHashMap<K, V>,
    new: &[(K, V)],
) -> Diff<K, V> {
    let new_keys: HashSet<K> = new.iter().map(|(key, _)| *key).collect();
    Diff {
        stale: old
            .keys()
            .filter(|key| !new_keys.contains(key))
            .copied()
            .collect(),
        changed: new
            .iter()
            .filter(|(key, value)| old.get(key) != Some(value))
            .copied()
            .collect(),
    }
}

/// The new values of one array map's generation, and what the generation holds (`None`:
/// zero-filled).
struct Contents<'a, V: Clone> {
    new: Cow<'a, [V]>,
    old: Option<Cow<'a, [V]>>,
}

impl<'a, V: Clone> Contents<'a, V> {
    fn of(new: &'a Compiled, old: Option<&'a Compiled>, values: fn(&Compiled) -> &Vec<V>) -> Self {
        Contents {
            new: values(new).as_slice().into(),
            old: old.map(|old| values(old).as_slice().into()),
        }
    }
}

/// [`diff`] of two lists sorted by key (address tables are), by one merge: no hash map of a
/// million entries on the way.
fn sorted_diff<K: Copy + Ord, V: Copy + PartialEq>(old: &[(K, V)], new: &[(K, V)]) -> Diff<K, V> {
    let mut result = Diff {
        stale: Vec::new(),
        changed: Vec::new(),
    };
    let (mut old, mut new) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (old.peek(), new.peek()) {
            (Some((old_key, old_value)), Some(&&(new_key, new_value))) => {
                match old_key.cmp(&new_key) {
                    std::cmp::Ordering::Less => {
                        result.stale.push(*old_key);
                        old.next();
                    }
                    std::cmp::Ordering::Greater => {
                        result.changed.push((new_key, new_value));
                        new.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if *old_value != new_value {
                            result.changed.push((new_key, new_value));
                        }
                        old.next();
                        new.next();
                    }
                }
            }
            (Some((old_key, _)), None) => {
                result.stale.push(*old_key);
                old.next();
            }
            (None, Some(&&entry)) => {
                result.changed.push(entry);
                new.next();
            }
            (None, None) => return result,
        }
    }
}

/// [`Contents`] of any value type, so that one table lists them all.
trait ArrayWrite {
    /// Writes the new values at `base..`, skipping those equal to what the generation holds;
    /// returns the updates.
    fn write(&self, map: &mut Map, base: u32) -> Result<usize>;
}

impl<V: Pod + PartialEq + Default> ArrayWrite for Contents<'_, V> {
    fn write(&self, map: &mut Map, base: u32) -> Result<usize> {
        let mut updates = 0;
        let mut array: Array<&mut MapData, V> = Array::try_from(map)?;
        for (index, value) in self.new.iter().enumerate() {
            let current = match &self.old {
                Some(old) => old.get(index).copied(),
                None => Some(V::default()),
            };
            if current.as_ref() != Some(value) {
                array.set(base + index as u32, *value, 0)?;
                updates += 1;
            }
        }
        Ok(updates)
    }
}

/// `TRIE_*` bits of the tries with more than their `/0` entry.
fn tries_in_use(compiled: &Compiled) -> u32 {
    let bit = |field: u32, trie_len: usize| u32::from(trie_len > 1) << field;
    bit(TRIE_SRC_V4, compiled.src_v4.trie.len())
        | bit(TRIE_DST_V4, compiled.dst_v4.trie.len())
        | bit(TRIE_SRC_V6, compiled.src_v6.trie.len())
        | bit(TRIE_DST_V6, compiled.dst_v6.trie.len())
}

/// `field * EXACT_BITS_PER_FIELD + level index` bits of the exact levels in use.
fn exact_in_use(compiled: &Compiled) -> u32 {
    fn bits<N: Prefix>(field: u32, table: &AddressTable<N>) -> u32 {
        table.exact.iter().fold(0, |bits, (net, _)| {
            bits | 1 << (field * EXACT_BITS_PER_FIELD + level_index::<N>(net.length()))
        })
    }
    bits(TRIE_SRC_V4, &compiled.src_v4)
        | bits(TRIE_DST_V4, &compiled.dst_v4)
        | bits(TRIE_SRC_V6, &compiled.src_v6)
        | bits(TRIE_DST_V6, &compiled.dst_v6)
}

/// Index in `N::LEVELS` of an exact entry's length.
fn level_index<N: Prefix>(len: u8) -> u32 {
    N::LEVELS
        .iter()
        .position(|&level| level == len)
        .expect("exact entries have a level's length") as u32
}

/// `values` followed by defaults up to `len` entries: a shorter list must blank what a longer
/// one left (names are read up to the first blank).
fn padded<V: Clone + Default>(values: &[V], len: Option<usize>) -> Vec<V> {
    let mut padded = values.to_vec();
    padded.resize(values.len().max(len.unwrap_or(0)), V::default());
    padded
}

fn v4_key(gen: u32, net: &Ipv4Net) -> Key<V4KeyData> {
    let data = [gen.to_be(), u32::from_ne_bytes(net.addr().octets())];
    Key::new(GEN_PREFIX_BITS + u32::from(net.prefix_len()), data)
}

fn v6_key(gen: u32, net: &Ipv6Net) -> Key<V6KeyData> {
    let mut data = [gen.to_be(), 0, 0, 0, 0];
    data[1..].copy_from_slice(&firewall_common::address_words(net.addr().into()));
    Key::new(GEN_PREFIX_BITS + u32::from(net.prefix_len()), data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Up to `len` entries with distinct keys, sorted by key.
    fn sorted_list(rng: &mut impl rand::Rng, len: usize) -> Vec<(u16, u8)> {
        let map: std::collections::BTreeMap<u16, u8> = (0..len)
            .map(|_| (rng.gen_range(0..64), rng.gen_range(0..3)))
            .collect();
        map.into_iter().collect()
    }

    #[test]
    fn sorted_diff_finds_what_the_hash_diff_finds() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..200 {
            let old_len = rng.gen_range(0..40);
            let old = sorted_list(&mut rng, old_len);
            let new_len = rng.gen_range(0..40);
            let new = sorted_list(&mut rng, new_len);
            let by_merge = sorted_diff(&old, &new);
            let by_hash = diff(&old.iter().copied().collect(), &new);
            let mut stale = by_hash.stale.clone();
            stale.sort_unstable();
            assert_eq!(by_merge.stale, stale, "{old:?} -> {new:?}");
            assert_eq!(by_merge.changed, by_hash.changed, "{old:?} -> {new:?}");
        }
    }
}
