//! Address classes: the distinct rule bit sets of a generation's address entries, each under a
//! small id. The kernel's exact maps and tries store the id (4 bytes) instead of the bits (136
//! bytes), and one array per generation maps ids to bits: a million-entry blocklist under a
//! few rules has a handful of classes.
use std::collections::HashMap;

use anyhow::{bail, Result};
use firewall_common::{RuleBits, GENERATIONS, MAX_ADDRESS_CLASSES};

use crate::rules::compile::AddressTable;

/// Bit sets under ids, equal sets under one id. While compiling, unions and single-rule
/// additions are remembered by the ids involved, so a million entries cost a million small
/// lookups, not a million hashes of 136-byte sets.
#[derive(Debug, Default)]
pub struct Interner {
    ids: HashMap<RuleBits, u32>,
    bits: Vec<RuleBits>,
    /// (class, rule) -> the class with that rule added.
    with_rule: HashMap<(u32, u32), u32>,
    /// (class, class) -> the class of their union.
    unions: HashMap<(u32, u32), u32>,
}

impl Interner {
    /// The id of `bits`, new if no equal set has one yet.
    pub fn intern(&mut self, bits: RuleBits) -> u32 {
        if let Some(&id) = self.ids.get(&bits) {
            return id;
        }
        let id = self.bits.len() as u32;
        self.bits.push(bits);
        self.ids.insert(bits, id);
        id
    }

    pub fn bits(&self, id: u32) -> &RuleBits {
        &self.bits[id as usize]
    }

    /// The class of `id`'s rules plus `rule`.
    pub fn with_rule(&mut self, id: u32, rule: usize) -> u32 {
        if let Some(&known) = self.with_rule.get(&(id, rule as u32)) {
            return known;
        }
        let mut bits = *self.bits(id);
        bits.set(rule);
        let union = self.intern(bits);
        self.with_rule.insert((id, rule as u32), union);
        union
    }

    /// The class of the union of `a`'s and `b`'s rules.
    pub fn union(&mut self, a: u32, b: u32) -> u32 {
        if let Some(&known) = self.unions.get(&(a, b)) {
            return known;
        }
        let mut bits = *self.bits(a);
        bits.union_with(self.bits(b));
        let union = self.intern(bits);
        self.unions.insert((a, b), union);
        union
    }
}

/// Renumbers the ids of a scratch [`Interner`] (which also holds sets no entry kept) into the
/// classes a generation writes: in order of first use, so equal rule sets give equal ids on
/// every compile and a reload rewrites only what changed.
pub struct Renumber<'a> {
    scratch: &'a Interner,
    ids: Vec<Option<u32>>,
    classes: Vec<RuleBits>,
}

impl<'a> Renumber<'a> {
    pub fn new(scratch: &'a Interner) -> Self {
        Renumber {
            scratch,
            ids: vec![None; scratch.bits.len()],
            classes: Vec::new(),
        }
    }

    /// The generation's id of scratch id `id`.
    pub fn id(&mut self, id: u32) -> u32 {
        let slot = &mut self.ids[id as usize];
        *slot.get_or_insert_with(|| {
            self.classes.push(self.scratch.bits[id as usize]);
            self.classes.len() as u32 - 1
        })
    }

    /// `table` with the generation's ids in place of scratch ids.
    pub fn table<N>(&mut self, table: AddressTable<N>) -> AddressTable<N> {
        let mut renumber = |entries: Vec<(N, u32)>| -> Vec<(N, u32)> {
            let entries = entries.into_iter();
            entries.map(|(net, id)| (net, self.id(id))).collect()
        };
        AddressTable {
            trie: renumber(table.trie),
            exact: renumber(table.exact),
        }
    }

    /// The classes, by id; an error (with the numbers) if the kernel's array cannot hold them.
    pub fn classes(self) -> Result<Vec<RuleBits>> {
        check_limit(self.classes.len())?;
        Ok(self.classes)
    }
}

fn check_limit(classes: usize) -> Result<()> {
    if classes > MAX_ADDRESS_CLASSES as usize {
        let bytes = std::mem::size_of::<RuleBits>();
        bail!(
            "the rules' addresses fall into {classes} distinct sets of rules (address classes); \
             at most {MAX_ADDRESS_CLASSES} are supported (the kernel's preallocated class array \
             takes {GENERATIONS} generations x {MAX_ADDRESS_CLASSES} x {bytes} bytes): fewer \
             rules naming overlapping, differently combined networks need fewer"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(rules: &[usize]) -> RuleBits {
        let mut bits = RuleBits::EMPTY;
        for &rule in rules {
            bits.set(rule);
        }
        bits
    }

    #[test]
    fn equal_bit_sets_share_one_id() {
        let mut interner = Interner::default();
        let empty = interner.intern(RuleBits::EMPTY);
        let a = interner.intern(bits(&[3, 700]));
        assert_ne!(empty, a);
        assert_eq!(interner.intern(bits(&[700, 3])), a);
        // Reached by adding rules one by one, or by a union: the same id.
        let one = interner.with_rule(empty, 3);
        assert_eq!(interner.with_rule(one, 700), a);
        let other = interner.intern(bits(&[700]));
        assert_eq!(interner.union(one, other), a);
        assert_eq!(*interner.bits(a), bits(&[3, 700]));
        // Remembered: asking again finds the same answer.
        assert_eq!(interner.union(one, other), a);
        assert_eq!(interner.with_rule(one, 700), a);
    }

    #[test]
    fn renumbering_keeps_only_used_sets_in_order_of_first_use() {
        let mut scratch = Interner::default();
        let unused = scratch.intern(bits(&[1]));
        let second = scratch.intern(bits(&[2]));
        let first = scratch.intern(bits(&[1, 2]));
        let mut renumber = Renumber::new(&scratch);
        assert_eq!(renumber.id(first), 0);
        assert_eq!(renumber.id(second), 1);
        assert_eq!(renumber.id(first), 0);
        let classes = renumber.classes().unwrap();
        assert_eq!(classes, vec![bits(&[1, 2]), bits(&[2])]);
        assert!(!classes.contains(scratch.bits(unused)));
    }

    #[test]
    fn more_classes_than_the_kernel_holds_is_an_error_with_the_numbers() {
        let limit = MAX_ADDRESS_CLASSES as usize;
        assert!(check_limit(limit).is_ok());
        let mut scratch = Interner::default();
        // Every subset of 15 rules: 32,768 distinct sets.
        let sets: Vec<u32> = (0..1u32 << 15)
            .map(|mask| {
                let rules: Vec<usize> = (0..15).filter(|bit| mask & (1 << bit) != 0).collect();
                scratch.intern(bits(&rules))
            })
            .collect();
        let mut renumber = Renumber::new(&scratch);
        for id in sets {
            renumber.id(id);
        }
        let error = renumber.classes().unwrap_err().to_string();
        assert!(
            error.contains("32768 distinct sets") && error.contains("at most 16384"),
            "{error}"
        );
        assert!(
            error.contains("2 generations x 16384 x 136 bytes"),
            "{error}"
        );
    }
}
