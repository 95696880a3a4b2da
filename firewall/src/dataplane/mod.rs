//! The kernel side as seen from userspace: loads the XDP program, attaches it, writes compiled
//! rule sets into the idle generation and flips to it, and runs packets through
//! BPF_PROG_TEST_RUN.

pub mod batch;
pub mod packet_log;
pub mod pins;
use std::collections::HashMap as StdHashMap;
use std::hash::Hash;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::SchedClassifierLink;
use aya::programs::xdp::XdpLink;
use aya::programs::{tc, SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp, XdpMode};
use aya::util::{nr_cpus, KernelVersion};
use aya::{Ebpf, EbpfLoader, Pod};
use firewall_common::{
    exact_word, map_names, Counter, FlowKey, FlowState, GenerationConfig, RateLimit, RuleBits,
    RuleName, V4KeyData, V6KeyData, ADDRESS_FIELDS, EGRESS_PROGRAM, EXACT_BITS_PER_FIELD, GEN_MASK,
    GEN_PREFIX_BITS, MAX_PORT_CLASSES, MAX_RULES, STAT_SLOTS, TRIE_DST_V4, TRIE_DST_V6,
    TRIE_SRC_V4, TRIE_SRC_V6,
};
use ipnet::{Ipv4Net, Ipv6Net};

use crate::dataplane::pins::{LinkKind, Pins};
use crate::host::ifaces::ifindex;
use crate::host::link::{self, LinkLayer};
use crate::rules::compile::{AddressTable, Compiled, Prefix, PORTS, PROTOS};

/// The XDP object built from firewall-ebpf by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/firewall"));

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// How to attach: `Auto` tries native (driver) XDP and falls back to generic (skb) XDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    Auto,
    Native,
    Skb,
}

pub struct Kernel {
    ebpf: Ebpf,
    /// What each generation holds, as far as we know.
    held: [Held; 2],
    /// Where maps and links are pinned, if they are.
    pins: Option<Pins>,
    /// This build's directory under the pins, for its maps and programs.
    build: Option<std::path::PathBuf>,
    /// The link layers whose programs are loaded.
    loaded: Vec<LinkLayer>,
    /// The interface map of each generation as written, by ifindex: rules name interfaces,
    /// the kernel knows indices, and an interface created anew gets another index.
    ifaces_written: [StdHashMap<u32, RuleBits>; 2],
}

