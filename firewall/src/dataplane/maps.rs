//! The inventory of the kernel program's maps (declared in `firewall-ebpf/src/maps.rs`): for
//! each, whether it is pinned and how it splits into generations. Pinning at load and
//! clearing a generation after an interrupted write both follow this table; a test checks it
//! against the maps of the real object.
use std::path::{Path, PathBuf};

use anyhow::Result;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData};
use aya::Pod;
use firewall_common::bans::map_names as bans;
use firewall_common::map_names::*;
use firewall_common::{
    IfaceKey, RateLimit, RuleBits, RuleName, V4KeyData, V6KeyData, ADDRESS_FIELDS, GEN_MASK,
    MAX_ADDRESS_CLASSES, MAX_PORT_CLASSES, MAX_RULES, PROTO_SLOTS,
};

use crate::rules::compile::PORTS;

/// One map of the kernel program.
pub struct MapSpec {
    pub name: &'static str,
    pub pin: Pin,
    pub generations: Generations,
}

/// Where a map is pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pin {
    Unpinned,
    /// With the build's maps, so that a later daemon of the same build takes it over.
    Build,
    /// With the bans, which every build shares ([`firewall_common::bans`]).
    Bans,
}

/// How a map holds the two generations of rules.
pub enum Generations {
    /// Not split: the switch itself, flows, counters, rate and log state.
    Shared,
    /// One entry per generation, rewritten whole by every write: never cleared.
    Slot,
    /// `slots` entries per generation, from `gen * slots`; `zero` zeroes those of a generation.
    Array {
        slots: u32,
        zero: fn(&mut Map, u32, u32) -> Result<()>,
    },
    /// Keys tagged with their generation in the first key word; `clear` removes a generation's.
    Keyed {
        clear: fn(&mut Map, u32) -> Result<()>,
    },
}

use Generations::{Shared, Slot};

const fn array<V: Pod + Default>(slots: u32) -> Generations {
    Generations::Array {
        slots,
        zero: zero_array::<V>,
    }
}

/// A trie of address class ids.
const fn trie<K: Pod + AsRef<[u32]>>() -> Generations {
    Generations::Keyed {
        clear: clear_trie::<K>,
    }
}

const fn hash<K: Pod + AsRef<[u32]>, V: Pod>() -> Generations {
    Generations::Keyed {
        clear: clear_hash::<K, V>,
    }
}

const fn map(name: &'static str, generations: Generations) -> MapSpec {
    MapSpec {
        name,
        pin: Pin::Build,
        generations,
    }
}

const RULES: u32 = MAX_RULES as u32;

/// Every map of the kernel program.
pub const MAPS: &[MapSpec] = &[
    map(ACTIVE_GENERATION, Shared),
    map(GEN_CONFIG, Slot),
    map(RULE_ACTIONS, array::<u32>(RULES)),
    map(RULE_NAMES, array::<RuleName>(RULES)),
    map(RULE_LIMITS, array::<RateLimit>(RULES)),
    map(RATE_BUCKETS, Shared),
    map(ANY_ADDRESS, array::<RuleBits>(ADDRESS_FIELDS)),
    map(ADDRESS_CLASSES, array::<RuleBits>(MAX_ADDRESS_CLASSES)),
    map(SRC_V4, trie::<V4KeyData>()),
    map(DST_V4, trie::<V4KeyData>()),
    map(SRC_V6, trie::<V6KeyData>()),
    map(DST_V6, trie::<V6KeyData>()),
    map(EXACT_V4, hash::<V4KeyData, u32>()),
    map(EXACT_V6, hash::<V6KeyData, u32>()),
    map(IFACE_BITS, hash::<IfaceKey, RuleBits>()),
    map(OTHER_IFACES, Slot),
    map(PROTO_BITS, array::<RuleBits>(PROTO_SLOTS)),
    map(PORT_CLASS, array::<u32>(PORTS as u32)),
    map(PORT_BITS, array::<RuleBits>(MAX_PORT_CLASSES)),
    map(STATS, Shared),
    map(FLOWS, Shared),
    map(DHCP_REQUESTS, Shared),
    map(LOCAL_PORTS, Shared),
    map(LOG_LIMIT, Shared),
    MapSpec {
        name: bans::HOSTS,
        pin: Pin::Bans,
        generations: Shared,
    },
    MapSpec {
        name: bans::PREFIXES,
        pin: Pin::Bans,
        generations: Shared,
    },
    MapSpec {
        name: bans::IN_USE,
        pin: Pin::Bans,
        generations: Shared,
    },
    // Not pinned: each daemon reads the log lines of its own program.
    MapSpec {
        name: LOG_EVENTS,
        pin: Pin::Unpinned,
        generations: Shared,
    },
    // The program's read-only data: the table LLVM makes of the lowest-set-bit count in
    // classification. Loaded afresh with the program, nothing to keep.
    MapSpec {
        name: ".rodata",
        pin: Pin::Unpinned,
        generations: Shared,
    },
];

