//! The writer: the one writer connection and the Lamport clock, and the
//! group commit that runs every write, in order.
//!
//! Concurrent local writes are committed together (group commit): the lock
//! holder drains whatever is queued, stamps it in order, and runs one statement for
//! the whole group. A trigger turns each outbox row into its document
//! upsert and clock bump, and the statement is its own transaction, so the
//! group is atomic and costs one round trip and one sync.

use std::collections::HashMap;

use serde::Serialize;
use sqlx::Connection;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tide_core::{Change, DocKey, ErrorCode, LAMPORT_MAX, LamportClock, Payload, Stamp};

use tokio::sync::{Mutex, oneshot};

use crate::conn::{self, ConnectionSettings, Shared, read_settings};
use crate::error::{Error, Result, db};
use crate::{CommitListener, Committed, Origin, Refused, Reverted, Write};

/// The most ops committed in one group.
pub const GROUP_OPS_MAX: usize = 4_096;

type Reply<T> = oneshot::Sender<Result<T>>;

/// An op the server refused, to move out of the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The op's outbox seq.
    pub seq: u64,
    /// Why, for machines.
    pub code: ErrorCode,
    /// Why, for people.
    pub message: String,
}

/// How the server acknowledged an op (PROTOCOL.md §6), as far as the store
/// needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acked {
    /// Stored under this seq.
    Applied(u64),
    /// Held already, or beaten by a newer version (which pages bring).
    Kept,
    /// Dropped: its document was deleted and the delete collected
    /// (PROTOCOL.md §14). The local version goes too.
    Deleted,
}

/// An acknowledged op: its outbox seq and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// The op's outbox seq.
    pub seq: u64,
    /// What the server did with it.
    pub acked: Acked,
}

pub(crate) enum Command {
    Write {
        writes: Vec<Write>,
        reply: Reply<Vec<Stamp>>,
    },
    /// A page, saved with the `tide_meta` value (the cursor, or a catch-up's state) it moves.
    Apply {
        changes: Vec<Change>,
        save: (&'static str, String),
        reply: Reply<Vec<Change>>,
    },
    Fetched {
        changes: Vec<Change>,
        reply: Reply<Vec<Change>>,
    },
    Revert {
        targets: Vec<Refused>,
        server: Vec<Change>,
        reply: Reply<Vec<Reverted>>,
    },
    Rekey {
        node_id: String,
        reply: Reply<()>,
    },
    Lineage {
        token: String,
        reply: Reply<()>,
    },
    Settle {
        acked: Vec<Ack>,
        rejected: Vec<Rejection>,
        reply: Reply<()>,
    },
    Collect {
        horizon: u64,
        reply: Reply<u64>,
    },
    Forget {
        versions: Vec<(DocKey, Stamp)>,
        reply: Reply<()>,
    },
    FromHead {
        head: u64,
        reply: Reply<()>,
    },
    Subscription {
        text: String,
        reply: Reply<()>,
    },
    Free {
        collection: String,
        reply: Reply<u64>,
    },
    /// Declares (or, with `create` false, drops) an index of `collection`
    /// on field `paths` (checked JSON paths); answers every indexed path's column.
    Index {
        collection: String,
        paths: Vec<String>,
        create: bool,
        reply: Reply<crate::IndexedState>,
    },
    Discard {
        seqs: Vec<u64>,
        reply: Reply<u64>,
    },
    Retry {
        seq: u64,
        reply: Reply<Option<Stamp>>,
    },
    MaxPages {
        pages: u64,
        reply: Reply<u64>,
    },
    Settings {
        reply: Reply<ConnectionSettings>,
    },
    Close {
        reply: Reply<()>,
    },
}

/// The write side of a store: a queue of commands and the state that only
/// the current drainer touches.
///
/// There is no long-lived writer task. A caller queues its command; if no
/// one is draining the queue it becomes the drainer. A drainer whose batch
/// is only its own write runs it inline, saving a hop between threads;
/// otherwise (other callers' commands, or anything but a write) the batch
/// runs in a spawned task, so dropping one caller's future never abandons
/// another's command or a transaction halfway. The drainer keeps draining
/// until the queue is empty, so commands that queue up while it is busy are
/// committed together (group commit).
pub(crate) struct Writer {
    shared: Arc<Core>,
}

struct Core {
    queue: std::sync::Mutex<Vec<(u64, Command)>>,
    draining: AtomicBool,
    next: AtomicU64,
    state: Mutex<State>,
}

pub(crate) struct State {
    pub(crate) conn: Shared,
    pub(crate) clock: LamportClock,
    pub(crate) node_id: String,
    closed: bool,
    on_commit: Option<CommitListener>,
    pub(crate) digest_log_rows_max: i64,
    /// Batches run since the free pages were last looked at.
    batches_since_vacuum: u32,
    /// Ops committed since the write-ahead log was last checkpointed; `None`
    /// without one (in memory). The writer connection never checkpoints
    /// on its own (`wal_autocheckpoint` is off): SQLite would do it inside
    /// whichever commit crossed the line, on that caller's time.
    unchecked: Option<u64>,
}

impl Writer {
    pub(crate) fn new(
        conn: Shared,
        clock: LamportClock,
        node_id: String,
        on_commit: Option<CommitListener>,
        digest_log_rows_max: i64,
        wal: bool,
    ) -> Self {
        let state = State {
            conn,
            clock,
            node_id,
            closed: false,
            on_commit,
            digest_log_rows_max,
            batches_since_vacuum: 0,
            unchecked: wal.then_some(0),
        };
        Self {
            shared: Arc::new(Core {
                queue: std::sync::Mutex::new(Vec::new()),
                draining: AtomicBool::new(false),
                next: AtomicU64::new(0),
                state: Mutex::new(state),
            }),
        }
    }

    /// Queues a command and sees it run; returns its reply.
    pub(crate) async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        let me = self.shared.next.fetch_add(1, Ordering::Relaxed);
        self.shared.push(me, make(reply));
        if !self.shared.draining.swap(true, Ordering::AcqRel) {
            let drainer = Drainer(Some(Arc::clone(&self.shared)));
            let batch = self.shared.take();
            if let [(id, Command::Write { .. })] = batch.as_slice()
                && *id == me
            {
                drainer.run_inline(batch).await;
            } else if !batch.is_empty() {
                tokio::spawn(drain(drainer.hand_on(), batch));
            }
        }
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Runs a command on the calling task if nothing else is queued or
    /// running, so it never waits behind another command (a page of remote
    /// changes being applied, say); gives back `None`, having run nothing,
    /// otherwise. Commands queued meanwhile are handed on as by [`Writer::call`].
    pub(crate) async fn call_if_idle<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Option<Result<T>> {
        if self.shared.draining.swap(true, Ordering::AcqRel) {
            return None;
        }
        let drainer = Drainer(Some(Arc::clone(&self.shared)));
        let (reply, rx) = oneshot::channel();
        let me = self.shared.next.fetch_add(1, Ordering::Relaxed);
        drainer.run_inline(vec![(me, make(reply))]).await;
        Some(rx.await.map_err(|_| Error::Closed).and_then(|reply| reply))
    }
}

impl Core {
    fn push(&self, id: u64, cmd: Command) {
        self.queue.lock().expect("queue lock is never poisoned").push((id, cmd));
    }

    fn take(&self) -> Vec<(u64, Command)> {
        std::mem::take(&mut *self.queue.lock().expect("queue lock is never poisoned"))
    }

