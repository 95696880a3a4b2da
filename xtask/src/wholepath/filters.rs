//! The filters compared, each put in place on the receiving veth end and removed again:
//! a bare `XDP_DROP`, xdp-filter, an nft netdev ingress chain, ip6tables' raw table, and the
//! firewall daemon with its rule files.

use std::fmt::Write as _;
use std::net::Ipv6Addr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use super::bpf;
use super::net::{self, Cleanup, Topology};
use crate::setup::output;

/// The UDP port every flood goes to, and that every filter denies.
pub const DENIED_PORT: u16 = 7777;
/// Rules before the two deny rules, which with them make the firewall's maximum of 1,024: the
/// fillers of `firewall/benches/packet_path.rs`'s `rule_set`, one fewer than its 1,024 has.
pub const FILLER_RULES: usize = 1022;
/// The firewall takes at most 1,000,000 distinct source networks in all rules together
/// (`[limits] max_entries`); the fillers name two each, the set has the rest.
const SOURCE_ENTRIES: usize = 1_000_000;
pub const SET_ENTRIES: usize = SOURCE_ENTRIES - 2 * FILLER_RULES;
/// The rule that denies the port (from the set, in the large file).
pub const DENY_RULE: &str = "deny-bench-port";
/// The large file's last rule: the port from anywhere.
pub const DENY_ANY_RULE: &str = "deny-bench-port-any";

/// The `i`th address of the large set: scattered over 2001:db8:f000::/64, with the last bit
/// set so that no two entries are neighbours (nothing merges).
pub fn set_address(i: u64) -> Ipv6Addr {
    let high: u128 = 0x2001_0db8_f000_0000 << 64;
    Ipv6Addr::from(high | u128::from(scatter(i) | 1))
}

/// The `k`th random flood source: scattered from another seed over 2001:db8:e000::/64, which
/// neither the set (2001:db8:f000::/64) nor the fillers (2001:db8:1::/48 to 2001:db8:3ff::/48)
/// cover, so the 1,024-rule firewall's address lookups all miss and the packet falls through
/// to the last rule: a flood's shape, and the expensive one.
pub fn random_source(k: u64) -> Ipv6Addr {
    const SEED: u64 = 0x5eed_5eed_5eed_5eed;
    let high: u128 = 0x2001_0db8_e000_0000 << 64;
    Ipv6Addr::from(high | u128::from(scatter(k ^ SEED)))
}

/// A bijective mix of `i` (splitmix64's finaliser): fixed, so every run sends the same frames.
fn scatter(i: u64) -> u64 {
    let mut x = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A bare program (`XDP_DROP` or `XDP_PASS`) attached to the receiving end while the link lives.
pub fn attach_bare(topology: &Topology, program: &Arc<OwnedFd>) -> Result<OwnedFd> {
    let (ns, iface, program) = (topology.rx_ns.clone(), topology.rx_if, program.clone());
    std::thread::spawn(move || -> Result<OwnedFd> {
        net::enter(&ns)?;
        let index = ifindex_in_this_namespace(iface)?;
        bpf::attach_xdp(&program, index)
    })
    .join()
    .expect("attach thread")
}

/// if_nametoindex in the calling thread's namespace.
fn ifindex_in_this_namespace(iface: &str) -> Result<u32> {
    let name = std::ffi::CString::new(iface)?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!("no interface {iface}: {}", std::io::Error::last_os_error());
    }
    Ok(index)
}

/// xdp-filter in its default (native) mode with the port denied. libxdp keeps its pins in a
/// bpffs that `ip netns exec`'s own /sys hides, so one is mounted for the two commands (the
/// program stays attached, holding its maps, when that mount goes).
pub fn load_xdp_filter(topology: &Topology) -> Result<Cleanup> {
    let script = format!(
        "mount -t bpf bpf /sys/fs/bpf && xdp-filter load {iface} && xdp-filter port {DENIED_PORT}",
        iface = topology.rx_if
    );
    let (ns, iface) = (topology.rx_ns.clone(), topology.rx_if);
    let cleanup = Cleanup::register("xdp-filter", move || {
        let _ = output(
            "ip",
            &["-n", &ns, "link", "set", "dev", iface, "xdp", "off"],
        );
    });
    topology.in_rx(&["sh", "-c", &script])?;
    Ok(cleanup)
}

/// An nft netdev ingress chain on the receiving end dropping UDP to the port.
pub fn load_nft(topology: &Topology, dir: &Path) -> Result<Cleanup> {
    let file = dir.join("wholepath.nft");
    std::fs::write(
        &file,
        format!(
            "table netdev wholepath {{\n  chain ingress {{\n    type filter hook ingress device \"{}\" priority 0; policy accept;\n    udp dport {DENIED_PORT} drop\n  }}\n}}\n",
            topology.rx_if
        ),
    )?;
    let ns = topology.rx_ns.clone();
    let cleanup = Cleanup::register("the nft table", move || {
        let _ = output(
            "ip",
            &[
                "netns",
                "exec",
                &ns,
                "nft",
                "delete",
                "table",
                "netdev",
                "wholepath",
            ],
        );
    });
    topology.in_rx(&["nft", "-f", file.to_str().unwrap()])?;
    Ok(cleanup)
}

