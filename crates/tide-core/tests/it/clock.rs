//! The Lamport clock and the stamp order.

use proptest::prelude::*;
use tide_core::{Error, LAMPORT_MAX, LamportClock, Stamp};

#[test]
fn tick_is_one_more_than_anything_issued_or_observed() {
    let mut clock = LamportClock::new(5).unwrap();
    assert_eq!(clock.tick().unwrap(), 6);
    clock.observe(100).unwrap();
    assert_eq!(clock.tick().unwrap(), 101);
    clock.observe(3).unwrap();
    assert_eq!(clock.tick().unwrap(), 102);
    assert_eq!(clock.value(), 102);
}

#[test]
fn counters_never_pass_two_to_the_53_minus_one() {
    assert_eq!(LAMPORT_MAX, 9_007_199_254_740_991);
    assert_eq!(LamportClock::new(LAMPORT_MAX + 1), Err(Error::LamportOutOfRange { lamport: LAMPORT_MAX + 1 }));
    let mut clock = LamportClock::new(LAMPORT_MAX - 1).unwrap();
    assert_eq!(clock.tick(), Ok(LAMPORT_MAX));
    assert_eq!(clock.tick(), Err(Error::LamportExhausted));
    let mut clock = LamportClock::new(1).unwrap();
    assert_eq!(clock.observe(u64::MAX), Err(Error::LamportOutOfRange { lamport: u64::MAX }));
    assert_eq!(clock.value(), 1, "a refused counter leaves the clock unchanged");
}

#[test]
fn node_ids_break_ties_bytewise() {
    assert!(Stamp::new(2, "a") > Stamp::new(1, "z"));
    assert!(Stamp::new(1, "b") > Stamp::new(1, "a"));
    // Bytewise, not locale order: uppercase sorts before lowercase, and a
    // multi-byte character after every ASCII one.
    assert!(Stamp::new(1, "a") > Stamp::new(1, "B"));
    assert!(Stamp::new(1, "é") > Stamp::new(1, "z"));
    assert!(Stamp::new(1, "ab") > Stamp::new(1, "a"));
}

fn stamp() -> impl Strategy<Value = Stamp> {
    (0u64..4, "[a-cA-C\u{e9}]{0,2}").prop_map(|(l, n)| Stamp::new(l, n))
}

proptest! {
    #[test]
    fn the_stamp_order_is_total_antisymmetric_and_transitive(a in stamp(), b in stamp(), c in stamp()) {
        let relations = [a < b, a == b, a > b];
        prop_assert_eq!(relations.iter().filter(|r| **r).count(), 1);
        prop_assert_eq!(a < b, b > a);
        if a <= b && b <= c { prop_assert!(a <= c); }
        // The tie-break is the bytes of the node id.
        if a.lamport == b.lamport {
            prop_assert_eq!(a.cmp(&b), a.node_id.as_bytes().cmp(b.node_id.as_bytes()));
        }
    }

    #[test]
    fn a_tick_beats_every_observed_counter(seed in 0u64..1000, seen in proptest::collection::vec(0u64..2000, 0..10)) {
        let mut clock = LamportClock::new(seed).unwrap();
        for s in &seen { clock.observe(*s).unwrap(); }
        let t = clock.tick().unwrap();
        prop_assert!(t > seed);
        prop_assert!(seen.iter().all(|s| t > *s));
    }
}