    /// Gives up draining; returns the batch to run if commands arrived and
    /// this caller is still (or again) the drainer.
    fn release(&self) -> Option<Vec<(u64, Command)>> {
        loop {
            let batch = self.take();
            if !batch.is_empty() {
                return Some(batch);
            }
            self.draining.store(false, Ordering::Release);
            // A command queued between the take and the store saw
            // `draining` set and is waiting on us: take it back if no one
            // else has.
            let queued = !self.queue.lock().expect("queue lock is never poisoned").is_empty();
            if !queued || self.draining.swap(true, Ordering::AcqRel) {
                return None;
            }
        }
    }
}

/// The drainer's duty, handed on when it ends: whoever drops it (normally
/// or by cancellation) spawns a task for anything still queued.
struct Drainer(Option<Arc<Core>>);

impl Drainer {
    /// Runs a batch on the calling task. Upkeep that falls due (a
    /// checkpoint) is not done here but in a task of its own, which keeps
    /// the drainer's duty meanwhile: a caller waits for its own commands only.
    async fn run_inline(self, batch: Vec<(u64, Command)>) {
        let core = self.0.as_ref().expect("a drainer holds its queue until it ends");
        let due = {
            let mut state = core.state.lock().await;
            state.run(batch).await;
            state.upkeep_due()
        };
        if due {
            tokio::spawn(drain(self.hand_on(), Vec::new()));
        }
    }

    /// The queue, for a task that goes on draining it.
    fn hand_on(mut self) -> Arc<Core> {
        self.0.take().expect("a drainer holds its queue until it ends")
    }
}

impl Drop for Drainer {
    fn drop(&mut self) {
        if let Some(core) = self.0.take()
            && let Some(batch) = core.release()
        {
            tokio::spawn(drain(core, batch));
        }
    }
}

async fn drain(shared: Arc<Core>, mut batch: Vec<(u64, Command)>) {
    let mut state = shared.state.lock().await;
    loop {
        state.run(batch).await;
        state.upkeep().await;
        // Let the callers just answered queue their next commands, so the
        // next group is large rather than one command long.
        tokio::task::yield_now().await;
        match shared.release() {
            Some(next) => batch = next,
            None => return,
        }
    }
}

/// Ops committed between two checkpoints of the write-ahead log: about
/// 1,000 pages (SQLite's own default, 4 MiB) at the eight or so pages a
/// local write dirties. A page of remote changes counts each change; a
/// command that may touch every row (collecting tombstones, freeing a
/// collection, building an index, re-keying) counts as this many alone.
pub const CHECKPOINT_OPS: u64 = 128;

/// Batches of commands between two looks at the store's free pages.
pub const VACUUM_CHECK_BATCHES: u32 = 64;
/// Free pages (4 KiB each) past which the store gives space back: 4 MiB.
pub const VACUUM_FREE_PAGES_MIN: i64 = 1_024;
/// Most pages one step of `incremental_vacuum` gives back: 2 MiB.
pub const VACUUM_PAGES_PER_STEP: i64 = 512;

/// Makes a store file created before incremental vacuum (by an earlier
/// build, or by the original Python tide) use it: one `VACUUM`, the first
/// time it is opened.
pub(crate) async fn incremental_vacuum_on(conn: &mut sqlx::SqliteConnection) -> Result<()> {
    let mode: i64 = sqlx::query_scalar("PRAGMA auto_vacuum").fetch_one(&mut *conn).await.map_err(db)?;
    if mode != 2 {
        sqlx::raw_sql("PRAGMA auto_vacuum = INCREMENTAL; VACUUM").execute(&mut *conn).await.map_err(db)?;
    }
    Ok(())
}

impl State {
    /// Whether upkeep is due: a checkpoint of the write-ahead log.
    fn upkeep_due(&self) -> bool {
        !self.closed && self.unchecked.is_some_and(|ops| ops >= CHECKPOINT_OPS)
    }

    /// Upkeep between batches, never inside a caller's own command: the
    /// checkpoint once due, free pages given back now and then.
    async fn upkeep(&mut self) {
        if self.upkeep_due() {
            self.unchecked = Some(0);
            // Nothing else writes meanwhile, so every frame no reader's
            // snapshot still needs is copied back, and the next write starts
            // the log from its beginning again. A failure waits for the next.
            if let Ok(mut held) = conn::lock(&self.conn).await {
                let _ = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&mut *held).await;
            }
        }
        self.vacuum_now_and_then().await;
    }

