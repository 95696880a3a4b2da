//! Reading and seeding the state the kernel programs keep: the host's flows, its DHCP
//! requests and the counters.
use anyhow::Result;
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use firewall_common::proto::{IPPROTO_TCP, IPPROTO_UDP};
use firewall_common::{
    local_port_slot, local_port_tick, map_names, Counter, FlowKey, FlowState, GenerationConfig,
    LogLimit, STAT_SLOTS,
};

use crate::dataplane::sys::monotonic_now_ns;
use crate::dataplane::{batch, Kernel};
use crate::report::flows::{read_fill, FlowFill};

impl Kernel {
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
        self.mark_local_ports(keys.iter().map(|key| (key, state.last_seen_ns)))
    }

    /// Marks the local ports of TCP/UDP flows as in use as of their last packet, as the tc
    /// egress program does for the flows it records: the XDP program looks up no flow on a
    /// port that is not marked.
    pub(crate) fn mark_local_ports<'a>(
        &mut self,
        flows: impl Iterator<Item = (&'a FlowKey, u64)>,
    ) -> Result<()> {
        let mut ports: Array<&mut MapData, u32> =
            Array::try_from(self.map_mut(map_names::LOCAL_PORTS)?)?;
        for (key, last_seen_ns) in flows {
            let udp = match key.proto {
                IPPROTO_TCP => false,
                IPPROTO_UDP => true,
                _ => continue,
            };
            let slot = local_port_slot(udp, key.local_port);
            let tick = local_port_tick(last_seen_ns);
            // The latest of the flows that share the port.
            if ports.get(&slot, 0)? < tick {
                ports.set(slot, tick, 0)?;
            }
        }
        Ok(())
    }

    /// The tracked flows, as the kernel holds them now.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowState)>> {
        batch::entries(self.map(map_names::FLOWS)?)
    }

    /// How full the flow table is, under the timeouts of the rules in force.
    pub fn flow_fill(&self) -> Result<FlowFill> {
        let configs: Array<&MapData, GenerationConfig> =
            Array::try_from(self.map(map_names::GEN_CONFIG)?)?;
        let config = configs.get(&self.active_generation()?, 0)?;
        read_fill(self.map(map_names::FLOWS)?, &config, monotonic_now_ns())
    }

    /// The record of the host's last DHCP request per interface, as `(ifindex, ns)`.
    pub fn dhcp_requests(&self) -> Result<Vec<(u32, u64)>> {
        let requests: HashMap<&MapData, u32, u64> =
            HashMap::try_from(self.map(map_names::DHCP_REQUESTS)?)?;
        Ok(requests.iter().collect::<Result<_, _>>()?)
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

    /// Log lines the per-CPU rate limits refused, summed over CPUs.
    pub fn refused_log_lines(&self) -> Result<u64> {
        let limits: PerCpuArray<&MapData, LogLimit> =
            PerCpuArray::try_from(self.map(map_names::LOG_LIMIT)?)?;
        Ok(limits
            .get(&0, 0)?
            .iter()
            .map(|limit| limit.suppressed)
            .sum())
    }
}

/// Setters that put the kernel in a known state for tests.
#[cfg(feature = "testing")]
mod testing {
    use anyhow::Result;
    use aya::maps::{HashMap, Map, MapData};
    use aya::Pod;
    use firewall_common::{map_names, FlowKey, FlowState};

    use crate::dataplane::Kernel;

    impl Kernel {
        /// Replaces the tracked flows.
        pub fn set_flows(&mut self, table: &[(FlowKey, FlowState)]) -> Result<()> {
            replace_entries(self.map_mut(map_names::FLOWS)?, table)?;
            self.mark_local_ports(table.iter().map(|(key, state)| (key, state.last_seen_ns)))
        }

        /// Replaces the record of the host's last DHCP request per interface: `(ifindex,
        /// CLOCK_MONOTONIC ns)`.
        pub fn set_dhcp_requests(&mut self, table: &[(u32, u64)]) -> Result<()> {
            replace_entries(self.map_mut(map_names::DHCP_REQUESTS)?, table)
        }
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
}
