//! A seeded simulation: clients write, delete and re-create on a tiny key
//! space, sync through the reference model over a faulty network (lost
//! requests, responses lost after commit, duplicated requests, small pages),
//! then heal. Safety: every replica equals the server, which holds the
//! highest stamp ever written per key. Liveness: outboxes drain in bounded
//! rounds.
//!
//! `TIDE_SEED=n` replays one seed; `TIDE_SEEDS=n` runs n seeds (default 200).

use std::collections::BTreeMap;

use serde_json::json;
use tide_core::{Cursor, Decision, LamportClock, Limits, Model, Op, Payload, SplitMix64, Stamp, SyncRequest, decide};

use crate::doc;

type Key = (String, String);

struct Client {
    node: String,
    clock: LamportClock,
    docs: BTreeMap<Key, (Stamp, Payload)>,
    outbox: Vec<Op>,
    cursor: Option<Cursor>,
    online: bool,
}

impl Client {
    fn write(&mut self, key: Key, payload: Payload) -> Op {
        let stamp = Stamp::new(self.clock.tick().unwrap(), self.node.clone());
        let op = Op {
            collection: key.0.clone(),
            id: key.1.clone(),
            stamp: stamp.clone(),
            payload: payload.clone(),
            op_id: None,
        };
        self.docs.insert(key, (stamp, payload));
        self.outbox.push(op.clone());
        op
    }

    fn request(&self, batch: usize, limit: u32) -> SyncRequest {
        let mut req = SyncRequest::new(self.node.clone(), self.cursor);
        req.ops = self.outbox.iter().take(batch).cloned().collect();
        req.limit = Some(limit);
        req
    }

    /// Handles a response: acks leave the outbox, changes merge by LWW, the
    /// clock observes every counter, the cursor moves forward.
    fn handle(&mut self, req: &SyncRequest, resp: &tide_core::SyncResponse) {
        assert_eq!(resp.results.len(), req.ops.len());
        for (op, result) in req.ops.iter().zip(&resp.results) {
            assert!(result.is_ack(), "unique node ids never collide: {result:?}");
            self.outbox.retain(|o| o.stamp != op.stamp);
        }
        for c in &resp.changes {
            self.clock.observe(c.stamp.lamport).unwrap();
            let key = (c.collection.clone(), c.id.clone());
            let stored = self.docs.get(&key).map(|(s, p)| (s, p));
            if decide(stored, &c.stamp, &c.payload) == Decision::Apply {
                self.docs.insert(key, (c.stamp.clone(), c.payload.clone()));
            }
        }
        assert!(resp.cursor >= self.cursor.unwrap_or_default() || resp.reset, "the cursor never goes back");
        self.cursor = Some(resp.cursor);
    }
}

fn run(seed: u64) -> Result<(), String> {
    let mut rng = SplitMix64::new(seed);
    let mut server = Model::new(Limits { changes_per_response_max: 1 + rng.below(4) as usize, ..Limits::default() });
    let n = 2 + rng.below(3) as usize;
    let mut clients: Vec<Client> = (0..n)
        .map(|i| Client {
            node: format!("node-{i}"),
            clock: LamportClock::new(0).unwrap(),
            docs: BTreeMap::new(),
            outbox: Vec::new(),
            cursor: None,
            online: true,
        })
        .collect();
    // The oracle: the highest stamp ever written per key, and its payload.
    let mut written: BTreeMap<Key, (Stamp, Payload)> = BTreeMap::new();

    for _ in 0..300 {
        let c = rng.below(n as u64) as usize;
        let client = &mut clients[c];
        match rng.below(10) {
            0..=3 => {
                let key = (format!("c{}", rng.below(2)), format!("k{}", rng.below(3)));
                let payload =
                    if rng.chance(30) { Payload::Delete } else { Payload::Put(doc(json!({"v": rng.below(5)}))) };
                let op = client.write(key.clone(), payload);
                let best = written.entry(key).or_insert_with(|| (op.stamp.clone(), op.payload.clone()));
                if op.stamp > best.0 {
                    *best = (op.stamp, op.payload);
                }
            }
            4 => client.online = !client.online,
            _ if !client.online => {}
            _ => {
                let req = client.request(1 + rng.below(3) as usize, 1 + rng.below(3) as u32);
                match rng.below(10) {
                    0 => {} // request lost: nothing reaches the server
                    1 => {
                        server.exchange(&req).map_err(|e| e.to_string())?; // response lost after commit
                    }
                    2 => {
                        server.exchange(&req).map_err(|e| e.to_string())?; // delivered twice
                        let resp = server.exchange(&req).map_err(|e| e.to_string())?;
                        client.handle(&req, &resp);
                    }
                    _ => {
                        let resp = server.exchange(&req).map_err(|e| e.to_string())?;
                        client.handle(&req, &resp);
                    }
                }
            }
        }
    }

    heal_and_check(&mut server, &mut clients, &written)
}

/// Heals everything, syncs until nothing moves (liveness, within bounded
/// rounds), then checks safety against the oracle.
fn heal_and_check(
    server: &mut Model,
    clients: &mut [Client],
    written: &BTreeMap<Key, (Stamp, Payload)>,
) -> Result<(), String> {
    let mut rounds = 0;
    loop {
        let mut moved = false;
        for client in clients.iter_mut() {
            client.online = true;
            let req = client.request(2, 2);
            let resp = server.exchange(&req).map_err(|e| e.to_string())?;
            moved |= !req.ops.is_empty() || !resp.changes.is_empty() || resp.has_more;
            client.handle(&req, &resp);
        }
        rounds += 1;
        if !moved {
            break;
        }
        if rounds > 1000 {
            return Err("liveness: outboxes did not drain within 1000 rounds".into());
        }
    }

    let server_state: BTreeMap<Key, (Stamp, Payload)> =
        server.rows().map(|(k, r)| (k.clone(), (r.stamp.clone(), r.payload.clone()))).collect();
    if server_state != *written {
        return Err(format!("server differs from the oracle:\n server {server_state:?}\n oracle {written:?}"));
    }
    for client in clients.iter() {
        if !client.outbox.is_empty() {
            return Err(format!("{} still has {} pending ops", client.node, client.outbox.len()));
        }
        if client.docs != *written {
            return Err(format!(
                "{} differs from the oracle:\n client {:?}\n oracle {written:?}",
                client.node, client.docs
            ));
        }
    }
    Ok(())
}

#[test]
fn replicas_converge_under_faults() {
    let seeds: Vec<u64> = if let Ok(s) = std::env::var("TIDE_SEED") {
        vec![s.parse().expect("TIDE_SEED is a number")]
    } else {
        let count = std::env::var("TIDE_SEEDS").map_or(200, |s| s.parse().expect("TIDE_SEEDS is a number"));
        (0..count).collect()
    };
    for &seed in &seeds {
        if let Err(e) = run(seed) {
            panic!(
                "seed {seed} failed: {e}\nreplay: TIDE_SEED={seed} cargo test -p tide-core --test it simulation::replicas_converge_under_faults"
            );
        }
    }
    println!("simulation: {} seeds converged", seeds.len());
}