/// Identifies this build's XDP object (FNV-1a of its bytes): pinned maps are reused only by
/// the build that made them, as another build may lay them out differently.
pub fn object_id() -> u64 {
    OBJECT.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The oldest kernel the firewall is tested on (Debian 12's 6.1). Older ones lack what it
/// uses (5.10 has no `bpf_ktime_get_coarse_ns`, for one) and reject its programs.
pub const MINIMUM_KERNEL: KernelVersion = KernelVersion::new(6, 1, 0);

/// What to say when the kernel rejects a program: on a kernel older than [`MINIMUM_KERNEL`],
/// that is the likely reason, before the verifier's log.
fn rejected(program: &str) -> String {
    match KernelVersion::current() {
        Ok(version) if version < MINIMUM_KERNEL => format!(
            "the kernel rejected the {program}: Linux {version} is older than 6.1, the oldest \
             kernel this firewall supports"
        ),
        _ => format!("the kernel rejected the {program}"),
    }
}

impl Kernel {
    /// Loads the programs of both link layers and creates their maps; nothing is attached
    /// yet, nothing pinned.
    pub fn load() -> Result<Self> {
        let mut kernel = Self::load_with(None)?;
        kernel.load_layer(LinkLayer::Ip)?;
        Ok(kernel)
    }

    /// As [`Kernel::load`], with the maps pinned under `pins`, or reused from there when this
    /// build pinned them before (a daemon that exited with `--persist` or died): then the
    /// rules in force and the tracked flows carry over. Returns whether maps were reused.
    /// The programs of interfaces that start at the IP header are loaded when the first such
    /// interface is attached: most hosts have none, and every program loaded costs the
    /// verifier's time at start.
    pub fn load_pinned(pins: Pins) -> Result<(Self, bool)> {
        let build = pins.build_dir(object_id());
        let reused = build.join(map_names::ACTIVE_GENERATION).exists();
        std::fs::create_dir_all(&build).with_context(|| format!("creating {}", build.display()))?;
        let mut kernel = Self::load_with(Some(&build))?;
        kernel.pin_programs(LinkLayer::Ethernet, &build)?;
        if reused {
            // The live generation holds the old daemon's rules; neither is known to us.
            kernel.held = [Held::Unknown, Held::Unknown];
        }
        kernel.pins = Some(pins);
        kernel.build = Some(build);
        Ok((kernel, reused))
    }

    /// Pins the programs of `layer` in `build`, replacing those of an earlier daemon of this
    /// build.
    fn pin_programs(&mut self, layer: LinkLayer, build: &Path) -> Result<()> {
        for name in [layer.xdp_program(), layer.egress_program()] {
            let path = build.join(format!("prog-{name}"));
            let _ = std::fs::remove_file(&path);
            self.ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing"))?
                .pin(&path)
                .with_context(|| format!("pinning {}", path.display()))?;
        }
        Ok(())
    }

    /// Creates the maps and loads the Ethernet programs.
    fn load_with(maps_dir: Option<&Path>) -> Result<Self> {
        if OBJECT.is_empty() {
            bail!("this binary was built without its XDP object (AYA_BUILD_SKIP was set)");
        }
        raise_memlock_limit();
        let mut loader = EbpfLoader::new();
        if let Some(dir) = maps_dir {
            for name in map_names::PINNED {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let ebpf = loader.load(OBJECT).context("loading the XDP object")?;
        let mut kernel = Kernel {
            ebpf,
            held: [Held::Zeroed, Held::Zeroed],
            pins: None,
            build: None,
            ifaces_written: Default::default(),
            loaded: Vec::new(),
        };
        kernel.load_layer(LinkLayer::Ethernet)?;
        Ok(kernel)
    }

    /// Loads (and pins, with pins) the programs of `layer`, once.
    fn load_layer(&mut self, layer: LinkLayer) -> Result<()> {
        if self.loaded.contains(&layer) {
            return Ok(());
        }
        let name = layer.xdp_program();
        let program: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("XDP program `{name}` missing from the object"))?
            .try_into()?;
        program
            .load()
            .with_context(|| rejected(&format!("XDP program {name}")))?;
        let name = layer.egress_program();
        let egress: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("tc program `{name}` missing from the object"))?
            .try_into()?;
        egress
            .load()
            .with_context(|| rejected(&format!("tc egress program {name}")))?;
        if let Some(build) = self.build.clone() {
            self.pin_programs(layer, &build)?;
        }
        self.loaded.push(layer);
        Ok(())
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    fn program(&self, name: &str) -> Result<&Xdp> {
        Ok(self
            .ebpf
            .program(name)
            .ok_or_else(|| anyhow!("XDP program {name} missing"))?
            .try_into()?)
    }

    /// Attaches to `iface`: first the tc egress program, so that the host's flows are being
    /// recorded before the XDP program starts to judge their replies; then XDP. With pins,
    /// links pinned by an earlier daemon are taken over (the program they run is swapped for
    /// ours atomically), and new links are pinned. Returns what was done, for the log.
    /// The programs are those of the interface's link layer ([`link::link_layer`]);
    /// interfaces of other link types are refused.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<String> {
        let layer = link::link_layer(iface)?;
        self.load_layer(layer)?;
        let tc = self.attach_egress(iface, layer)?;
        let xdp = self.attach_xdp(iface, layer, mode)?;
        let layer = match layer {
            LinkLayer::Ethernet => "",
            LinkLayer::Ip => " (frames start at the IP header)",
        };
        Ok(format!("XDP ingress: {xdp}; tc egress: {tc}{layer}"))
    }

    fn attach_egress(&mut self, iface: &str, layer: LinkLayer) -> Result<&'static str> {
        let name = layer.egress_program();
        let pin = self.pins.as_ref().map(|p| p.link_path(LinkKind::Tc, iface));
        let egress: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("tc program {name} missing"))?
            .try_into()?;
        if let Some(pin) = pin.as_ref().filter(|pin| pin.exists()) {
            let link = FdLink::from(PinnedLink::from_pin(pin)?);
            let id = egress
                .attach_to_link(SchedClassifierLink::try_from(link)?)
                .with_context(|| format!("taking over the tc link of {iface}"))?;
            // The pin holds the link: releasing the interface is unpinning it.
            drop(egress.take_link(id)?);
            return Ok("taken over from the pinned link");
        }
        if let Err(error) = tc::qdisc_add_clsact(iface) {
            // Already there (ours from an earlier run, or someone else's): share it.
            log::debug!("clsact on {iface}: {error}");
        }
        let id = egress
            .attach(iface, TcAttachType::Egress)
            .with_context(|| format!("attaching the tc egress program to {iface}"))?;
        let Some(pin) = pin else {
            return Ok("attached");
        };
        let link = egress.take_link(id)?;
        match FdLink::try_from(link) {
            Ok(link) => {
                link.pin(&pin)
                    .with_context(|| format!("pinning {}", pin.display()))?;
                Ok("pinned")
            }
            Err(_) => {
                // Netlink tc filters (before Linux 6.6) have no link to pin: the filter stays
                // until the daemon detaches it, and one a killed daemon left behind stays for
                // good. Replace those (ours by name) rather than stack another.
                log::warn!("{iface}: tc egress is not pinned (no TCX before Linux 6.6)");
                let _ = tc::qdisc_detach_program(iface, TcAttachType::Egress, name);
                egress.attach(iface, TcAttachType::Egress)?;
                Ok("attached")
            }
        }
    }

    fn attach_xdp(
        &mut self,
        iface: &str,
        layer: LinkLayer,
        mode: AttachMode,
    ) -> Result<&'static str> {
        let name = layer.xdp_program();
        let pin = self
            .pins
            .as_ref()
            .map(|p| p.link_path(LinkKind::Xdp, iface));
        let program: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("XDP program {name} missing"))?
            .try_into()?;
        if let Some(pin) = pin.as_ref().filter(|pin| pin.exists()) {
            let link = FdLink::from(PinnedLink::from_pin(pin)?);
            let id = program
                .attach_to_link(XdpLink::try_from(link)?)
                .with_context(|| format!("taking over the XDP link of {iface}"))?;
            // The pin holds the link: releasing the interface is unpinning it.
            drop(program.take_link(id)?);
            return Ok("taken over from the pinned link");
        }
        let attempts: &[(XdpMode, &'static str)] = match mode {
            AttachMode::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "skb")],
            AttachMode::Native => &[(XdpMode::Driver, "native")],
            AttachMode::Skb => &[(XdpMode::Skb, "skb")],
        };
        let mut last_error = None;
        for &(xdp_mode, name) in attempts {
            match program.attach(iface, xdp_mode) {
                Ok(id) => {
                    if let Some(pin) = pin {
                        let link = FdLink::try_from(program.take_link(id)?)
                            .context("this kernel attaches XDP without a link to pin")?;
                        link.pin(&pin)
                            .with_context(|| format!("pinning {}", pin.display()))?;
                        return Ok(match name {
                            "native" => "native, pinned",
                            _ => "skb (generic), pinned",
                        });
                    }
                    return Ok(name);
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(anyhow!(last_error.expect("at least one attempt")))
            .with_context(|| format!("attaching XDP to {iface}"))
    }

    pub fn active_generation(&self) -> Result<u32> {
        let active: Array<&MapData, u32> =
            Array::try_from(self.map(map_names::ACTIVE_GENERATION)?)?;
        Ok(active.get(&0, 0)? & 1)
    }

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
            Array::try_from(self.map_mut(map_names::ACTIVE_GENERATION)?)?;
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
    #[doc(hidden)]
    pub fn forget_idle_generation(&mut self) -> Result<()> {
        let idle = self.active_generation()? ^ 1;
        self.held[idle as usize] = Held::Unknown;
        Ok(())
    }

    /// Zeroes generation `gen` in every rule map, after a write into it failed half-way (the
    /// only time its contents are unknown).
    fn clear_generation(&mut self, gen: u32) -> Result<()> {
        clear_keys::<V4KeyData>(self.map_mut(map_names::SRC_V4)?, gen, true)?;
        clear_keys::<V4KeyData>(self.map_mut(map_names::DST_V4)?, gen, true)?;
        clear_keys::<V6KeyData>(self.map_mut(map_names::SRC_V6)?, gen, true)?;
        clear_keys::<V6KeyData>(self.map_mut(map_names::DST_V6)?, gen, true)?;
        clear_keys::<V4KeyData>(self.map_mut(map_names::EXACT_V4)?, gen, false)?;
        clear_keys::<V6KeyData>(self.map_mut(map_names::EXACT_V6)?, gen, false)?;
        clear_keys::<[u32; 2]>(self.map_mut(map_names::IFACE_BITS)?, gen, false)?;
        zero_array::<u32>(
            self.map_mut(map_names::RULE_ACTIONS)?,
            gen,
            MAX_RULES as u32,
        )?;
        zero_array::<RateLimit>(self.map_mut(map_names::RULE_LIMITS)?, gen, MAX_RULES as u32)?;
        zero_array::<RuleName>(self.map_mut(map_names::RULE_NAMES)?, gen, MAX_RULES as u32)?;
        zero_array::<RuleBits>(self.map_mut(map_names::PROTO_BITS)?, gen, PROTOS as u32)?;
        zero_array::<u32>(self.map_mut(map_names::PORT_CLASS)?, gen, PORTS as u32)?;
        zero_array::<RuleBits>(self.map_mut(map_names::PORT_BITS)?, gen, MAX_PORT_CLASSES)?;
        zero_array::<RuleBits>(self.map_mut(map_names::ANY_ADDRESS)?, gen, ADDRESS_FIELDS)?;
        Ok(())
    }

    fn write_generation(
        &mut self,
        gen: u32,
        new: &Compiled,
        old: Option<&Compiled>,
    ) -> Result<usize> {
        let mut updates = 0;
        let rules = MAX_RULES as u32;
        updates += write_array(
            self.map_mut(map_names::RULE_ACTIONS)?,
            gen * rules,
            &new.actions,
            old.map(|o| o.actions.as_slice()),
        )?;
        updates += write_array(
            self.map_mut(map_names::RULE_LIMITS)?,
            gen * rules,
            &new.limits,
            old.map(|o| o.limits.as_slice()),
        )?;
        updates += write_array(
            self.map_mut(map_names::RULE_NAMES)?,
            gen * rules,
            &padded(&new.names, old.map(|o| o.names.len())),
            old.map(|o| o.names.as_slice()),
        )?;
        updates += write_array(
            self.map_mut(map_names::PROTO_BITS)?,
            gen * PROTOS as u32,
            &new.proto_bits,
            old.map(|o| o.proto_bits.as_slice()),
        )?;
        updates += write_array(
            self.map_mut(map_names::PORT_CLASS)?,
            gen * PORTS as u32,
            &new.port_class,
            old.map(|o| o.port_class.as_slice()),
        )?;
        updates += write_array(
            self.map_mut(map_names::PORT_BITS)?,
            gen * MAX_PORT_CLASSES,
            &new.port_bits,
            old.map(|o| o.port_bits.as_slice()),
        )?;
        updates += self.write_addresses(
            (map_names::SRC_V4, map_names::EXACT_V4),
            TRIE_SRC_V4,
            gen,
            &new.src_v4,
            old.map(|o| &o.src_v4),
            v4_key,
        )?;
        updates += self.write_addresses(
            (map_names::DST_V4, map_names::EXACT_V4),
            TRIE_DST_V4,
            gen,
            &new.dst_v4,
            old.map(|o| &o.dst_v4),
            v4_key,
        )?;
        updates += self.write_addresses(
            (map_names::SRC_V6, map_names::EXACT_V6),
            TRIE_SRC_V6,
            gen,
            &new.src_v6,
            old.map(|o| &o.src_v6),
            v6_key,
        )?;
        updates += self.write_addresses(
            (map_names::DST_V6, map_names::EXACT_V6),
            TRIE_DST_V6,
            gen,
            &new.dst_v6,
            old.map(|o| &o.dst_v6),
            v6_key,
        )?;
        let any_address = |c: &Compiled| {
            [
                c.src_v4.any(),
                c.dst_v4.any(),
                c.src_v6.any(),
                c.dst_v6.any(),
            ]
        };
        let old_any = old.map(any_address);
        updates += write_array(
            self.map_mut(map_names::ANY_ADDRESS)?,
            gen * ADDRESS_FIELDS,
            &any_address(new),
            old_any.as_ref().map(|o| o.as_slice()),
        )?;
        updates += self.write_interfaces(gen, new, old)?;
        self.reset_rule_counters(gen, new.actions.len())?;
        let config = GenerationConfig {
            default_action: new.default_action,
            tries_in_use: tries_in_use(new),
            checks: new.checks,
            exact_in_use: exact_in_use(new),
            tcp_timeout_ns: new.timeouts.tcp * NANOS_PER_SEC,
            tcp_closing_timeout_ns: new.timeouts.tcp_closing * NANOS_PER_SEC,
            udp_timeout_ns: new.timeouts.udp * NANOS_PER_SEC,
            icmp_timeout_ns: new.timeouts.icmp * NANOS_PER_SEC,
            log_line_ns: new.log_line_ns,
            log_burst_ns: new.log_burst_ns,
        };
        let mut configs: Array<&mut MapData, GenerationConfig> =
            Array::try_from(self.map_mut(map_names::GEN_CONFIG)?)?;
        configs.set(gen, config, 0)?;
        Ok(updates + 1)
    }

    /// One address field: exact entries into the family's exact map, the rest into the trie.
    #[allow(clippy::too_many_arguments)]
    fn write_addresses<N: Prefix + Copy + Eq + Hash, K: Pod + AsMut<[u32]>>(
        &mut self,
        (trie, exact_map): (&str, &str),
        field: u32,
        gen: u32,
        new: &AddressTable<N>,
        old: Option<&AddressTable<N>>,
        key: fn(u32, &N) -> Key<K>,
    ) -> Result<usize> {
        let updates = write_trie(
            self.map_mut(trie)?,
            gen,
            &new.trie,
            old.map(|o| o.trie.as_slice()),
            key,
        )?;
        let exact_key = |net: &N| -> K {
            let mut data = key(gen, net).data();
            data.as_mut()[0] = exact_word(gen, field, level_index::<N>(net.length())).to_be();
            data
        };
        let old: StdHashMap<N, RuleBits> = old
            .map(|o| o.exact.iter().copied().collect())
            .unwrap_or_default();
        let new_map: StdHashMap<N, RuleBits> = new.exact.iter().copied().collect();
        let stale: Vec<K> = old
            .keys()
            .filter(|net| !new_map.contains_key(net))
            .map(exact_key)
            .collect();
        let changed: Vec<(K, RuleBits)> = new
            .exact
            .iter()
            .filter(|(net, bits)| old.get(net) != Some(bits))
            .map(|(net, bits)| (exact_key(net), *bits))
            .collect();
        let map = self.map_mut(exact_map)?;
        batch::remove::<K, RuleBits>(map, &stale)?;
        batch::insert(map, &changed)?;
        Ok(updates + stale.len() + changed.len())
    }

    /// The interface map of generation `gen`, by ifindex. Interfaces that do not exist (yet)
    /// are skipped with a warning: rules naming only them match nothing.
    fn write_interfaces(
        &mut self,
        gen: u32,
        new: &Compiled,
        old: Option<&Compiled>,
    ) -> Result<usize> {
        let resolve = |entries: &[(String, RuleBits)]| -> StdHashMap<u32, RuleBits> {
            entries
                .iter()
                .filter_map(|(name, bits)| match ifindex(name) {
                    Some(index) => Some((index, *bits)),
                    None => {
                        log::warn!("interface {name} named by rules does not exist here");
                        None
                    }
                })
                .collect()
        };
        let new_map = resolve(&new.ifaces);
        // What the generation holds: nothing when it is fresh or was just cleared.
        let old_map = match old {
            Some(_) => std::mem::take(&mut self.ifaces_written[gen as usize]),
            None => StdHashMap::new(),
        };
        let mut updates = 0;
        let mut map: HashMap<&mut MapData, [u32; 2], RuleBits> =
            HashMap::try_from(self.map_mut(map_names::IFACE_BITS)?)?;
        for index in old_map.keys().filter(|index| !new_map.contains_key(index)) {
            let _ = map.remove(&[gen.to_be(), *index]);
            updates += 1;
        }
        for (index, bits) in &new_map {
            if old_map.get(index) != Some(bits) {
                map.insert([gen.to_be(), *index], bits, 0)?;
                updates += 1;
            }
        }
        self.ifaces_written[gen as usize] = new_map;
        let mut other: Array<&mut MapData, RuleBits> =
            Array::try_from(self.map_mut(map_names::OTHER_IFACES)?)?;
        other.set(gen, new.other_ifaces, 0)?;
        Ok(updates + 1)
    }

    fn reset_rule_counters(&mut self, gen: u32, rules: usize) -> Result<()> {
        let mut stats: PerCpuArray<&mut MapData, Counter> =
            PerCpuArray::try_from(self.map_mut(map_names::STATS)?)?;
        let cpus = nr_cpus().map_err(|(_, error)| error)?;
        for rule in 0..rules as u32 {
            let zero = PerCpuValues::try_from(vec![Counter::default(); cpus])?;
            stats.set(gen * MAX_RULES as u32 + rule, zero, 0)?;
        }
        Ok(())
    }

    /// Adds flows as fresh (the host's existing connections at start-up).
    pub fn add_flows(&mut self, keys: &[FlowKey]) -> Result<()> {
        let mut flows: HashMap<&mut MapData, FlowKey, FlowState> =
            HashMap::try_from(self.map_mut(map_names::FLOWS)?)?;
        let state = FlowState {
            last_seen_ns: monotonic_now_ns(),
            flags: 0,
            _pad: 0,
        };
        for key in keys {
            flows.insert(key, state, 0)?;
        }
        Ok(())
    }

    /// Replaces the tracked flows (tests use this to put the kernel in a known state).
    pub fn set_flows(&mut self, table: &[(FlowKey, FlowState)]) -> Result<()> {
        replace_entries(self.map_mut(map_names::FLOWS)?, table)
    }

    /// Replaces the record of the host's last DHCP request per interface: `(ifindex,
    /// CLOCK_MONOTONIC ns)` (tests use this to put the kernel in a known state).
    pub fn set_dhcp_requests(&mut self, table: &[(u32, u64)]) -> Result<()> {
        replace_entries(self.map_mut(map_names::DHCP_REQUESTS)?, table)
    }

    /// The record of the host's last DHCP request per interface, as `(ifindex, ns)`.
    pub fn dhcp_requests(&self) -> Result<Vec<(u32, u64)>> {
        let requests: HashMap<&MapData, u32, u64> =
            HashMap::try_from(self.map(map_names::DHCP_REQUESTS)?)?;
        Ok(requests.iter().collect::<Result<_, _>>()?)
    }

    /// Runs `frame` (an Ethernet frame) through the tc egress program, as the host sending
    /// it on the test run's device (the namespace's loopback); returns the tc action.
    pub fn test_run_egress(&self, frame: &[u8]) -> Result<u32> {
        let program: &SchedClassifier = self
            .ebpf
            .program(EGRESS_PROGRAM)
            .ok_or_else(|| anyhow!("tc program {EGRESS_PROGRAM} missing"))?
            .try_into()?;
        let mut out = vec![0u8; frame.len() + 256];
        let result = program.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })?;
        Ok(result.return_value)
    }

    /// Counters summed over CPUs, indexed by `firewall_common::STAT_*` slot.
    pub fn counters(&self) -> Result<Vec<Counter>> {
        let stats: PerCpuArray<&MapData, Counter> =
            PerCpuArray::try_from(self.map(map_names::STATS)?)?;
        (0..STAT_SLOTS)
            .map(|slot| {
                let per_cpu = stats.get(&slot, 0)?;
                Ok(Counter::sum(per_cpu.iter()))
            })
            .collect()
    }

    /// Runs `frame` through the program `repeat` times with BPF_PROG_TEST_RUN; returns the
    /// XDP action and the kernel's average time per run.
    pub fn test_run(&self, frame: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        self.test_run_on(LinkLayer::Ethernet, frame, repeat)
    }

    /// [`Kernel::test_run`] with the XDP program of link layer `layer` (for
    /// [`LinkLayer::Ip`], `frame` starts at the IP header).
    pub fn test_run_on(
        &self,
        layer: LinkLayer,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(u32, Duration)> {
        let mut out = vec![0u8; frame.len() + 256];
        let result = self
            .program(layer.xdp_program())?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat,
                ..Default::default()
            })?;
        Ok((result.return_value, result.duration))
    }

    fn map(&self, name: &str) -> Result<&Map> {
        self.ebpf
            .map(name)
            .ok_or_else(|| anyhow!("map {name} missing from the XDP object"))
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from the XDP object"))
    }
}