/// ip6tables' raw PREROUTING (before connection tracking) dropping UDP to the port.
pub fn load_ip6tables(topology: &Topology) -> Result<Cleanup> {
    let rule = |verb: &str| -> Vec<String> {
        format!("ip6tables -t raw {verb} PREROUTING -p udp --dport {DENIED_PORT} -j DROP")
            .split(' ')
            .map(String::from)
            .collect()
    };
    let (ns, delete) = (topology.rx_ns.clone(), rule("-D"));
    let cleanup = Cleanup::register("the ip6tables rule", move || {
        let mut args = vec!["netns", "exec", &ns];
        args.extend(delete.iter().map(String::as_str));
        let _ = output("ip", &args);
    });
    let add = rule("-A");
    topology.in_rx(&add.iter().map(String::as_str).collect::<Vec<_>>())?;
    Ok(cleanup)
}

/// Writes the 1-rule file and the 1,024-rule file with its set; returns their paths.
pub fn write_rule_files(dir: &Path, peer: Ipv6Addr) -> Result<(PathBuf, PathBuf)> {
    let deny = |from: &str| {
        format!(
            "[[rules]]\nname = \"{DENY_RULE}\"\naction = \"deny\"\nproto = \"udp\"\n{from}ports = [{DENIED_PORT}]\n"
        )
    };
    let one = dir.join("one-rule.toml");
    std::fs::write(
        &one,
        format!("[defaults]\npolicy = \"allow\"\n\n{}", deny("")),
    )?;

    // The set: the flood's sources, and the peer whose replies the established row sends.
    let mut set = String::with_capacity(SET_ENTRIES * 40);
    for i in 0..SET_ENTRIES as u64 - 1 {
        writeln!(set, "{}", set_address(i))?;
    }
    writeln!(set, "{peer}")?;
    std::fs::write(dir.join("flood.set"), set)?;

    let mut rules =
        String::from("[defaults]\npolicy = \"allow\"\n\n[sets.flood]\nfiles = [\"flood.set\"]\n\n");
    for i in 0..FILLER_RULES {
        writeln!(
            rules,
            "[[rules]]\nname = \"filler {i}\"\naction = \"deny\"\nproto = \"{}\"\nfrom = [\"172.{}.{}.0/24\", \"2001:db8:{:x}::/48\"]\nports = [{}]\n",
            if i % 2 == 0 { "tcp" } else { "udp" },
            16 + i / 256,
            i % 256,
            i + 1,
            1000 + i
        )?;
    }
    rules.push_str(&deny("from = [\"@flood\"]\n"));
    // The last rule (1,024): the port from anywhere, so that a flood from outside the set is dropped too,
    // after every address lookup has missed. It names no network, so it takes no entry.
    write!(
        rules,
        "\n[[rules]]\nname = \"{DENY_ANY_RULE}\"\naction = \"deny\"\nproto = \"udp\"\nports = [{DENIED_PORT}]\n"
    )?;
    let large = dir.join("large.toml");
    std::fs::write(&large, rules)?;
    Ok((one, large))
}

/// The firewall daemon on the receiving end, its pins in a bpffs of its own; stopped (SIGTERM,
/// which detaches) and its bpffs unmounted on drop.
pub struct Daemon {
    _stop: Cleanup,
    _pins: Cleanup,
    /// Its `--pin-dir`, where `firewall stats` reads the counters.
    pin_dir: PathBuf,
    pub start_seconds: f64,
}

impl Daemon {
    /// `label` names its pins, log and control socket: several daemons run at once.
    pub fn start(
        firewall: &Path,
        label: &str,
        topology: &Topology,
        rules: &Path,
        dir: &Path,
    ) -> Result<Daemon> {
        let started = Instant::now();
        let pins_mount = dir.join(format!("bpffs-{label}"));
        std::fs::create_dir_all(&pins_mount)?;
        // In this (the host's) mount namespace, which `ip netns exec`'s own one sees.
        output("mount", &["-t", "bpf", "bpf", pins_mount.to_str().unwrap()])?;
        let unmount = pins_mount.clone();
        let pins = Cleanup::register("the daemon's bpffs", move || {
            let _ = output("umount", &["-l", unmount.to_str().unwrap()]);
            let _ = std::fs::remove_dir(&unmount);
        });
        let log_path = dir.join(format!("firewall-{label}.log"));
        let pin_dir = pins_mount.join("firewall");
        let child = Command::new("ip")
            .args(["netns", "exec", &topology.rx_ns])
            .arg(firewall)
            .args(["run", "--rules"])
            .arg(rules)
            .args(["--iface", topology.rx_if, "--pin-dir"])
            .arg(&pin_dir)
            .arg("--control")
            .arg(dir.join(format!("control-{label}.sock")))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path)?)
            .spawn()
            .context("starting the firewall")?;
        let child = Arc::new(Mutex::new(child));
        let stopping = child.clone();
        let stop = Cleanup::register("the firewall daemon", move || {
            stop_child(&mut stopping.lock().unwrap());
        });
        let daemon = Daemon {
            _stop: stop,
            _pins: pins,
            pin_dir,
            start_seconds: 0.0,
        };
        // The daemon logs "filtering; " once the program is attached with the rules in force.
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            if log.contains("filtering; ") {
                break;
            }
            if let Some(status) = child.lock().unwrap().try_wait()? {
                bail!("the firewall exited ({status}) before filtering:\n{log}");
            }
            if Instant::now() > deadline {
                bail!("the firewall did not start filtering:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Daemon {
            start_seconds: started.elapsed().as_secs_f64(),
            ..daemon
        })
    }
}

