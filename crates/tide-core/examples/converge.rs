//! Two replicas write offline, conflict, and converge through the reference
//! model of a sync server: the protocol end to end, with no I/O.
//!
//! `cargo run -p tide-core --example converge`

use std::collections::BTreeMap;

use serde_json::json;
use tide_core::{Cursor, Decision, LamportClock, Limits, Model, Op, Payload, Stamp, SyncRequest, decide};

struct Replica {
    node: &'static str,
    clock: LamportClock,
    docs: BTreeMap<String, (Stamp, Payload)>,
    outbox: Vec<Op>,
    cursor: Option<Cursor>,
}

impl Replica {
    fn new(node: &'static str) -> Self {
        Self { node, clock: LamportClock::default(), docs: BTreeMap::new(), outbox: Vec::new(), cursor: None }
    }

    fn write(&mut self, id: &str, payload: Payload) -> Result<(), tide_core::Error> {
        let stamp = Stamp::new(self.clock.tick()?, self.node);
        self.docs.insert(id.into(), (stamp.clone(), payload.clone()));
        self.outbox.push(Op { collection: "notes".into(), id: id.into(), stamp, payload, op_id: None });
        Ok(())
    }

    fn sync(&mut self, server: &mut Model) -> Result<(), tide_core::Error> {
        loop {
            let mut req = SyncRequest::new(self.node, self.cursor);
            req.ops = std::mem::take(&mut self.outbox);
            let resp = server.exchange(&req)?;
            for (op, result) in req.ops.iter().zip(&resp.results) {
                println!("  {} pushed {}@{:?}: {result:?}", self.node, op.id, (op.stamp.lamport, &op.stamp.node_id));
            }
            for change in resp.changes {
                self.clock.observe(change.stamp.lamport)?;
                let stored = self.docs.get(&change.id).map(|(s, p)| (s, p));
                if decide(stored, &change.stamp, &change.payload) == Decision::Apply {
                    println!("  {} applied {} from {}", self.node, change.id, change.stamp.node_id);
                    self.docs.insert(change.id, (change.stamp, change.payload));
                }
            }
            self.cursor = Some(resp.cursor);
            if !resp.has_more {
                return Ok(());
            }
        }
    }

    fn show(&self) {
        for (id, (stamp, payload)) in &self.docs {
            let value = payload.doc().map_or("<deleted>".into(), |d| serde_json::to_string(d).unwrap_or_default());
            println!("  {}: {id} = {value} at ({}, {})", self.node, stamp.lamport, stamp.node_id);
        }
    }
}

fn put(v: serde_json::Value) -> Payload {
    match v {
        serde_json::Value::Object(doc) => Payload::Put(doc.into()),
        _ => Payload::Delete,
    }
}

fn main() -> Result<(), tide_core::Error> {
    let mut server = Model::new(Limits::default());
    let (mut a, mut b) = (Replica::new("node-a"), Replica::new("node-b"));

    println!("offline: both write n1, a also writes n2 and b deletes it later");
    a.write("n1", put(json!({"title": "from a"})))?;
    a.write("n2", put(json!({"title": "only a"})))?;
    b.write("n1", put(json!({"title": "from b"})))?;

    println!("a syncs, then b, then a again:");
    a.sync(&mut server)?;
    b.sync(&mut server)?;
    b.write("n2", Payload::Delete)?;
    b.sync(&mut server)?;
    a.sync(&mut server)?;

    println!("final states:");
    a.show();
    b.show();
    assert_eq!(a.docs, b.docs, "replicas converged");
    println!("converged: {} documents, server seq {}", a.docs.len(), server.seq());
    Ok(())
}
