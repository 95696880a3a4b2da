//! Loading the XDP object: creating (or reusing pinned) maps, loading the programs of each
//! link layer once, and pinning them with the build's maps.
use std::path::Path;

use anyhow::{anyhow, bail, Context as _, Result};
use aya::programs::{SchedClassifier, Xdp};
use aya::util::KernelVersion;
use aya::EbpfLoader;
use firewall_common::map_names;

use crate::dataplane::pins::Pins;
use crate::dataplane::{maps, sys, Held, Kernel};
use crate::host::link::LinkLayer;

/// The XDP object built from firewall-ebpf by build.rs.
pub(super) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/firewall"));

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
    /// Loads the programs of Ethernet interfaces and creates the maps; nothing is attached
    /// yet, nothing pinned. [`Kernel::load_layer`] adds the other link layer's: each program
    /// costs the verifier's time (seconds per program on a slow machine), and most uses need
    /// only these.
    pub fn load() -> Result<Self> {
        Self::load_with(None, OBJECT)
    }

    /// As [`Kernel::load`], from another build's XDP object with the same maps (benchmarks
    /// compare builds this way).
    #[cfg(feature = "testing")]
    pub fn load_object(object: &[u8]) -> Result<Self> {
        Self::load_with(None, object)
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
        let bans = pins.bans_dir();
        std::fs::create_dir_all(&bans).with_context(|| format!("creating {}", bans.display()))?;
        let mut kernel = Self::load_with(Some((&build, &bans)), OBJECT)?;
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

    /// Creates the maps and loads the Ethernet programs of `object`.
    /// With `pin_dirs` (the build's, the bans'), maps are pinned there or reused from there.
    fn load_with(pin_dirs: Option<(&Path, &Path)>, object: &[u8]) -> Result<Self> {
        if object.is_empty() {
            bail!("this binary was built without its XDP object (AYA_BUILD_SKIP was set)");
        }
        sys::raise_memlock_limit();
        let mut loader = EbpfLoader::new();
        if let Some((build, bans)) = pin_dirs {
            for (name, path) in maps::pin_paths(build, bans) {
                loader.map_pin_path(name, path);
            }
        }
        let ebpf = loader.load(object).context("loading the XDP object")?;
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
    pub fn load_layer(&mut self, layer: LinkLayer) -> Result<()> {
        if self.loaded.contains(&layer) {
            return Ok(());
        }
        let name = layer.xdp_program();
        let program: &mut Xdp = self.program_mut("XDP", name)?;
        program
            .load()
            .with_context(|| rejected(&format!("XDP program {name}")))?;
        let name = layer.egress_program();
        let egress: &mut SchedClassifier = self.program_mut("tc", name)?;
        egress
            .load()
            .with_context(|| rejected(&format!("tc egress program {name}")))?;
        if let Some(build) = self.build.clone() {
            self.pin_programs(layer, &build)?;
        }
        self.loaded.push(layer);
        Ok(())
    }
}