    /// Every [`VACUUM_CHECK_BATCHES`] batches, gives up to
    /// [`VACUUM_PAGES_PER_STEP`] free pages back to the file system when
    /// more than [`VACUUM_FREE_PAGES_MIN`] are free: a short step between
    /// batches. A failure only waits for the next check.
    async fn vacuum_now_and_then(&mut self) {
        self.batches_since_vacuum += 1;
        if self.closed || self.batches_since_vacuum < VACUUM_CHECK_BATCHES {
            return;
        }
        self.batches_since_vacuum = 0;
        let Ok(mut held) = conn::lock(&self.conn).await else { return };
        let free: std::result::Result<i64, _> = sqlx::query_scalar("PRAGMA freelist_count").fetch_one(&mut *held).await;
        if free.is_ok_and(|free| free > VACUUM_FREE_PAGES_MIN) {
            let step = format!("PRAGMA incremental_vacuum({VACUUM_PAGES_PER_STEP})");
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(step)).execute(&mut *held).await;
        }
    }

    /// Runs a batch in order, committing runs of consecutive writes together.
    async fn run(&mut self, batch: Vec<(u64, Command)>) {
        if let Some(unchecked) = &mut self.unchecked {
            *unchecked += batch.iter().map(|(_, cmd)| cmd.ops()).sum::<u64>();
        }
        let mut group = Vec::new();
        let mut ops = 0;
        for (_, cmd) in batch {
            if let Command::Write { writes, reply } = cmd {
                ops += writes.len();
                group.push((writes, reply));
                if ops >= GROUP_OPS_MAX {
                    self.write_group(std::mem::take(&mut group)).await;
                    ops = 0;
                }
                continue;
            }
            if !group.is_empty() {
                self.write_group(std::mem::take(&mut group)).await;
                ops = 0;
            }
            self.run_one(cmd).await;
        }
        if !group.is_empty() {
            self.write_group(group).await;
        }
    }

    async fn run_one(&mut self, cmd: Command) {
        if self.closed {
            return refuse(cmd);
        }
        match cmd {
            Command::Write { .. } => unreachable!("writes are grouped"),
            Command::Apply { changes, save, reply } => {
                let _ = reply.send(self.apply(changes, Some(save)).await);
            }
            Command::Fetched { changes, reply } => {
                let _ = reply.send(self.apply(changes, None).await);
            }
            Command::Revert { targets, server, reply } => {
                let _ = reply.send(self.revert(targets, server).await);
            }
            Command::Rekey { node_id, reply } => {
                let _ = reply.send(self.rekey(node_id).await);
            }
            Command::Lineage { token, reply } => {
                let _ = reply.send(self.set_meta("lineage", &token).await);
            }
            Command::Settle { acked, rejected, reply } => {
                let _ = reply.send(self.settle(&acked, &rejected).await);
            }
            Command::Collect { horizon, reply } => {
                let _ = reply.send(self.collect(horizon).await);
            }
            Command::Forget { versions, reply } => {
                let _ = reply.send(self.forget(&versions).await);
            }
            Command::FromHead { head, reply } => {
                let _ = reply.send(self.set_meta("from_head", &head.to_string()).await);
            }
            Command::Subscription { text, reply } => {
                let _ = reply.send(self.set_meta("subscription", &text).await);
            }
            Command::Free { collection, reply } => {
                let _ = reply.send(self.free(&collection).await);
            }
            Command::Index { collection, paths, create, reply } => {
                let _ = reply.send(self.index(&collection, &paths, create).await);
            }
            Command::Discard { seqs, reply } => {
                let _ = reply.send(self.discard(&seqs).await);
            }
            Command::Retry { seq, reply } => {
                let _ = reply.send(self.retry(seq).await);
            }
            Command::MaxPages { pages, reply } => {
                let _ = reply.send(self.max_pages(pages).await);
            }
            Command::Settings { reply } => {
                let result = match conn::lock(&self.conn).await {
                    Ok(mut held) => read_settings(&mut held).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
            Command::Close { reply } => {
                self.closed = true;
                conn::close(&self.conn).await;
                let _ = reply.send(Ok(()));
            }
        }
    }

    async fn write_group(&mut self, group: Vec<(Vec<Write>, Reply<Vec<Stamp>>)>) {
        #[derive(Serialize)]
        struct Row<'a>(&'a str, &'a str, &'static str, Option<&'a str>, u64, u16, i64);

        if self.closed {
            for (_, reply) in group {
                let _ = reply.send(Err(Error::Closed));
            }
            return;
        }
        let mut rows = Vec::new();
        let mut committing = Vec::new();
        for (writes, reply) in group {
            let mut stamps = Vec::with_capacity(writes.len());
            let mut clock = self.clock;
            let ticked: Result<()> = writes.iter().try_for_each(|_| {
                stamps.push(Stamp::new(clock.tick()?, self.node_id.clone()));
                Ok(())
            });
            if let Err(e) = ticked {
                let _ = reply.send(Err(e));
                continue;
            }
            self.clock = clock;
            committing.push((writes, stamps, reply));
        }
        for (writes, stamps, _) in &committing {
            for (w, stamp) in writes.iter().zip(stamps) {
                let (kind, doc) = match &w.payload {
                    Payload::Put(doc) => ("put", Some(doc.as_str())),
                    Payload::Delete => ("delete", None),
                };
                let (bucket, vhash) = digest_columns(&w.collection, &w.id, stamp, doc);
                rows.push(Row(&w.collection, &w.id, kind, doc, stamp.lamport, bucket, vhash));
            }
        }
        if rows.is_empty() {
            return;
        }
        let rows = serde_json::to_string(&rows).expect("plain rows serialize");
        let result = match conn::lock(&self.conn).await {
            Ok(mut held) => self.insert_group(&mut held, rows).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                self.tell(|| {
                    committing
                        .iter()
                        .flat_map(|(writes, stamps, _)| writes.iter().zip(stamps))
                        .map(|(w, stamp)| Committed {
                            collection: w.collection.clone(),
                            id: w.id.clone(),
                            doc: w.payload.doc().cloned(),
                            stamp: stamp.clone(),
                            origin: Origin::Local,
                        })
                        .collect()
                });
                for (_, stamps, reply) in committing {
                    let _ = reply.send(Ok(stamps));
                }
            }
            Err(e) => {
                for (_, _, reply) in committing {
                    let _ = reply.send(Err(e.replicate()));
                }
            }
        }
    }

    async fn insert_group(&self, conn: &mut sqlx::SqliteConnection, rows: String) -> Result<()> {
        sqlx::query(
            "INSERT INTO tide_outbox (collection, id, kind, doc, lamport, node_id, bucket, vhash) \
             SELECT value->>0, value->>1, value->>2, value->>3, value->>4, ?2, value->>5, value->>6 FROM jsonb_each(?1)",
        )
        .bind(rows)
        .bind(&self.node_id)
        .execute(conn)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Applies a page of remote changes and the `tide_meta` value it moves
    /// (its cursor) in one transaction; returns the changes that altered
    /// local state, in page order.
    async fn apply(&mut self, changes: Vec<Change>, save: Option<(&'static str, String)>) -> Result<Vec<Change>> {
        let lamport_max = changes.iter().map(|c| c.stamp.lamport).max().unwrap_or(0);
        if lamport_max > LAMPORT_MAX {
            return Err(tide_core::Error::LamportOutOfRange { lamport: lamport_max }.into());
        }
        let mut conn = conn::lock(&self.conn).await?;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(db)?;

        // The stored stamps of the page's keys, as one row.
        let keys: Vec<(&str, &str)> = changes.iter().map(|c| (c.collection.as_str(), c.id.as_str())).collect();
        let stored: String = sqlx::query_scalar(
            "SELECT json_group_array(json_array(j.key, d.lamport, d.node_id, iif(d.deleted, 0, d.vhash), d.vhash)) \
             FROM json_each(?1) AS j CROSS JOIN tide_docs AS d ON d.collection = j.value->>0 AND d.id = j.value->>1",
        )
        .bind(serde_json::to_string(&keys).expect("keys serialize"))
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        let stored: Vec<(usize, u64, String, i64, i64)> =
            serde_json::from_str(&stored).map_err(|e| Error::Corrupt { detail: format!("stored stamps: {e}") })?;
        // The live hash each key contributes before the page.
        let old_hash: HashMap<(&str, &str), i64> = stored.iter().map(|&(i, _, _, h, _)| (keys[i], h)).collect();
        let current: HashMap<(&str, &str), (Stamp, i64)> =
            stored.into_iter().map(|(i, lamport, node, _, h)| (keys[i], (Stamp::new(lamport, node), h))).collect();

        // The same rule as everywhere: tide_core decides, in page order.
        let (mut applied, mut last_winner, collided) = winners(&keys, &changes, current.clone(), &[]);
        if !collided.is_empty() {
            // A collided version that is our own pending write stays: the
            // write will be stamped anew when the server refuses it.
            let pending = pending_among(&mut tx, &collided).await?;
            if !pending.is_empty() {
                (applied, last_winner, _) = winners(&keys, &changes, current, &pending);
            }
        }
        if !last_winner.is_empty() {
            #[derive(Serialize)]
            struct Row<'a>(&'a str, &'a str, Option<&'a str>, u64, &'a str, u8, u16, i64, u64);
            let mut winners: Vec<usize> = last_winner.into_values().collect();
            winners.sort_unstable();
            let rows: Vec<Row> = winners
                .iter()
                .map(|&i| {
                    let c = &changes[i];
                    let doc = c.payload.doc().map(tide_core::Doc::as_str);
                    let deleted = u8::from(doc.is_none());
                    let (bucket, vhash) = digest_columns(&c.collection, &c.id, &c.stamp, doc);
                    Row(&c.collection, &c.id, doc, c.stamp.lamport, &c.stamp.node_id, deleted, bucket, vhash, c.seq)
                })
                .collect();
            let deltas = rows.iter().map(|r| {
                let new = if r.5 == 0 { r.7 } else { 0 };
                (r.0, r.6, old_hash.get(&(r.0, r.1)).copied().unwrap_or(0) ^ new)
            });
            add_to_digests(&mut tx, deltas, self.digest_log_rows_max).await?;
            sqlx::query(
                "INSERT INTO tide_docs (collection, id, doc, lamport, node_id, deleted, bucket, vhash, seq) \
                 SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, value->>7, \
                 value->>8 FROM jsonb_each(?1) WHERE true \
                 ON CONFLICT (collection, id) DO UPDATE SET doc = excluded.doc, lamport = excluded.lamport, \
                 node_id = excluded.node_id, deleted = excluded.deleted, vhash = excluded.vhash, \
                 seq = excluded.seq, base = NULL \
                 WHERE (excluded.lamport, excluded.node_id) > (tide_docs.lamport, tide_docs.node_id) \
                 OR ((excluded.lamport, excluded.node_id) = (tide_docs.lamport, tide_docs.node_id) \
                     AND excluded.vhash <> tide_docs.vhash)",
            )
            .bind(serde_json::to_string(&rows).expect("rows serialize"))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        if let Some((key, value)) = save {
            save_meta(&mut tx, key, value).await?;
        }
        sqlx::query("UPDATE tide_clock SET lamport = max(lamport, ?1) WHERE id = 1")
            .bind(i64::try_from(lamport_max).expect("bounded by LAMPORT_MAX"))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        self.clock.observe(lamport_max)?;

        let mut keep = applied.into_iter().peekable();
        let applied: Vec<Change> =
            changes.into_iter().enumerate().filter_map(|(i, c)| keep.next_if_eq(&i).map(|_| c)).collect();
        self.tell(|| {
            applied
                .iter()
                .map(|c| Committed {
                    collection: c.collection.clone(),
                    id: c.id.clone(),
                    doc: c.payload.doc().cloned(),
                    stamp: c.stamp.clone(),
                    origin: Origin::Remote,
                })
                .collect()
        });
        Ok(applied)
    }

    /// Tells the commit listener, if any, what a transaction just committed.
    fn tell(&self, changes: impl FnOnce() -> Vec<Committed>) {
        if let Some(listener) = &self.on_commit {
            let changes = changes();
            if !changes.is_empty() {
                listener(changes);
            }
        }
    }

    /// Re-stamps every pending op (and its document, where it is the stored
    /// version) under a new node id, in one transaction.
    async fn rekey(&mut self, node_id: String) -> Result<()> {
        let mut conn = conn::lock(&self.conn).await?;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(db)?;
        let pending: Vec<(i64, String, String, i64, String)> =
            sqlx::query_as("SELECT seq, collection, id, lamport, node_id FROM tide_outbox ORDER BY seq")
                .fetch_all(&mut *tx)
                .await
                .map_err(db)?;
        let mut clock = self.clock;
        let mut restamped = Vec::new();
        for (seq, collection, id, lamport, old_node) in &pending {
            let old = Stamp::new(u64::try_from(*lamport).unwrap_or(0), old_node.clone());
            restamped.extend(restamp(&mut tx, *seq, (collection, id), &old, (&mut clock, &node_id)).await?);
        }
        sqlx::query(
            "INSERT OR IGNORE INTO tide_meta (key, value) SELECT 'node_id_origin', value FROM tide_meta \
             WHERE key = 'node_id'",
        )
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        sqlx::query("UPDATE tide_meta SET value = ?1 WHERE key = 'node_id'")
            .bind(&node_id)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        sqlx::query("DELETE FROM tide_meta WHERE key = 'lineage'").execute(&mut *tx).await.map_err(db)?;
        sqlx::query("UPDATE tide_clock SET lamport = max(lamport, ?1) WHERE id = 1")
            .bind(i64::try_from(clock.value()).expect("bounded by LAMPORT_MAX"))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        self.clock = clock;
        self.node_id = node_id;
        // Watchers see the documents' new versions (same content, new stamps).
        self.tell(|| restamped);
        Ok(())
    }

    /// Puts refused documents back to the server's versions, in one transaction.
    async fn revert(&mut self, targets: Vec<Refused>, server: Vec<Change>) -> Result<Vec<Reverted>> {
        let lamport_max = server.iter().map(|c| c.stamp.lamport).max().unwrap_or(0);
        if lamport_max > LAMPORT_MAX {
            return Err(tide_core::Error::LamportOutOfRange { lamport: lamport_max }.into());
        }
        let mut conn = conn::lock(&self.conn).await?;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(db)?;
        let mut reverted = Vec::new();
        for Refused { key: DocKey(collection, id), stamp: refused, hash, before } in &targets {
            let stored: Option<(i64, String, i64)> =
                sqlx::query_as("SELECT lamport, node_id, vhash FROM tide_docs WHERE collection = ?1 AND id = ?2")
                    .bind(collection)
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db)?;
            // Only the refused version goes back: a later local write, or a
            // newer version from elsewhere, stays.
            // (the same stamp and payload: a collision may have given the
            // document the server's payload under this stamp)
            let Some((lamport, node_id, stored_hash)) = &stored else { continue };
            if u64::try_from(*lamport).ok() != Some(refused.lamport)
                || node_id != &refused.node_id
                || hash.is_some_and(|h| h.to_i64() != *stored_hash)
            {
                continue;
            }
            let theirs = server
                .iter()
                .find(|c| &c.collection == collection && &c.id == id)
                .map(|c| crate::Version { stamp: c.stamp.clone(), payload: c.payload.clone() });
            if theirs.as_ref().is_some_and(|v| &v.stamp == refused) {
                continue;
            }
            // The last version the server took before the refused write: the
            // one it replaced, or, while that was refused too, the one that
            // one replaced. It comes back if the server lost it (a restore).
            let mut last_taken = before.clone();
            for _ in 0..REVERT_CHAIN_MAX {
                let Some(b) = &last_taken else { break };
                match refused_before(&mut tx, collection, id, &b.stamp).await? {
                    Some(earlier) => last_taken = earlier,
                    None => break,
                }
            }
            let mut back = theirs;
            if let Some(b) = last_taken
                && back.as_ref().is_none_or(|v| b.stamp > v.stamp)
            {
                back = Some(b);
            }
            put_version(&mut tx, collection, id, back.as_ref()).await?;
            reverted.push(Reverted {
                collection: collection.clone(),
                id: id.clone(),
                version: back,
                previous: refused.clone(),
            });
        }
        let keys: Vec<(&str, &str, u64, &str)> = targets
            .iter()
            .map(|t| (t.key.0.as_str(), t.key.1.as_str(), t.stamp.lamport, t.stamp.node_id.as_str()))
            .collect();
        sqlx::query(
            "UPDATE tide_rejected SET reverted = 1 FROM json_each(?1) AS j \
             WHERE tide_rejected.collection = j.value->>0 AND tide_rejected.id = j.value->>1 \
             AND tide_rejected.lamport = j.value->>2 AND tide_rejected.node_id = j.value->>3",
        )
        .bind(serde_json::to_string(&keys).expect("keys serialize"))
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        sqlx::query("UPDATE tide_clock SET lamport = max(lamport, ?1) WHERE id = 1")
            .bind(i64::try_from(lamport_max).expect("bounded by LAMPORT_MAX"))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        self.clock.observe(lamport_max)?;
        self.tell(|| {
            reverted
                .iter()
                .map(|r| Committed {
                    collection: r.collection.clone(),
                    id: r.id.clone(),
                    doc: r.version.as_ref().and_then(|v| v.payload.doc().cloned()),
                    stamp: r.version.as_ref().map_or_else(|| r.previous.clone(), |v| v.stamp.clone()),
                    origin: Origin::Reverted,
                })
                .collect()
        });
        Ok(reverted)
    }

    /// Removes acknowledged ops and moves rejected ones aside, in one
    /// transaction. A version the server stored learns its seq; one it
    /// dropped as deleted is removed.
    async fn settle(&mut self, acked: &[Ack], rejected: &[Rejection]) -> Result<()> {
        let mut conn = conn::lock(&self.conn).await?;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(db)?;
        let stored: Vec<(u64, u64)> = acked
            .iter()
            .filter_map(|a| match a.acked {
                Acked::Applied(seq) => Some((a.seq, seq)),
                Acked::Kept => Some((a.seq, 0)),
                Acked::Deleted => None,
            })
            .collect();
        if !stored.is_empty() {
            // Still the op's version: now the server's, at that seq (0:
            // the server held it under a seq it did not say). Only where a
            // later decision needs it: a tombstone (collected by its seq)
            // and a version with no base of its own (a new document); an
            // edit keeps the base it was edited from, which decides the
            // same (PROTOCOL.md §14) and spares a row write per op.
            // Materialized first: in an UPDATE … FROM, SQLite would scan
            // the whole table for the rows to update.
            sqlx::query(
                "WITH x AS MATERIALIZED (SELECT d.rowid AS rid, \
                   iif(j.value->>1 = 0, coalesce(d.seq, 0), j.value->>1) AS seq \
                   FROM json_each(?1) AS j CROSS JOIN tide_outbox AS o ON o.seq = j.value->>0 \
                   CROSS JOIN tide_docs AS d ON d.collection = o.collection AND d.id = o.id \
                   AND d.lamport = o.lamport AND d.node_id = o.node_id \
                   WHERE o.kind = 'delete' OR o.base IS NULL) \
                 UPDATE tide_docs SET seq = x.seq, base = NULL FROM x WHERE tide_docs.rowid = x.rid",
            )
            .bind(serde_json::to_string(&stored).expect("acks serialize"))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        let deleted: Vec<u64> = acked.iter().filter(|a| a.acked == Acked::Deleted).map(|a| a.seq).collect();
        let removed = if deleted.is_empty() {
            Vec::new()
        } else {
            let text: String = sqlx::query_scalar(
                "SELECT json_group_array(json_array(json_array(o.collection, o.id), json_array(o.lamport, o.node_id))) \
                 FROM json_each(?1) AS j CROSS JOIN tide_outbox AS o ON o.seq = j.value",
            )
            .bind(serde_json::to_string(&deleted).expect("seqs serialize"))
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
            let versions: Vec<(DocKey, (u64, String))> =
                serde_json::from_str(&text).map_err(|e| Error::Corrupt { detail: format!("outbox stamps: {e}") })?;
            let versions: Vec<(DocKey, Stamp)> =
                versions.into_iter().map(|(k, (l, n))| (k, Stamp::new(l, n))).collect();
            forget_versions(&mut tx, &versions).await?
        };
        if !rejected.is_empty() {
            let rows: Vec<(u64, &str, &str)> =
                rejected.iter().map(|r| (r.seq, r.code.as_str(), r.message.as_str())).collect();
            sqlx::query(
                "INSERT OR REPLACE INTO tide_rejected (seq, collection, id, kind, doc, lamport, node_id, code, message, \
                 prev_doc, prev_lamport, prev_node_id, prev_deleted, vhash) \
                 SELECT o.seq, o.collection, o.id, o.kind, o.doc, o.lamport, o.node_id, r.value->>1, r.value->>2, \
                 o.prev_doc, o.prev_lamport, o.prev_node_id, o.prev_deleted, o.vhash \
                 FROM json_each(?1) AS r CROSS JOIN tide_outbox AS o ON o.seq = r.value->>0",
            )
            .bind(serde_json::to_string(&rows).expect("rows serialize"))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        let seqs: Vec<u64> = acked.iter().map(|a| a.seq).chain(rejected.iter().map(|r| r.seq)).collect();
        sqlx::query("DELETE FROM tide_outbox WHERE seq IN (SELECT value FROM json_each(?1))")
            .bind(serde_json::to_string(&seqs).expect("seqs serialize"))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        self.tell(|| removed);
        Ok(())
    }

    /// Declares an index on `paths` of `collection` (each path a virtual
    /// generated column, made once; the index over the live documents'
    /// `(collection, columns…, id)`), or drops the declaration and, when no
    /// other collection's declaration uses it, the index. The generated
    /// columns' definitions are the only SQL built from the app's text:
    /// checked paths as quoted literals. Returns every indexed path's column.
    async fn index(&mut self, collection: &str, paths: &[String], create: bool) -> Result<crate::IndexedState> {
        let mut conn = conn::lock(&self.conn).await?;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(db)?;
        let key = serde_json::to_string(paths).expect("paths serialize");
        if create {
            let mut columns = Vec::with_capacity(paths.len());
            for path in paths {
                let known: Option<String> = sqlx::query_scalar("SELECT col FROM tide_fields WHERE path = ?1")
                    .bind(path)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db)?;
                let column = if let Some(column) = known {
                    column
                } else {
                    let n: i64 = sqlx::query_scalar("SELECT count(*) + 1 FROM tide_fields")
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(db)?;
                    let column = format!("tide_f{n}");
                    let literal = format!("'{}'", path.replace('\'', "''"));
                    let ddl = format!(
                        "ALTER TABLE tide_docs ADD COLUMN {column} GENERATED ALWAYS AS (json_extract(doc, {literal})) VIRTUAL"
                    );
                    sqlx::query(sqlx::AssertSqlSafe(ddl)).execute(&mut *tx).await.map_err(db)?;
                    sqlx::query("INSERT INTO tide_fields (path, col) VALUES (?1, ?2)")
                        .bind(path)
                        .bind(&column)
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                    column
                };
                columns.push(column);
            }
            let name = format!("tide_ix_{}", columns.join("_"));
            let ddl = format!(
                "CREATE INDEX IF NOT EXISTS {name} ON tide_docs (collection, {}, id) WHERE deleted = 0",
                columns.join(", ")
            );
            sqlx::query(sqlx::AssertSqlSafe(ddl)).execute(&mut *tx).await.map_err(db)?;
            sqlx::query("INSERT OR IGNORE INTO tide_indexes (collection, paths, name) VALUES (?1, ?2, ?3)")
                .bind(collection)
                .bind(&key)
                .bind(&name)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        } else {
            let name: Option<String> =
                sqlx::query_scalar("DELETE FROM tide_indexes WHERE collection = ?1 AND paths = ?2 RETURNING name")
                    .bind(collection)
                    .bind(&key)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db)?;
            if let Some(name) = name {
                let used: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tide_indexes WHERE name = ?1)")
                    .bind(&name)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db)?;
                // `name` is the store's own (tide_ix_ and column numbers).
                if !used && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    sqlx::query(sqlx::AssertSqlSafe(format!("DROP INDEX IF EXISTS {name}")))
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                }
            }
        }
        let indexed = crate::IndexedState::read(&mut tx).await?;
        tx.commit().await.map_err(db)?;
        Ok(indexed)
    }

    /// Sets one `tide_meta` value.
    async fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        let mut held = conn::lock(&self.conn).await?;
        sqlx::query(
            "INSERT INTO tide_meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&mut *held)
        .await
        .map(|_| ())
        .map_err(db)
    }

    /// Removes versions the server dropped as deleted, in one transaction.
    async fn forget(&mut self, versions: &[(DocKey, Stamp)]) -> Result<()> {
        let mut conn = conn::lock(&self.conn).await?;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(db)?;
        let removed = forget_versions(&mut tx, versions).await?;
        tx.commit().await.map_err(db)?;
        self.tell(|| removed);
        Ok(())
    }

    /// Removes a collection's documents and tombstones, without ops, except
    /// those a pending op still writes; returns how many went. Watchers are
    /// not told: the application asked for it.
    async fn free(&mut self, collection: &str) -> Result<u64> {
        let mut conn = conn::lock(&self.conn).await?;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(db)?;
        let text: String = sqlx::query_scalar(
            "SELECT json_group_array(json_array(id, lamport, node_id)) FROM tide_docs \
             WHERE collection = ?1 AND id NOT IN (SELECT id FROM tide_outbox WHERE collection = ?1)",
        )
        .bind(collection)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        let held: Vec<(String, u64, String)> =
            serde_json::from_str(&text).map_err(|e| Error::Corrupt { detail: format!("freed versions: {e}") })?;
        let versions: Vec<(DocKey, Stamp)> = held
            .into_iter()
            .map(|(id, lamport, node_id)| (DocKey(collection.to_owned(), id), Stamp::new(lamport, node_id)))
            .collect();
        let freed = forget_versions(&mut tx, &versions).await?.len();
        tx.commit().await.map_err(db)?;
        Ok(freed as u64)
    }

    /// Removes the tombstones the server's horizon has passed (it removed
    /// them too) unless a pending op still refers to their key; returns how
    /// many went.
    ///
    /// The digest log is folded with it: its rows are history too.
    async fn collect(&mut self, horizon: u64) -> Result<u64> {
        let mut conn = conn::lock(&self.conn).await?;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(db)?;
        let done = sqlx::query(
            "DELETE FROM tide_docs WHERE deleted = 1 AND seq <= ?1 \
             AND (collection, id) NOT IN (SELECT collection, id FROM tide_outbox)",
        )
        .bind(i64::try_from(horizon).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        if done.rows_affected() > 0 {
            fold_digest_log(&mut tx).await?;
        }
        tx.commit().await.map_err(db)?;
        if done.rows_affected() > 0 {
            // Look at the free pages after this batch, not 64 batches on.
            self.batches_since_vacuum = VACUUM_CHECK_BATCHES - 1;
        }
        Ok(done.rows_affected())
    }

    /// Writes a rejected op again with a fresh stamp and forgets the
    /// rejection, in one transaction.
    async fn retry(&mut self, seq: u64) -> Result<Option<Stamp>> {
        let mut conn = conn::lock(&self.conn).await?;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(db)?;
        let row: Option<(String, String, String, Option<String>)> =
            sqlx::query_as("SELECT collection, id, kind, doc FROM tide_rejected WHERE seq = ?1")
                .bind(to_i64(seq))
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?;
        let Some((collection, id, kind, doc)) = row else { return Ok(None) };
        let mut clock = self.clock;
        let stamp = Stamp::new(clock.tick()?, self.node_id.clone());
        let doc = doc.filter(|_| kind != "delete");
        let (bucket, vhash) = digest_columns(&collection, &id, &stamp, doc.as_deref());
        sqlx::query(
            "INSERT INTO tide_outbox (collection, id, kind, doc, lamport, node_id, bucket, vhash) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .bind(&collection)
        .bind(&id)
        .bind(if doc.is_some() { "put" } else { "delete" })
        .bind(&doc)
        .bind(to_i64(stamp.lamport))
        .bind(&self.node_id)
        .bind(bucket)
        .bind(vhash)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        sqlx::query("DELETE FROM tide_rejected WHERE seq = ?1")
            .bind(to_i64(seq))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        self.clock = clock;
        let parsed = doc
            .map(|d| serde_json::from_str(&d).map_err(|e| Error::Corrupt { detail: format!("document: {e}") }))
            .transpose()?;
        let committed = Committed { collection, id, doc: parsed, stamp: stamp.clone(), origin: Origin::Local };
        self.tell(|| vec![committed]);
        Ok(Some(stamp))
    }

    async fn discard(&mut self, seqs: &[u64]) -> Result<u64> {
        let done = sqlx::query("DELETE FROM tide_rejected WHERE seq IN (SELECT value FROM json_each(?1))")
            .bind(serde_json::to_string(seqs).expect("seqs serialize"))
            .execute(&mut *conn::lock(&self.conn).await?)
            .await
            .map_err(db)?;
        Ok(done.rows_affected())
    }

    async fn max_pages(&mut self, pages: u64) -> Result<u64> {
        let sql = format!("PRAGMA max_page_count = {pages}");
        let now: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&mut *conn::lock(&self.conn).await?)
            .await
            .map_err(db)?;
        Ok(u64::try_from(now).unwrap_or(0))
    }
}

