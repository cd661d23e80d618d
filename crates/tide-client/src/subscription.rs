//! What a store syncs (PROTOCOL.md §15): every collection it may read, or
//! those the application subscribed to. The main cursor covers a set of
//! collections (`synced`); a collection added later (subscribed to, or
//! newly readable) is pulled from the beginning by a catch-up on a cursor
//! of its own until that cursor reaches the main one, and then joins the
//! main set. Changes of the joining collection up to the catch-up's cursor
//! came with the catch-up, later ones come with the main pages; some come
//! twice, which last-writer-wins makes harmless. So no change is skipped
//! when the subscription changes, and nothing already held is pulled again.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// A set of collections; `None` for every one.
pub(crate) type Set = Option<BTreeSet<String>>;

/// The client's record of its subscription, saved in its store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Subscription {
    /// What the application subscribed to.
    pub(crate) wanted: Set,
    /// What the server last said the principal may read.
    pub(crate) readable: Set,
    /// What the main cursor covers.
    pub(crate) synced: Set,
    /// Collections being pulled from the beginning.
    pub(crate) catch_ups: Vec<CatchUp>,
}

/// Collections pulled from the beginning on a cursor of their own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CatchUp {
    pub(crate) collections: Set,
    /// Where it is (`None`: not begun).
    pub(crate) cursor: Option<u64>,
    /// The head its first page was read at: tombstones up to it are left
    /// out, as in an initial sync (PROTOCOL.md §4.1).
    pub(crate) live_below: Option<u64>,
    /// The store held live documents of these collections when it began
    /// (kept from an earlier subscription): it needs every tombstone, so
    /// none is left out.
    #[serde(default)]
    pub(crate) held: bool,
}

impl CatchUp {
    /// Its collections as a request names them (`None`: all).
    pub(crate) fn names(&self) -> Option<Vec<String>> {
        as_list(&self.collections)
    }
}

fn intersect(a: &Set, b: &Set) -> Set {
    match (a, b) {
        (None, x) | (x, None) => x.clone(),
        (Some(a), Some(b)) => Some(a.intersection(b).cloned().collect()),
    }
}

fn union(a: &Set, b: &Set) -> Set {
    match (a, b) {
        (None, _) | (_, None) => None,
        (Some(a), Some(b)) => Some(a.union(b).cloned().collect()),
    }
}

/// What of `wanted` `covered` lacks: `None` when nothing, `Some(None)` when
/// every collection is wanted and not all are covered.
fn missing(wanted: &Set, covered: &Set) -> Option<Set> {
    match (wanted, covered) {
        (_, None) => None,
        (None, Some(_)) => Some(None),
        (Some(w), Some(c)) => {
            let lacking: BTreeSet<String> = w.difference(c).cloned().collect();
            (!lacking.is_empty()).then_some(Some(lacking))
        }
    }
}

fn as_list(set: &Set) -> Option<Vec<String>> {
    set.as_ref().map(|s| s.iter().cloned().collect())
}

impl Subscription {
    /// A new store's: `wanted`, all of it covered by the main cursor (which
    /// starts at the beginning).
    pub(crate) fn new(wanted: Set) -> Self {
        Self { synced: wanted.clone(), wanted, readable: None, catch_ups: Vec::new() }
    }

    /// The collections a main-cursor request names (`None`: all).
    pub(crate) fn main(&self) -> Option<Vec<String>> {
        as_list(&self.synced)
    }

    /// Whether the main cursor covers `collection` (its digests are compared).
    pub(crate) fn covers(&self, collection: &str) -> bool {
        self.synced.as_ref().is_none_or(|s| s.contains(collection))
    }

    /// Whether the principal may read `collection`, as the server last said.
    pub(crate) fn may_read(&self, collection: &str) -> bool {
        self.readable.as_ref().is_none_or(|s| s.contains(collection))
    }

    /// The application subscribes to `wanted` instead.
    pub(crate) fn set_wanted(&mut self, wanted: Set) {
        self.wanted = wanted;
        self.plan();
    }

    /// Whether `readable` (absent: everything) differs from what the server
    /// last said.
    pub(crate) fn readable_differs(&self, readable: Option<&[String]>) -> bool {
        match (readable, &self.readable) {
            (None, None) => false,
            (Some(now), Some(before)) => now.len() != before.len() || now.iter().any(|c| !before.contains(c)),
            _ => true,
        }
    }

    /// The server said what the principal may read (absent: everything).
    pub(crate) fn observe_readable(&mut self, readable: Option<&[String]>) {
        if self.readable_differs(readable) {
            let readable: Set = readable.map(|r| r.iter().cloned().collect());
            self.readable = readable;
            self.plan();
        }
    }

