//! The kernel's port-class tables: each packet looks up one value, its TCP/UDP destination
//! port or its ICMP type (see [`crate::rules::compile`] for why both can share the tables).
use std::collections::HashMap;
use std::ops::RangeInclusive;

use anyhow::{bail, Result};
use firewall_common::{RuleBits, MAX_PORT_CLASSES};

use crate::rules::compile::PORTS;
use crate::rules::model::Rule;

/// The values of the kernel's port lookup a rule accepts: its ports, or its ICMP types;
/// `None` when it has neither.
fn port_values(rule: &Rule) -> Option<Vec<RangeInclusive<u16>>> {
    match (&rule.ports, &rule.icmp_types) {
        (Some(ranges), _) => Some(ranges.clone()),
        (None, Some(types)) => Some(
            types
                .iter()
                .map(|&kind| u16::from(kind)..=u16::from(kind))
                .collect(),
        ),
        (None, None) => None,
    }
}

/// Port (or ICMP type) -> class, and class -> rules. Identical bit sets share a class.
pub(crate) fn port_tables(rules: &[Rule]) -> Result<(Vec<u32>, Vec<RuleBits>)> {
    let values: Vec<Option<Vec<RangeInclusive<u16>>>> = rules.iter().map(port_values).collect();
    let mut portless = RuleBits::EMPTY;
    // Values where some rule's membership changes.
    let mut cuts = vec![0usize];
    for (index, ranges) in values.iter().enumerate() {
        match ranges {
            None => portless.set(index),
            Some(ranges) => {
                for range in ranges {
                    cuts.push(usize::from(*range.start()));
                    cuts.push(usize::from(*range.end()) + 1);
                }
            }
        }
    }
    cuts.retain(|&cut| cut < PORTS);
    cuts.sort_unstable();
    cuts.dedup();

    // Bits per segment [cuts[i], cuts[i+1]).
    let mut segment_bits = vec![portless; cuts.len()];
    for (index, ranges) in values.iter().enumerate() {
        for range in ranges.iter().flatten() {
            let first = cuts.partition_point(|&cut| cut <= usize::from(*range.start())) - 1;
            let last = cuts.partition_point(|&cut| cut <= usize::from(*range.end())) - 1;
            for bits in &mut segment_bits[first..=last] {
                bits.set(index);
            }
        }
    }

    let mut class_of: HashMap<RuleBits, u32> = HashMap::from([(portless, 0)]);
    let mut port_bits = vec![portless];
    let mut port_class = vec![0u32; PORTS];
    for (segment, bits) in segment_bits.iter().enumerate() {
        let class = *class_of.entry(*bits).or_insert_with(|| {
            port_bits.push(*bits);
            port_bits.len() as u32 - 1
        });
        let end = cuts.get(segment + 1).copied().unwrap_or(PORTS);
        port_class[cuts[segment]..end].fill(class);
    }
    if port_bits.len() > MAX_PORT_CLASSES as usize {
        bail!(
            "the rules' ports form {} distinct port classes; at most {MAX_PORT_CLASSES} are supported",
            port_bits.len()
        );
    }
    Ok((port_class, port_bits))
}