/// Stamps the pending op `seq` anew (`old` to `new`), and its document where
/// that op's version is the stored one; remembers the new stamp of the write
/// (see [`crate::Store::current_stamp`]). Returns the document's new version.
async fn restamp(
    conn: &mut sqlx::SqliteConnection,
    seq: i64,
    (collection, id): (&str, &str),
    old: &Stamp,
    (clock, node_id): (&mut LamportClock, &str),
) -> Result<Option<Committed>> {
    let (op_doc, op_hash): (Option<String>, i64) = sqlx::query_as("SELECT doc, vhash FROM tide_outbox WHERE seq = ?1")
        .bind(seq)
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
    let old_lamport = to_i64(old.lamport);
    // The document, where it is still this op's version (same stamp and payload).
    let stored: Option<(Option<String>, bool, i64)> = sqlx::query_as(
        "SELECT doc, deleted, vhash FROM tide_docs \
         WHERE collection = ?1 AND id = ?2 AND lamport = ?3 AND node_id = ?4 AND vhash = ?5",
    )
    .bind(collection)
    .bind(id)
    .bind(old_lamport)
    .bind(&old.node_id)
    .bind(op_hash)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db)?;
    let Some((doc, deleted, old_hash)) = stored else {
        // A newer version of the document overtook this op: it could only
        // lose, and under the old node id it can no longer be sent.
        sqlx::query("DELETE FROM tide_outbox WHERE seq = ?1").bind(seq).execute(&mut *conn).await.map_err(db)?;
        return Ok(None);
    };
    let new = Stamp::new(clock.tick()?, node_id);
    let (_, vhash) = digest_columns(collection, id, &new, op_doc.as_deref());
    let new_lamport = to_i64(new.lamport);
    sqlx::query("UPDATE tide_outbox SET lamport = ?2, node_id = ?3, vhash = ?4 WHERE seq = ?1")
        .bind(seq)
        .bind(new_lamport)
        .bind(&new.node_id)
        .bind(vhash)
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    // A write re-stamped before keeps pointing at its latest stamp, and
    // this one is remembered under its old stamp.
    for sql in [
        "UPDATE tide_restamped SET new_lamport = ?3, new_node_id = ?4 WHERE new_lamport = ?1 AND new_node_id = ?2",
        "INSERT OR REPLACE INTO tide_restamped (lamport, node_id, new_lamport, new_node_id) VALUES (?1, ?2, ?3, ?4)",
    ] {
        sqlx::query(sql)
            .bind(old_lamport)
            .bind(&old.node_id)
            .bind(new_lamport)
            .bind(&new.node_id)
            .execute(&mut *conn)
            .await
            .map_err(db)?;
    }
    if !deleted {
        let delta = [(collection, tide_core::digest::bucket(collection, id), old_hash ^ vhash)];
        add_to_digests(&mut *conn, delta, DIGEST_LOG_ROWS_MAX).await?;
    }
    sqlx::query(
        "UPDATE tide_docs SET lamport = ?5, node_id = ?6, vhash = ?7 \
         WHERE collection = ?1 AND id = ?2 AND lamport = ?3 AND node_id = ?4 AND vhash = ?8",
    )
    .bind(collection)
    .bind(id)
    .bind(old_lamport)
    .bind(&old.node_id)
    .bind(new_lamport)
    .bind(&new.node_id)
    .bind(vhash)
    .bind(op_hash)
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    let doc = match (deleted, doc) {
        (false, Some(d)) => {
            Some(serde_json::from_str(&d).map_err(|e| Error::Corrupt { detail: format!("document: {e}") })?)
        }
        _ => None,
    };
    Ok(Some(Committed {
        collection: collection.to_owned(),
        id: id.to_owned(),
        doc,
        stamp: new.clone(),
        origin: Origin::Local,
    }))
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).expect("bounded by LAMPORT_MAX")
}