    /// Brings the main set and the catch-ups in line with what is wanted
    /// and readable: what is no longer wanted leaves them, and what is
    /// wanted and covered by neither gets a catch-up of its own.
    fn plan(&mut self) {
        let desired = intersect(&self.wanted, &self.readable);
        self.synced = intersect(&self.synced, &desired);
        for catch_up in &mut self.catch_ups {
            catch_up.collections = intersect(&catch_up.collections, &desired);
        }
        self.catch_ups.retain(|c| c.collections.as_ref().is_none_or(|s| !s.is_empty()));
        let covered = self.catch_ups.iter().fold(self.synced.clone(), |all, c| union(&all, &c.collections));
        if let Some(collections) = missing(&desired, &covered) {
            self.catch_ups.push(CatchUp { collections, cursor: None, live_below: None, held: false });
        }
    }

    /// The first catch-up, if one is waiting.
    pub(crate) fn catching_up(&self) -> Option<&CatchUp> {
        self.catch_ups.first()
    }

    /// The first catch-up read a page up to `cursor` (read at `head`, if
    /// the server said it); when nothing more waits and it has reached
    /// `main`, its collections join the main set.
    pub(crate) fn advance(&mut self, cursor: u64, head: Option<u64>, done: bool, main: u64) {
        let Some(first) = self.catch_ups.first_mut() else { return };
        first.cursor = Some(cursor);
        first.live_below = match (first.live_below, head) {
            (Some(b), Some(h)) => Some(b.min(h)),
            (b, h) => b.or(h),
        };
        if done && cursor >= main {
            let joined = self.catch_ups.remove(0);
            self.synced = union(&self.synced, &joined.collections);
        }
    }

    /// As saved in the store.
    pub(crate) fn to_text(&self) -> String {
        serde_json::to_string(self).expect("a subscription serializes")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::{CatchUp, Subscription};

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    /// The first catch-up's collections, cursor and `live_below`.
    type First = Option<(Option<Vec<String>>, Option<u64>, Option<u64>)>;

    fn first(sub: &Subscription) -> First {
        sub.catching_up().map(|c: &CatchUp| (c.names(), c.cursor, c.live_below))
    }

    #[test]
    fn a_new_collection_is_caught_up_then_joins_the_main_set() {
        let mut sub = Subscription::new(Some(set(&["a"])));
        sub.set_wanted(Some(set(&["a", "b"])));
        assert_eq!(sub.main(), Some(vec!["a".to_owned()]));
        assert_eq!(first(&sub), Some((Some(vec!["b".to_owned()]), None, None)));
        sub.advance(5, Some(9), false, 7);
        assert_eq!(first(&sub), Some((Some(vec!["b".to_owned()]), Some(5), Some(9))));
        sub.advance(9, None, true, 7);
        assert_eq!(first(&sub), None);
        assert_eq!(sub.main(), Some(vec!["a".to_owned(), "b".to_owned()]));
    }

    #[test]
    fn a_catch_up_short_of_the_main_cursor_goes_on() {
        let mut sub = Subscription::new(Some(set(&[])));
        sub.set_wanted(Some(set(&["b"])));
        sub.advance(3, Some(3), true, 8);
        assert!(first(&sub).is_some(), "its cursor is behind the main one");
    }

    #[test]
    fn unsubscribing_narrows_the_main_set_and_the_catch_ups() {
        let mut sub = Subscription::new(Some(set(&["a", "b"])));
        sub.set_wanted(Some(set(&["a", "b", "c"])));
        sub.set_wanted(Some(set(&["a"])));
        assert_eq!(sub.main(), Some(vec!["a".to_owned()]));
        assert_eq!(first(&sub), None, "the catch-up of c went with it");
    }

    #[test]
    fn what_the_rules_take_away_leaves_and_what_they_give_back_is_caught_up() {
        let mut sub = Subscription::new(None);
        sub.observe_readable(Some(&["a".to_owned(), "b".to_owned()]));
        assert_eq!(sub.main(), Some(vec!["a".to_owned(), "b".to_owned()]));
        assert_eq!(first(&sub), None);
        sub.observe_readable(Some(&["a".to_owned()]));
        assert!(!sub.covers("b") && !sub.may_read("b"));
        sub.observe_readable(Some(&["a".to_owned(), "b".to_owned()]));
        assert_eq!(first(&sub).map(|c| c.0), Some(Some(vec!["b".to_owned()])));
        // Everything readable again: the main set cannot name what it lacks,
        // so one catch-up pulls every collection.
        sub.observe_readable(None);
        assert_eq!(first(&sub).map(|c| c.0), Some(Some(vec!["b".to_owned()])));
        assert_eq!(sub.catch_ups.last().map(|c| c.collections.clone()), Some(None));
    }
}
