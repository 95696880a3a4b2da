//! Runtime bans in the kernel's maps ([`firewall_common::bans`]): hosts in an exact hash,
//! prefixes in a trie, both keyed by IPv6 (IPv4 mapped), and the bits that tell the XDP
//! program which of the two to look in. The maps are pinned apart from any build's, so the
//! bans outlive reloads, restarts and upgrades; they end with the bpffs (a reboot).
use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context as _, Result};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData};
use firewall_common::address_words;
use firewall_common::bans::{self, map_names, Ban, IN_USE_HOSTS, IN_USE_PREFIXES};
use ipnet::IpNet;

use super::{batch, Kernel};

/// A ban as the maps hold it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BanEntry {
    pub net: IpNet,
    /// CLOCK_MONOTONIC ns at which it ends; 0: never.
    pub expires_ns: u64,
}

/// Where a ban goes: the host map's key, or the trie's.
enum Slot {
    Host([u32; 4]),
    Prefix(Key<[u32; 4]>),
}

fn slot(net: &IpNet) -> Slot {
    let net = net.trunc();
    let v6 = matches!(net, IpNet::V6(_));
    let key = bans::key(v6, address_words(net.network()));
    if net.prefix_len() == net.max_prefix_len() {
        Slot::Host(key)
    } else {
        Slot::Prefix(Key::new(bans::key_prefix_len(v6, net.prefix_len()), key))
    }
}

/// The address (or network) of a map key.
fn unmap(key: [u32; 4], len: u32) -> Result<IpNet> {
    let octets: Vec<u8> = key.iter().flat_map(|word| word.to_ne_bytes()).collect();
    let v6 = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(octets.as_slice())?);
    let net = match v6.to_ipv4_mapped() {
        Some(v4) if len >= 96 => IpNet::new(IpAddr::V4(v4), (len - 96) as u8)?,
        _ => IpNet::new(IpAddr::V6(v6), len as u8)?,
    };
    Ok(net)
}

impl Kernel {
    fn ban_hosts(&mut self) -> Result<HashMap<&mut MapData, [u32; 4], Ban>> {
        Ok(HashMap::try_from(self.map_mut(map_names::HOSTS)?)?)
    }

    fn ban_prefixes(&mut self) -> Result<LpmTrie<&mut MapData, [u32; 4], Ban>> {
        Ok(LpmTrie::try_from(self.map_mut(map_names::PREFIXES)?)?)
    }

    /// Bans `nets` until `expires_ns` (0: for good); a net banned already takes the new end.
    /// All or nothing: when the maps refuse one (full), the nets of this call are unbanned.
    pub fn ban(&mut self, nets: &[IpNet], expires_ns: u64) -> Result<()> {
        let ban = Ban { expires_ns };
        let mut hosts = Vec::new();
        let mut prefixes = Vec::new();
        for net in nets {
            match slot(net) {
                Slot::Host(key) => hosts.push((key, ban)),
                Slot::Prefix(key) => prefixes.push(key),
            }
        }
        // Hosts in batches: a fail2ban or blocklist feed brings thousands at once.
        let mut result = batch::insert(self.map_mut(map_names::HOSTS)?, &hosts);
        if result.is_ok() {
            let mut trie = self.ban_prefixes()?;
            for key in &prefixes {
                if let Err(error) = trie.insert(key, ban, 0) {
                    result = Err(error.into());
                    break;
                }
            }
        }
        if let Err(error) = result {
            self.unban(nets)?;
            return Err(error.context(format!(
                "banning {} nets (the kernel holds up to {} host and {} prefix bans): none \
                 of them is banned",
                nets.len(),
                bans::MAX_HOSTS,
                bans::MAX_PREFIXES
            )));
        }
        self.update_bans_in_use()
    }

    /// Lifts the bans of `nets` (exactly those nets); returns how many there were.
    pub fn unban(&mut self, nets: &[IpNet]) -> Result<usize> {
        let mut lifted = 0;
        for net in nets {
            let removed = match slot(net) {
                Slot::Host(key) => self.ban_hosts()?.remove(&key),
                Slot::Prefix(key) => self.ban_prefixes()?.remove(&key),
            };
            // Not found is no error: unbanning what is not banned changes nothing.
            lifted += usize::from(removed.is_ok());
        }
        self.update_bans_in_use()?;
        Ok(lifted)
    }