/// The maps to pin, and where: in `build` or, for the bans, in `bans`.
pub fn pin_paths<'a>(
    build: &'a Path,
    bans: &'a Path,
) -> impl Iterator<Item = (&'static str, PathBuf)> + 'a {
    MAPS.iter().filter_map(move |spec| match spec.pin {
        Pin::Unpinned => None,
        Pin::Build => Some((spec.name, build.join(spec.name))),
        Pin::Bans => Some((spec.name, bans.join(spec.name))),
    })
}

/// Entries per generation of the array map `name`. Panics when the inventory lists no such
/// array: every write of a generation would show it.
pub fn slots(name: &str) -> u32 {
    MAPS.iter()
        .find_map(|spec| match spec.generations {
            Generations::Array { slots, .. } if spec.name == name => Some(slots),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{name} is no per-generation array in the map inventory"))
}

/// Zeroes `slots` entries of an array from `gen * slots`.
fn zero_array<V: Pod + Default>(map: &mut Map, gen: u32, slots: u32) -> Result<()> {
    let mut array: Array<&mut MapData, V> = Array::try_from(map)?;
    for index in gen * slots..(gen + 1) * slots {
        array.set(index, V::default(), 0)?;
    }
    Ok(())
}

/// Whether a key's first word (big-endian) belongs to generation `gen`.
fn of_gen(gen: u32, word: u32) -> bool {
    u32::from_be(word) & GEN_MASK == gen
}

/// Deletes the entries of generation `gen` from a trie whose key data is `K`.
fn clear_trie<K: Pod + AsRef<[u32]>>(map: &mut Map, gen: u32) -> Result<()> {
    let mut trie: LpmTrie<&mut MapData, K, u32> = LpmTrie::try_from(map)?;
    let keys: Vec<Key<K>> = trie.keys().collect::<Result<_, _>>()?;
    for key in keys
        .iter()
        .filter(|key| of_gen(gen, key.data().as_ref()[0]))
    {
        trie.remove(key)?;
    }
    Ok(())
}

/// Deletes the entries of generation `gen` from a hash map whose keys are `K`, values `V`.
fn clear_hash<K: Pod + AsRef<[u32]>, V: Pod>(map: &mut Map, gen: u32) -> Result<()> {
    let mut hash: HashMap<&mut MapData, K, V> = HashMap::try_from(map)?;
    let keys: Vec<K> = hash.keys().collect::<Result<_, _>>()?;
    for key in keys.iter().filter(|key| of_gen(gen, key.as_ref()[0])) {
        hash.remove(key)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::dataplane::load::{object_id, OBJECT};
    use crate::dataplane::pins::Pins;
    use crate::dataplane::Kernel;

    /// The maps of the real object, as aya creates them (loading it, as root).
    fn object_maps() -> BTreeSet<String> {
        let ebpf = aya::Ebpf::load(OBJECT).expect("load the XDP object");
        ebpf.maps().map(|(name, _)| name.to_string()).collect()
    }

    #[test]
    fn every_map_of_the_object_is_in_the_inventory_and_back() {
        let inventory: BTreeSet<String> = MAPS.iter().map(|spec| spec.name.to_string()).collect();
        assert_eq!(inventory.len(), MAPS.len(), "a map is listed twice");
        assert_eq!(
            object_maps(),
            inventory,
            "the maps of firewall-ebpf and the inventory differ"
        );
    }

    #[test]
    fn the_maps_marked_pinned_are_pinned_after_a_load() {
        // Pins::open mounts bpffs on the parent, a directory of this test's own.
        let mount = std::env::temp_dir().join(format!("fw-inventory-{}", std::process::id()));
        std::fs::create_dir_all(&mount).unwrap();
        let pins = Pins::open(&mount.join("firewall")).unwrap();
        let (kernel, _) = Kernel::load_pinned(pins.clone()).unwrap();
        let listing = |dir: &Path| -> BTreeSet<String> {
            std::fs::read_dir(dir)
                .unwrap()
                .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        };
        let (build, bans) = (
            listing(&pins.build_dir(object_id())),
            listing(&pins.bans_dir()),
        );
        drop(kernel);
        pins.remove_if_unused().unwrap();
        let target = std::ffi::CString::new(mount.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path; a lazy unmount, as `umount -l`.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&mount);
        for spec in MAPS {
            let found = match (build.contains(spec.name), bans.contains(spec.name)) {
                (false, false) => Pin::Unpinned,
                (true, false) => Pin::Build,
                (false, true) => Pin::Bans,
                (true, true) => panic!("{} is pinned twice", spec.name),
            };
            assert_eq!(found, spec.pin, "{}", spec.name);
        }
    }
}
