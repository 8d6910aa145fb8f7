//! The entry index's entries per selector (store layout 4 keeps no selector index on disk).
//!
//! # Memory
//!
//! One 16-byte slot per distinct selector in a hash set, holding the entry itself while one
//! entry has that selector (the slot names which of the entry's selectors it is, so the
//! selector's text is not copied). A selector several entries share gets a group that owns a
//! copy of the selector and lists its entries: in a vector while there are few (8 bytes per
//! entry), in a hash set once there are many, so a write stays O(1) when a selector is
//! shared by a whole store (`unix:uid:1000` on every workload of one user).

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use tessera_spiffe::Selector;

use super::super::types::SharedEntry;
use super::ById;

type Set<T> = HashSet<T, foldhash::fast::RandomState>;

/// Most entries a group lists in a vector; one more makes it a hash set.
const FEW: usize = 32;

/// A group of at most this many entries in a hash set goes back to a vector.
const FEW_AGAIN: usize = FEW / 2;

/// The entries of the index per selector; see the [module docs](self).
#[derive(Debug, Default)]
pub(super) struct BySelector {
    slots: Set<Slot>,
}

/// The entries that have one selector.
#[derive(Debug)]
enum Slot {
    /// One entry has it: its selector number `at` (an index into the entry's selector set,
    /// which cannot change: a written entry is a new `SharedEntry`).
    One { entry: Arc<SharedEntry>, at: u32 },
    /// Several have it (or one whose selector could not be numbered).
    Many(Box<Group>),
}

#[derive(Debug)]
struct Group {
    selector: Selector,
    members: Members,
}

#[derive(Debug)]
enum Members {
    /// In no particular order.
    Few(Vec<Arc<SharedEntry>>),
    Lots(Set<ById>),
}

impl Slot {
    fn selector(&self) -> &Selector {
        match self {
            // `at` was the selector's position in this very entry's set when the slot was made,
            // and the set is immutable.
            Self::One { entry, at } => &entry.selectors.iter().as_slice()[*at as usize],
            Self::Many(group) => &group.selector,
        }
    }

    /// A slot for `entry` alone, under its selector `selector`.
    fn one(entry: Arc<SharedEntry>, selector: &Selector) -> Self {
        let at = entry.selectors.iter().position(|own| own == selector).and_then(|at| u32::try_from(at).ok());
        match at {
            Some(at) => Self::One { entry, at },
            None => Self::Many(Box::new(Group { selector: selector.clone(), members: Members::Few(vec![entry]) })),
        }
    }
}

impl PartialEq for Slot {
    fn eq(&self, other: &Self) -> bool {
        self.selector() == other.selector()
    }
}

impl Eq for Slot {}

// As its selector, so the set is looked up by `&Selector`.
impl Hash for Slot {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.selector().hash(state);
    }
}

impl Borrow<Selector> for Slot {
    fn borrow(&self) -> &Selector {
        self.selector()
    }
}

impl Members {
    fn len(&self) -> usize {
        match self {
            Self::Few(entries) => entries.len(),
            Self::Lots(entries) => entries.len(),
        }
    }

    fn add(&mut self, entry: Arc<SharedEntry>) {
        match self {
            Self::Few(entries) if entries.len() < FEW => entries.push(entry),
            Self::Few(entries) => {
                *self = Self::Lots(entries.drain(..).chain(std::iter::once(entry)).map(ById).collect());
            }
            Self::Lots(entries) => {
                entries.insert(ById(entry));
            }
        }
    }

    fn remove(&mut self, id: &str) {
        match self {
            Self::Few(entries) => {
                if let Some(found) = entries.iter().position(|entry| entry.id == id) {
                    entries.swap_remove(found);
                }
            }
            Self::Lots(entries) => {
                entries.remove(id);
                if entries.len() <= FEW_AGAIN {
                    *self = Self::Few(entries.drain().map(|entry| entry.0).collect());
                }
            }
        }
    }

    /// The only member, when there is exactly one.
    fn only(&self) -> Option<&Arc<SharedEntry>> {
        match self {
            Self::Few(entries) if entries.len() == 1 => entries.first(),
            Self::Lots(entries) if entries.len() == 1 => entries.iter().next().map(|entry| &entry.0),
            _ => None,
        }
    }

    fn iter(&self) -> Box<dyn Iterator<Item = &Arc<SharedEntry>> + '_> {
        match self {
            Self::Few(entries) => Box::new(entries.iter()),
            Self::Lots(entries) => Box::new(entries.iter().map(|entry| &entry.0)),
        }
    }
}

impl BySelector {
    /// Lists `entry` under each of its selectors (it must not be listed already).
    pub(super) fn add(&mut self, entry: &Arc<SharedEntry>) {
        for selector in &entry.selectors {
            let slot = match self.slots.take(selector) {
                None => Slot::one(Arc::clone(entry), selector),
                Some(Slot::One { entry: first, .. }) => Slot::Many(Box::new(Group {
                    selector: selector.clone(),
                    members: Members::Few(vec![first, Arc::clone(entry)]),
                })),
                Some(Slot::Many(mut group)) => {
                    group.members.add(Arc::clone(entry));
                    Slot::Many(group)
                }
            };
            self.slots.insert(slot);
        }
    }

    /// Takes `entry` (as it was listed) off the lists of its selectors.
    pub(super) fn remove(&mut self, entry: &SharedEntry) {
        for selector in &entry.selectors {
            let slot = match self.slots.take(selector) {
                None => continue,
                Some(Slot::One { entry: only, at }) => {
                    if only.id == entry.id {
                        continue;
                    }
                    Slot::One { entry: only, at }
                }
                Some(Slot::Many(mut group)) => {
                    group.members.remove(&entry.id);
                    if group.members.len() == 0 {
                        continue;
                    }
                    match group.members.only() {
                        Some(only) => Slot::one(Arc::clone(only), selector),
                        None => Slot::Many(group),
                    }
                }
            };
            self.slots.insert(slot);
        }
    }

    /// The entries that have `selector`, in no particular order.
    pub(super) fn with<'a>(&'a self, selector: &Selector) -> Box<dyn Iterator<Item = &'a Arc<SharedEntry>> + 'a> {
        match self.slots.get(selector) {
            None => Box::new(std::iter::empty()),
            Some(Slot::One { entry, .. }) => Box::new(std::iter::once(entry)),
            Some(Slot::Many(group)) => group.members.iter(),
        }
    }

    /// How many distinct selectors are listed.
    #[cfg(test)]
    pub(super) fn selectors(&self) -> usize {
        self.slots.len()
    }

    /// How many selectors are listed in groups (as opposed to one entry each).
    #[cfg(test)]
    pub(super) fn groups(&self) -> usize {
        self.slots.iter().filter(|slot| matches!(slot, Slot::Many(_))).count()
    }
}

const _: () = assert!(size_of::<Slot>() == 16, "a slot per distinct selector is meant to be 16 bytes");