    /// Every ban in the maps, expired ones included (the kernel ignores those).
    pub fn bans(&self) -> Result<Vec<BanEntry>> {
        read_bans(self.map(map_names::HOSTS)?, self.map(map_names::PREFIXES)?)
    }

    /// Deletes the bans that ended before `now_ns` (to free their space; the kernel ignores
    /// them already). Returns how many.
    pub fn sweep_bans(&mut self, now_ns: u64) -> Result<usize> {
        let ended: Vec<IpNet> = self
            .bans()?
            .into_iter()
            .filter(|entry| {
                !Ban {
                    expires_ns: entry.expires_ns,
                }
                .holds(now_ns)
            })
            .map(|entry| entry.net)
            .collect();
        if ended.is_empty() {
            return Ok(0);
        }
        self.unban(&ended)
    }

    /// Tells the XDP program which ban maps hold entries.
    fn update_bans_in_use(&mut self) -> Result<()> {
        let mut bits = 0;
        if self.ban_hosts()?.keys().next().is_some() {
            bits |= IN_USE_HOSTS;
        }
        if self.ban_prefixes()?.keys().next().is_some() {
            bits |= IN_USE_PREFIXES;
        }
        let mut in_use: Array<&mut MapData, u32> =
            Array::try_from(self.map_mut(map_names::IN_USE)?)?;
        in_use.set(0, bits, 0)?;
        Ok(())
    }
}

/// The bans in two maps: hosts (a hash) and prefixes (a trie).
fn read_bans(hosts: &Map, prefixes: &Map) -> Result<Vec<BanEntry>> {
    let mut entries = Vec::new();
    for (key, ban) in batch::entries::<[u32; 4], Ban>(hosts)? {
        entries.push(BanEntry {
            net: unmap(key, 128)?,
            expires_ns: ban.expires_ns,
        });
    }
    let prefixes: LpmTrie<&MapData, [u32; 4], Ban> = LpmTrie::try_from(prefixes)?;
    for item in prefixes.iter() {
        let (key, ban) = item?;
        entries.push(BanEntry {
            net: unmap(key.data(), key.prefix_len())?,
            expires_ns: ban.expires_ns,
        });
    }
    Ok(entries)
}

/// The bans pinned in `dir` (for `firewall stats` and a stopping daemon, which keeps the ban
/// maps while they hold any).
pub fn pinned_bans(dir: &Path) -> Result<Vec<BanEntry>> {
    let open = |name: &str| -> Result<MapData> {
        let path = dir.join(name);
        MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
    };
    read_bans(
        &Map::HashMap(open(map_names::HOSTS)?),
        &Map::LpmTrie(open(map_names::PREFIXES)?),
    )
}

/// How many of `entries` hold at `now_ns`.
pub fn in_force(entries: &[BanEntry], now_ns: u64) -> usize {
    entries
        .iter()
        .filter(|entry| {
            Ban {
                expires_ns: entry.expires_ns,
            }
            .holds(now_ns)
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_keys_are_ipv4_mapped_ipv6() {
        let v4: std::net::Ipv4Addr = "192.0.2.7".parse().unwrap();
        let mapped = bans::key(false, address_words(IpAddr::V4(v4)));
        let octets: Vec<u8> = mapped.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(octets, v4.to_ipv6_mapped().octets());
        assert_eq!(bans::key_prefix_len(false, 24), 120);
    }

    #[test]
    fn keys_unmap_to_the_nets_they_came_from() {
        for text in [
            "192.0.2.7/32",
            "2001:db8::9/128",
            "198.51.100.0/24",
            "2001:db8::/32",
        ] {
            let net: IpNet = text.parse().unwrap();
            let back = match slot(&net) {
                Slot::Host(key) => unmap(key, 128).unwrap(),
                Slot::Prefix(key) => unmap(key.data(), key.prefix_len()).unwrap(),
            };
            assert_eq!(back, net, "{text}");
        }
    }
}