impl Daemon {
    /// The packets the rule named `rule` has counted since the rules were applied, from
    /// `firewall stats` (which reads the pinned per-CPU counters).
    pub fn rule_packets(&self, firewall: &Path, rule: &str) -> Result<u64> {
        let json = output(
            firewall.to_str().context("firewall path")?,
            &[
                "stats",
                "--json",
                "--pin-dir",
                self.pin_dir.to_str().unwrap(),
            ],
        )?;
        let stats: serde_json::Value = serde_json::from_str(&json)?;
        stats["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|entry| entry["name"] == rule)
            .and_then(|entry| entry["packets"].as_u64())
            .with_context(|| format!("no counter for rule {rule:?} in the firewall's stats"))
    }
}

/// SIGTERM, up to 10 s to exit, then SIGKILL.
fn stop_child(child: &mut Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    // `ip netns exec` execs the daemon, so the pid is the daemon's.
    // SAFETY: kill(2) on our own, not yet reaped, child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The id of the XDP program attached to the receiving end.
pub fn attached_program_id(topology: &Topology) -> Result<u64> {
    let json = output(
        "ip",
        &[
            "-n",
            &topology.rx_ns,
            "-d",
            "-j",
            "link",
            "show",
            "dev",
            topology.rx_if,
        ],
    )?;
    let links: serde_json::Value = serde_json::from_str(&json)?;
    links[0]["xdp"]["prog"]["id"]
        .as_u64()
        .context("no XDP program on the receiving end")
}

fn program_info(id: u64) -> Result<serde_json::Value> {
    let json = output("bpftool", &["-j", "prog", "show", "id", &id.to_string()])?;
    Ok(serde_json::from_str(&json)?)
}

/// Instructions after the verifier's rewriting (xlated) and the JIT's bytes, of the XDP
/// program attached to the receiving end, from `bpftool`.
pub fn attached_program_size(topology: &Topology) -> Result<(u64, u64)> {
    let info = program_info(attached_program_id(topology)?)?;
    let xlated = info["bytes_xlated"].as_u64().context("no bytes_xlated")?;
    let jited = info["bytes_jited"].as_u64().context("no bytes_jited")?;
    Ok((xlated / 8, jited))
}

/// The kernel's run-time statistics of program `id` (with `kernel.bpf_stats_enabled`):
/// nanoseconds spent in it and runs, both since it was loaded.
pub fn program_run_time(id: u64) -> Result<(u64, u64)> {
    let info = program_info(id)?;
    // bpftool leaves the fields out while both are zero.
    let field = |name: &str| info[name].as_u64().unwrap_or(0);
    Ok((field("run_time_ns"), field("run_cnt")))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// Whether `address` is in `network`/`len`.
    fn within(address: Ipv6Addr, network: &str, len: u32) -> bool {
        let network: Ipv6Addr = network.parse().unwrap();
        (u128::from(address) ^ u128::from(network)) >> (128 - len) == 0
    }

    #[test]
    fn random_sources_are_distinct_and_outside_the_set_and_the_fillers() {
        let sources: HashSet<Ipv6Addr> = (0..64).map(random_source).collect();
        assert_eq!(sources.len(), 64);
        for &source in &sources {
            assert!(
                !within(source, "2001:db8:f000::", 64),
                "{source} in the set's /64"
            );
            for i in 0..FILLER_RULES {
                let filler = format!("2001:db8:{:x}::", i + 1);
                assert!(!within(source, &filler, 48), "{source} in {filler}/48");
            }
        }
        // The check itself: the set's addresses are in its /64, a filler's in its /48.
        assert!(within(set_address(0), "2001:db8:f000::", 64));
        assert!(within(
            set_address(SET_ENTRIES as u64 - 2),
            "2001:db8:f000::",
            64
        ));
        assert!(within(
            "2001:db8:3ff::9".parse().unwrap(),
            "2001:db8:3ff::",
            48
        ));
    }
}