/// Which changes of a page apply (in page order), the last per key, and the
/// stored stamps a collision replaced.
type Winners<'a> = (Vec<usize>, HashMap<(&'a str, &'a str), usize>, Vec<Stamp>);

/// Which changes of a page replace what is stored (`current`: stamp and
/// version hash per key): the greater stamp wins (`tide_core::wins`); one
/// stamp with two payloads (copies of one store) is settled by the
/// server's, which these are, unless the stored one is our own write still
/// in the outbox (`pending`), which will be stamped anew.
fn winners<'a>(
    keys: &[(&'a str, &'a str)],
    changes: &[Change],
    mut current: HashMap<(&'a str, &'a str), (Stamp, i64)>,
    pending: &[Stamp],
) -> Winners<'a> {
    let mut applied = Vec::new();
    let mut last_winner = HashMap::new();
    let mut replaced = Vec::new();
    for (i, change) in changes.iter().enumerate() {
        let stored = current.get(&keys[i]);
        // The deletion of a document never held here: nothing to store.
        if stored.is_none() && change.payload.doc().is_none() {
            continue;
        }
        let hash = tide_core::digest::payload_hash(keys[i].0, keys[i].1, &change.stamp, &change.payload).to_i64();
        let collided = stored.is_some_and(|(s, h)| *s == change.stamp && *h != hash && !pending.contains(s));
        if collided || tide_core::wins(&change.stamp, stored.map(|(s, _)| s)) {
            if collided {
                replaced.push(change.stamp.clone());
            }
            current.insert(keys[i], (change.stamp.clone(), hash));
            last_winner.insert(keys[i], i);
            applied.push(i);
        }
    }
    (applied, last_winner, replaced)
}

