//! The kernel side as seen from userspace: loads the XDP program ([`load`]), attaches it
//! ([`attach`]), writes compiled rule sets into the idle generation and flips to it
//! ([`generation`]), reads flows and counters ([`flows`]), and, for tests, runs packets
//! through BPF_PROG_TEST_RUN. [`maps`] lists the maps, [`pins`] lays out the pinned state.

pub mod attach;
pub mod bans;
pub mod batch;
pub mod flows;
pub mod generation;
pub mod load;
pub mod maps;
pub mod packet_log;
pub mod pins;
pub mod sys;
#[cfg(feature = "testing")]
pub mod test_run;

use std::collections::HashMap as StdHashMap;

use anyhow::{anyhow, Result};
use aya::maps::{Array, Map, MapData};
use aya::programs::{Program, ProgramError};
use aya::Ebpf;
use firewall_common::{map_names, RuleBits};

pub use attach::AttachMode;
pub use load::{object_id, MINIMUM_KERNEL};
pub use sys::monotonic_now_ns;

use crate::dataplane::pins::Pins;
use crate::host::link::LinkLayer;
use crate::rules::compile::Compiled;

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

/// What a generation of the rule maps holds.
enum Held {
    /// Nothing: freshly created maps.
    Zeroed,
    /// Exactly this rule set, as we wrote it (boxed: it is large).
    Rules(Box<Compiled>),
    /// A write into it failed half-way.
    Unknown,
}

impl Kernel {
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The generation packets are classified with.
    pub fn active_generation(&self) -> Result<u32> {
        let active: Array<&MapData, u32> =
            Array::try_from(self.map(map_names::ACTIVE_GENERATION)?)?;
        Ok(active.get(&0, 0)? & 1)
    }

    /// The program `name` as its type `P`; `kind` names that type in the error.
    fn program_mut<'a, P>(&'a mut self, kind: &str, name: &str) -> Result<&'a mut P>
    where
        &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
    {
        let program = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("{kind} program `{name}` missing from the object"))?;
        Ok(program.try_into()?)
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