/// What a generation of the rule maps holds.
enum Held {
    /// Nothing: freshly created maps.
    Zeroed,
    /// Exactly this rule set, as we wrote it (boxed: it is large).
    Rules(Box<Compiled>),
    /// A write into it failed half-way.
    Unknown,
}

/// Deletes the entries of generation `gen` (in the first key word, big-endian) from a trie
/// (`lpm`) or hash map whose key data is `K`.
fn clear_keys<K: Pod + AsRef<[u32]>>(map: &mut Map, gen: u32, lpm: bool) -> Result<()> {
    let of_gen = |word: u32| u32::from_be(word) & GEN_MASK == gen;
    if lpm {
        let mut trie: LpmTrie<&mut MapData, K, RuleBits> = LpmTrie::try_from(map)?;
        let keys: Vec<Key<K>> = trie.keys().collect::<Result<_, _>>()?;
        for key in keys.iter().filter(|key| of_gen(key.data().as_ref()[0])) {
            trie.remove(key)?;
        }
    } else {
        let mut hash: HashMap<&mut MapData, K, RuleBits> = HashMap::try_from(map)?;
        let keys: Vec<K> = hash.keys().collect::<Result<_, _>>()?;
        for key in keys.iter().filter(|key| of_gen(key.as_ref()[0])) {
            hash.remove(key)?;
        }
    }
    Ok(())
}