/// Removes the versions the server dropped as deleted (each only while it
/// is still its key's version), taking their documents out of the
/// digests; returns what the watchers are told (a removal, with the
/// dropped stamp).
async fn forget_versions(conn: &mut sqlx::SqliteConnection, versions: &[(DocKey, Stamp)]) -> Result<Vec<Committed>> {
    let wanted: Vec<(&str, &str, u64, &str)> =
        versions.iter().map(|(k, s)| (k.0.as_str(), k.1.as_str(), s.lamport, s.node_id.as_str())).collect();
    let text: String = sqlx::query_scalar(
        "SELECT json_group_array(json_array(d.collection, d.id, d.lamport, d.node_id, d.bucket, iif(d.deleted, 0, d.vhash))) \
         FROM json_each(?1) AS j CROSS JOIN tide_docs AS d ON d.collection = j.value->>0 AND d.id = j.value->>1 \
         AND d.lamport = j.value->>2 AND d.node_id = j.value->>3",
    )
    .bind(serde_json::to_string(&wanted).expect("versions serialize"))
    .fetch_one(&mut *conn)
    .await
    .map_err(db)?;
    let gone: Vec<(String, String, u64, String, u16, i64)> =
        serde_json::from_str(&text).map_err(|e| Error::Corrupt { detail: format!("deleted versions: {e}") })?;
    if gone.is_empty() {
        return Ok(Vec::new());
    }
    add_to_digests(&mut *conn, gone.iter().map(|g| (g.0.as_str(), g.4, g.5)), DIGEST_LOG_ROWS_MAX).await?;
    let keys: Vec<(&str, &str)> = gone.iter().map(|g| (g.0.as_str(), g.1.as_str())).collect();
    sqlx::query("DELETE FROM tide_docs WHERE (collection, id) IN (SELECT value->>0, value->>1 FROM json_each(?1))")
        .bind(serde_json::to_string(&keys).expect("keys serialize"))
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    Ok(gone
        .into_iter()
        .map(|(collection, id, lamport, node_id, _, _)| Committed {
            collection,
            id,
            doc: None,
            stamp: Stamp::new(lamport, node_id),
            origin: Origin::Reverted,
        })
        .collect())
}

