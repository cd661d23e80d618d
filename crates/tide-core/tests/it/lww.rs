//! The LWW decision and the merge laws it gives.

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::json;
use tide_core::{Decision, Payload, Stamp, decide};

use crate::doc;

fn put(n: i64) -> Payload {
    Payload::Put(doc(json!({ "n": n })))
}

#[test]
fn the_decision_table() {
    let s = |l, n: &str| Stamp::new(l, n);
    assert_eq!(decide(None, &s(1, "a"), &put(1)), Decision::Apply);
    assert_eq!(decide(Some((&s(1, "a"), &put(1))), &s(2, "a"), &put(2)), Decision::Apply);
    assert_eq!(decide(Some((&s(1, "a"), &put(1))), &s(1, "b"), &put(2)), Decision::Apply);
    assert_eq!(decide(Some((&s(2, "a"), &put(1))), &s(1, "b"), &put(2)), Decision::Superseded);
    assert_eq!(decide(Some((&s(1, "a"), &put(1))), &s(1, "a"), &put(1)), Decision::Duplicate);
    assert_eq!(decide(Some((&s(1, "a"), &Payload::Delete)), &s(1, "a"), &Payload::Delete), Decision::Duplicate);
    assert_eq!(decide(Some((&s(1, "a"), &put(1))), &s(1, "a"), &put(2)), Decision::Collision);
    assert_eq!(decide(Some((&s(1, "a"), &put(1))), &s(1, "a"), &Payload::Delete), Decision::Collision);
    // A tombstone is a version like any other: an older put cannot revive it.
    assert_eq!(decide(Some((&s(5, "a"), &Payload::Delete)), &s(4, "z"), &put(1)), Decision::Superseded);
    assert!(!Decision::Collision.is_ack());
    assert!(Decision::Superseded.is_ack() && Decision::Duplicate.is_ack() && Decision::Apply.is_ack());
}

type Key = (u8, u8);
type State = BTreeMap<Key, (Stamp, Payload)>;

#[derive(Debug, Clone)]
struct Write {
    key: Key,
    stamp: Stamp,
    payload: Payload,
}

fn merge(state: &mut State, w: &Write) {
    let stored = state.get(&w.key).map(|(s, p)| (s, p));
    if decide(stored, &w.stamp, &w.payload) == Decision::Apply {
        state.insert(w.key, (w.stamp.clone(), w.payload.clone()));
    }
}

fn merge_states(into: &mut State, from: &State) {
    for (key, (stamp, payload)) in from {
        merge(into, &Write { key: *key, stamp: stamp.clone(), payload: payload.clone() });
    }
}

/// Writes on a tiny key space with few nodes, so conflicts and equal
/// counters are common. A stamp is issued once, so it has one payload.
fn writes() -> impl Strategy<Value = Vec<Write>> {
    let write =
        (0u8..2, 0u8..3, 1u64..6, prop::sample::select(vec!["a", "b", "c"]), prop::option::of(0i64..3)).prop_map(
            |(c, i, l, n, v)| Write { key: (c, i), stamp: Stamp::new(l, n), payload: v.map_or(Payload::Delete, put) },
        );
    prop::collection::vec(write, 0..24).prop_map(|ws| {
        let mut seen = std::collections::HashSet::new();
        ws.into_iter().filter(|w| seen.insert((w.key, w.stamp.clone()))).collect()
    })
}

/// Any delivery: a permutation where some writes come twice and some are
/// lost at first and delivered again at the end (loss with retry).
fn deliveries(ws: &[Write], order: &[usize], dup: &[bool], lose: &[bool]) -> Vec<Write> {
    let n = ws.len();
    let mut out = Vec::new();
    let mut retry = Vec::new();
    for (k, &o) in order.iter().enumerate().take(n) {
        let w = &ws[o % n];
        if lose[k] {
            retry.push(w.clone());
            continue;
        }
        out.push(w.clone());
        if dup[k] {
            out.push(w.clone());
        }
    }
    out.extend(retry);
    out
}

fn fold(ws: &[Write]) -> State {
    let mut s = State::new();
    for w in ws {
        merge(&mut s, w);
    }
    s
}

proptest! {
    #[test]
    fn merge_converges_over_any_order_duplication_and_retry(
        ws in writes(),
        seed in prop::collection::vec((any::<usize>(), any::<bool>(), any::<bool>()), 24),
    ) {
        prop_assume!(!ws.is_empty());
        let n = ws.len();
        // A permutation from the seed: sort indices by their random key.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|i| seed[*i].0);
        let dup: Vec<bool> = seed.iter().map(|s| s.1).collect();
        let lose: Vec<bool> = seed.iter().map(|s| s.2).collect();
        let in_order = fold(&ws);
        let shuffled = fold(&deliveries(&ws, &order, &dup, &lose));
        prop_assert_eq!(&in_order, &shuffled);
        // And the result is the model's: the highest stamp per key.
        for (key, (stamp, _)) in &in_order {
            let best = ws.iter().filter(|w| w.key == *key).map(|w| &w.stamp).max().unwrap();
            prop_assert_eq!(stamp, best);
        }
    }

    #[test]
    fn state_merge_is_commutative_associative_and_idempotent(a in writes(), b in writes(), c in writes()) {
        // One stamp, one payload, across all three sets.
        let mut seen = std::collections::HashSet::new();
        let mut keep = |ws: Vec<Write>| -> State {
            fold(&ws.into_iter().filter(|w| seen.insert((w.key, w.stamp.clone()))).collect::<Vec<_>>())
        };
        let (a, b, c) = (keep(a), keep(b), keep(c));
        let join = |x: &State, y: &State| { let mut s = x.clone(); merge_states(&mut s, y); s };
        prop_assert_eq!(join(&a, &b), join(&b, &a));
        prop_assert_eq!(join(&join(&a, &b), &c), join(&a, &join(&b, &c)));
        prop_assert_eq!(join(&a, &a), a.clone());
    }

    #[test]
    fn an_equal_stamp_with_another_payload_is_a_collision_in_either_order(l in 1u64..5, x in 0i64..3, y in 0i64..3) {
        prop_assume!(x != y);
        let s = Stamp::new(l, "a");
        prop_assert_eq!(decide(Some((&s, &put(x))), &s, &put(y)), Decision::Collision);
        prop_assert_eq!(decide(Some((&s, &put(y))), &s, &put(x)), Decision::Collision);
    }
}