/// Makes a hash map hold exactly `table`.
fn replace_entries<K: Pod, V: Pod>(map: &mut Map, table: &[(K, V)]) -> Result<()> {
    let mut hash: HashMap<&mut MapData, K, V> = HashMap::try_from(map)?;
    let stale: Vec<K> = hash.keys().collect::<Result<_, _>>()?;
    for key in stale {
        hash.remove(&key)?;
    }
    for (key, value) in table {
        hash.insert(key, value, 0)?;
    }
    Ok(())
}

/// Zeroes `len` entries of an array from `gen * len`.
fn zero_array<V: Pod + Default>(map: &mut Map, gen: u32, len: u32) -> Result<()> {
    let mut array: Array<&mut MapData, V> = Array::try_from(map)?;
    for index in gen * len..(gen + 1) * len {
        array.set(index, V::default(), 0)?;
    }
    Ok(())
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

/// Writes `new` at `base..`, skipping entries equal to what the generation already holds
/// (`old`; `None` means zero-filled).
fn write_array<V: Pod + PartialEq + Default>(
    map: &mut Map,
    base: u32,
    new: &[V],
    old: Option<&[V]>,
) -> Result<usize> {
    let mut updates = 0;
    let mut array: Array<&mut MapData, V> = Array::try_from(map)?;
    for (index, value) in new.iter().enumerate() {
        let current = match old {
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

/// Makes the trie entries of generation `gen` equal to `new`: removes stale entries, inserts
/// new and changed ones.
fn write_trie<N: Copy + Eq + Hash, K: Pod>(
    map: &mut Map,
    gen: u32,
    new: &[(N, RuleBits)],
    old: Option<&[(N, RuleBits)]>,
    key: fn(u32, &N) -> Key<K>,
) -> Result<usize> {
    let mut updates = 0;
    let mut trie: LpmTrie<&mut MapData, K, RuleBits> = LpmTrie::try_from(map)?;
    let old: StdHashMap<N, RuleBits> = old.unwrap_or_default().iter().copied().collect();
    let new_map: StdHashMap<N, RuleBits> = new.iter().copied().collect();
    for net in old.keys() {
        if !new_map.contains_key(net) {
            trie.remove(&key(gen, net))?;
            updates += 1;
        }
    }
    for (net, bits) in new {
        if old.get(net) != Some(bits) {
            trie.insert(&key(gen, net), *bits, 0)?;
            updates += 1;
        }
    }
    Ok(updates)
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

/// Waits for an RCU grace period: BPF programs run inside RCU read-side sections, so when it
/// returns, every run that started before the call has ended. `membarrier(GLOBAL)` is
/// `synchronize_rcu()` in the kernel; where it is unavailable (nohz_full), a pause far longer
/// than any program run stands in.
fn wait_for_packets_in_flight() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes no pointers.
    let result = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if result != 0 {
        log::debug!(
            "membarrier: {}; pausing instead",
            std::io::Error::last_os_error()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
fn raise_memlock_limit() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } != 0 {
        log::debug!("could not raise RLIMIT_MEMLOCK");
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_now_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * NANOS_PER_SEC + now.tv_nsec as u64
}