/// Saves the `tide_meta` value a page moves (its cursor, or a catch-up's
/// state); a main page also records when the store last heard from its
/// server (`synced_at`).
async fn save_meta(conn: &mut sqlx::SqliteConnection, key: &str, value: String) -> Result<()> {
    // A main page also records when the store last heard from its server.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    sqlx::query(
        "INSERT INTO tide_meta (key, value) SELECT ?1, ?2 UNION ALL SELECT 'synced_at', ?3 WHERE ?1 = 'cursor' \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )
    .bind(key)
    .bind(value)
    .bind(now.as_millis().to_string())
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(())
}

/// Which of `stamps` are ops still in the outbox.
async fn pending_among(conn: &mut sqlx::SqliteConnection, stamps: &[Stamp]) -> Result<Vec<Stamp>> {
    let wanted: Vec<(u64, &str)> = stamps.iter().map(|s| (s.lamport, s.node_id.as_str())).collect();
    let found: String = sqlx::query_scalar(
        "SELECT json_group_array(json_array(o.lamport, o.node_id)) FROM json_each(?1) AS j \
         CROSS JOIN tide_outbox AS o ON o.lamport = j.value->>0 AND o.node_id = j.value->>1",
    )
    .bind(serde_json::to_string(&wanted).expect("stamps serialize"))
    .fetch_one(conn)
    .await
    .map_err(db)?;
    let found: Vec<(u64, String)> =
        serde_json::from_str(&found).map_err(|e| Error::Corrupt { detail: format!("pending stamps: {e}") })?;
    Ok(found.into_iter().map(|(l, n)| Stamp::new(l, n)).collect())
}

/// A rejected op's before-image columns: doc, lamport, node id, deleted.
type BeforeImage = (Option<String>, Option<i64>, Option<String>, Option<bool>);

/// Most refused writes to one key a put-back looks through for the last
/// version the server took.
const REVERT_CHAIN_MAX: usize = 64;

/// If the write with `stamp` to the key was refused by the server, the
/// version it replaced (its before-image, `None` for none); `None` if it
/// was not refused.
async fn refused_before(
    conn: &mut sqlx::SqliteConnection,
    collection: &str,
    id: &str,
    stamp: &Stamp,
) -> Result<Option<Option<crate::Version>>> {
    let row: Option<BeforeImage> = sqlx::query_as(
        "SELECT prev_doc, prev_lamport, prev_node_id, prev_deleted FROM tide_rejected \
         WHERE collection = ?1 AND id = ?2 AND lamport = ?3 AND node_id = ?4 LIMIT 1",
    )
    .bind(collection)
    .bind(id)
    .bind(to_i64(stamp.lamport))
    .bind(&stamp.node_id)
    .fetch_optional(conn)
    .await
    .map_err(db)?;
    let Some((doc, lamport, node_id, deleted)) = row else { return Ok(None) };
    let (Some(lamport), Some(node_id)) = (lamport, node_id) else { return Ok(Some(None)) };
    let payload = match (deleted, doc) {
        (Some(false), Some(d)) => Payload::Put(
            tide_core::Doc::from_stored(d).map_err(|e| Error::Corrupt { detail: format!("before-image: {e}") })?,
        ),
        _ => Payload::Delete,
    };
    let stamp = Stamp::new(u64::try_from(lamport).unwrap_or(0), node_id);
    Ok(Some(Some(crate::Version { stamp, payload })))
}

