//! Batched hash-map reads, updates and deletes (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_UPDATE_BATCH`,
//! `BPF_MAP_DELETE_BATCH`, Linux 5.6), which aya 0.14 does not offer. One syscall moves
//! thousands of entries: a million-entry blocklist costs a fraction of the per-entry syscalls.
//! Kernels without them get per-entry calls.
use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, RawFd};

use anyhow::{anyhow, Result};
use aya::maps::{HashMap, Map, MapData};
use aya::Pod;

use crate::dataplane::sys::bpf;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// Entries per call: bounds the time the kernel spends in one syscall.
const CHUNK: usize = 16_384;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Inserts or replaces `entries` in a hash map.
pub fn insert<K: Pod, V: Pod>(map: &mut Map, entries: &[(K, V)]) -> Result<()> {
    let fd = hash_fd::<K, V>(map)?;
    let (keys, values): (Vec<K>, Vec<V>) = entries.iter().copied().unzip();
    for (keys, values) in keys.chunks(CHUNK).zip(values.chunks(CHUNK)) {
        match call(BPF_MAP_UPDATE_BATCH, fd, keys, Some(values)) {
            Err(error) if unsupported(&error) => {
                let mut hash: HashMap<&mut MapData, K, V> = HashMap::try_from(&mut *map)?;
                for (key, value) in keys.iter().zip(values) {
                    hash.insert(key, value, 0)?;
                }
            }
            result => result?,
        }
    }
    Ok(())
}

/// Removes `keys` from a hash map with values `V`; every key must be there.
pub fn remove<K: Pod, V: Pod>(map: &mut Map, keys: &[K]) -> Result<()> {
    let fd = hash_fd::<K, V>(map)?;
    for keys in keys.chunks(CHUNK) {
        match call::<K, V>(BPF_MAP_DELETE_BATCH, fd, keys, None) {
            Err(error) if unsupported(&error) => {
                let mut hash: HashMap<&mut MapData, K, V> = HashMap::try_from(&mut *map)?;
                for key in keys {
                    hash.remove(key)?;
                }
            }
            result => result?,
        }
    }
    Ok(())
}

/// Every entry of a hash or LRU hash map. Not a snapshot: entries that programs add or remove
/// meanwhile may or may not be in it.
pub fn entries<K: Pod, V: Pod>(map: &Map) -> Result<Vec<(K, V)>> {
    let fd = hash_fd::<K, V>(map)?;
    match lookup_all(fd, CHUNK) {
        // ENOSPC: a hash bucket holds more entries than a call takes.
        Err(error) if unsupported(&error) || error.raw_os_error() == Some(libc::ENOSPC) => {
            let hash: HashMap<&MapData, K, V> = HashMap::try_from(map)?;
            Ok(hash.iter().collect::<Result<_, _>>()?)
        }
        result => Ok(result?),
    }
}

fn lookup_all<K: Pod, V: Pod>(fd: RawFd, chunk: usize) -> io::Result<Vec<(K, V)>> {
    // SAFETY (zeroed): `Pod` types are plain bytes, all-zero is a value of them.
    let mut keys: Vec<K> = vec![unsafe { std::mem::zeroed() }; chunk];
    let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; chunk];
    // The position to go on from: a bucket number for hash maps (4 bytes; 8 to spare).
    let mut position = [0u64; 2];
    let mut entries = Vec::new();
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { position.as_ptr() as u64 },
            out_batch: position[1..].as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: `keys` and `values` have room for `count` keys and values of the map's
        // sizes (`hash_fd` checked them); `position` outlives the call.
        let result = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let got = attr.count as usize;
        entries.extend(
            keys[..got]
                .iter()
                .copied()
                .zip(values[..got].iter().copied()),
        );
        match result {
            Ok(_) => {}
            // ENOENT: no entries after these.
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => return Ok(entries),
            Err(error) => return Err(error),
        }
        position[0] = position[1];
        first = false;
    }
}

/// The fd of a hash map whose keys and values are `K` and `V` (checked, as the syscall takes
/// raw arrays of them).
fn hash_fd<K: Pod, V: Pod>(map: &Map) -> Result<RawFd> {
    HashMap::<&MapData, K, V>::try_from(map)?;
    match map {
        Map::HashMap(data) | Map::LruHashMap(data) => Ok(data.fd().as_fd().as_raw_fd()),
        _ => Err(anyhow!("batched calls are only used on hash maps")),
    }
}

fn call<K, V>(
    command: libc::c_long,
    fd: RawFd,
    keys: &[K],
    values: Option<&[V]>,
) -> io::Result<()> {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.map_or(0, |values| values.as_ptr() as u64),
        count: keys.len() as u32,
        map_fd: fd as u32,
        ..Default::default()
    };
    // SAFETY: `attr` points at arrays of `count` keys and values of the map's sizes (`hash_fd`
    // checked them), alive for the call.
    unsafe { bpf(command, &mut attr)? };
    if attr.count as usize != keys.len() {
        return Err(io::Error::other(format!(
            "the kernel took {} of {} entries",
            attr.count,
            keys.len()
        )));
    }
    Ok(())
}

/// Kernels before 5.6 know no batch commands (EINVAL); some map types lack them (ENOTSUPP).
fn unsupported(error: &io::Error) -> bool {
    const ENOTSUPP: i32 = 524;
    matches!(error.raw_os_error(), Some(libc::EINVAL | ENOTSUPP))
}