/// Stores `version` under the key whatever is there (`None` removes the key).
async fn put_version(
    conn: &mut sqlx::SqliteConnection,
    collection: &str,
    id: &str,
    version: Option<&crate::Version>,
) -> Result<()> {
    let old: Option<i64> =
        sqlx::query_scalar("SELECT iif(deleted, 0, vhash) FROM tide_docs WHERE collection = ?1 AND id = ?2")
            .bind(collection)
            .bind(id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(db)?;
    let new = version
        .filter(|v| v.payload.doc().is_some())
        .map_or(0, |v| tide_core::digest::payload_hash(collection, id, &v.stamp, &v.payload).to_i64());
    let bucket = tide_core::digest::bucket(collection, id);
    add_to_digests(&mut *conn, [(collection, bucket, old.unwrap_or(0) ^ new)], DIGEST_LOG_ROWS_MAX).await?;
    let Some(v) = version else {
        sqlx::query("DELETE FROM tide_docs WHERE collection = ?1 AND id = ?2")
            .bind(collection)
            .bind(id)
            .execute(conn)
            .await
            .map_err(db)?;
        return Ok(());
    };
    let doc = v.payload.doc().map(|d| serde_json::to_string(d).expect("documents serialize"));
    let (bucket, vhash) = digest_columns(collection, id, &v.stamp, doc.as_deref());
    // A version the server took: its seq is not known here (0), and it was
    // edited from nothing local.
    sqlx::query(
        "INSERT INTO tide_docs (collection, id, doc, lamport, node_id, deleted, bucket, vhash, seq) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0) \
         ON CONFLICT (collection, id) DO UPDATE SET doc = excluded.doc, lamport = excluded.lamport, \
         node_id = excluded.node_id, deleted = excluded.deleted, vhash = excluded.vhash, seq = 0, base = NULL",
    )
    .bind(collection)
    .bind(id)
    .bind(&doc)
    .bind(i64::try_from(v.stamp.lamport).expect("bounded by LAMPORT_MAX"))
    .bind(&v.stamp.node_id)
    .bind(doc.is_none())
    .bind(bucket)
    .bind(vhash)
    .execute(conn)
    .await
    .map_err(db)?;
    Ok(())
}

/// Default for [`crate::OpenOptions::digest_log_rows_max`]: most bucket
/// deltas kept in `tide_digest_log` before they are folded into the group and
/// bucket rows (updating random bucket rows on every page costs more than the page): 262,144.
pub const DIGEST_LOG_ROWS_MAX: i64 = 1 << 18;

/// XORs `(collection, bucket, delta)` into the digests: the roots at once,
/// the buckets (and groups) through the append-only log, which is folded
/// once it holds more than `fold_over` rows. Updating thousands of random
/// bucket rows per page would rewrite most of the table's pages every time.
pub(crate) async fn add_to_digests<'a>(
    conn: &mut sqlx::SqliteConnection,
    deltas: impl IntoIterator<Item = (&'a str, u16, i64)>,
    fold_over: i64,
) -> Result<()> {
    let mut roots: std::collections::BTreeMap<&str, i64> = std::collections::BTreeMap::new();
    let mut buckets: std::collections::BTreeMap<(&str, u16), i64> = std::collections::BTreeMap::new();
    for (collection, bucket, delta) in deltas {
        if delta != 0 {
            *roots.entry(collection).or_default() ^= delta;
            *buckets.entry((collection, bucket)).or_default() ^= delta;
        }
    }
    let roots: Vec<(&str, i64)> = roots.into_iter().filter(|(_, h)| *h != 0).collect();
    if !roots.is_empty() {
        sqlx::query(
            "INSERT INTO tide_digest (level, collection, ix, hash) \
             SELECT 0, value->>0, 0, value->>1 FROM json_each(?1) WHERE true \
             ON CONFLICT DO UPDATE SET hash = (hash | excluded.hash) & ~(hash & excluded.hash)",
        )
        .bind(serde_json::to_string(&roots).expect("deltas serialize"))
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    }
    let logged: Vec<(&str, u16, i64)> =
        buckets.into_iter().filter(|(_, h)| *h != 0).map(|((c, b), h)| (c, b, h)).collect();
    if logged.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO tide_digest_log (collection, bucket, delta) \
         SELECT value->>0, value->>1, value->>2 FROM json_each(?1)",
    )
    .bind(serde_json::to_string(&logged).expect("deltas serialize"))
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    let logged: i64 = sqlx::query_scalar(
        "SELECT coalesce((SELECT max(rowid) FROM tide_digest_log) - (SELECT min(rowid) FROM tide_digest_log) + 1, 0)",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(db)?;
    if logged > fold_over {
        fold_digest_log(conn).await?;
    }
    Ok(())
}

/// Folds the logged bucket deltas into the group and bucket rows, combined
/// per row, and empties the log.
async fn fold_digest_log(conn: &mut sqlx::SqliteConnection) -> Result<()> {
    let logged: Vec<(String, i64, i64)> = sqlx::query_as("SELECT collection, bucket, delta FROM tide_digest_log")
        .fetch_all(&mut *conn)
        .await
        .map_err(db)?;
    let mut sum: std::collections::BTreeMap<(&str, u8, i64), i64> = std::collections::BTreeMap::new();
    for (collection, bucket, delta) in &logged {
        *sum.entry((collection, 1, bucket >> 8)).or_default() ^= delta;
        *sum.entry((collection, 2, *bucket)).or_default() ^= delta;
    }
    let rows: Vec<(u8, &str, i64, i64)> =
        sum.into_iter().filter(|(_, h)| *h != 0).map(|((c, l, i), h)| (l, c, i, h)).collect();
    sqlx::query(
        "INSERT INTO tide_digest (level, collection, ix, hash) \
         SELECT value->>0, value->>1, value->>2, value->>3 FROM json_each(?1) WHERE true \
         ON CONFLICT DO UPDATE SET hash = (hash | excluded.hash) & ~(hash & excluded.hash)",
    )
    .bind(serde_json::to_string(&rows).expect("deltas serialize"))
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    sqlx::query("DELETE FROM tide_digest_log").execute(conn).await.map_err(db)?;
    Ok(())
}

/// A document row's digest bucket and version hash (PROTOCOL.md §12).
pub(crate) fn digest_columns(collection: &str, id: &str, stamp: &Stamp, doc: Option<&str>) -> (u16, i64) {
    (tide_core::digest::bucket(collection, id), tide_core::digest::version_hash(collection, id, stamp, doc).to_i64())
}

impl Command {
    /// The ops a command commits, as [`CHECKPOINT_OPS`] counts them.
    fn ops(&self) -> u64 {
        let n = match self {
            Command::Write { writes, .. } => writes.len(),
            Command::Apply { changes, .. } | Command::Fetched { changes, .. } => changes.len(),
            Command::Revert { targets, server, .. } => targets.len() + server.len(),
            Command::Settle { acked, rejected, .. } => acked.len() + rejected.len(),
            Command::Forget { versions, .. } => versions.len(),
            Command::Discard { seqs, .. } => seqs.len(),
            Command::Collect { .. } | Command::Free { .. } | Command::Index { .. } | Command::Rekey { .. } => {
                return CHECKPOINT_OPS;
            }
            Command::Lineage { .. }
            | Command::FromHead { .. }
            | Command::Subscription { .. }
            | Command::Retry { .. }
            | Command::MaxPages { .. } => 1,
            Command::Settings { .. } | Command::Close { .. } => 0,
        };
        n as u64
    }
}

/// Answers a command that arrives after the store closed.
fn refuse(cmd: Command) {
    match cmd {
        Command::Write { reply, .. } => {
            let _ = reply.send(Err(Error::Closed));
        }
        Command::Apply { reply, .. } | Command::Fetched { reply, .. } => {
            let _ = reply.send(Err(Error::Closed));
        }
        Command::Revert { reply, .. } => {
            let _ = reply.send(Err(Error::Closed));
        }
        Command::Rekey { reply, .. }
        | Command::Lineage { reply, .. }
        | Command::Settle { reply, .. }
        | Command::FromHead { reply, .. }
        | Command::Subscription { reply, .. }
        | Command::Forget { reply, .. }
        | Command::Close { reply } => {
            let _ = reply.send(Err(Error::Closed));
        }
        Command::Retry { reply, .. } => {
            let _ = reply.send(Err(Error::Closed));
        }
        Command::Discard { reply, .. }
        | Command::MaxPages { reply, .. }
        | Command::Collect { reply, .. }
        | Command::Free { reply, .. } => {
            let _ = reply.send(Err(Error::Closed));
        }
        Command::Index { reply, .. } => {
            let _ = reply.send(Err(Error::Closed));
        }
        Command::Settings { reply } => {
            let _ = reply.send(Err(Error::Closed));
        }
    }
}
