//! The schema and its forward migrations.
//!
//! Version 1 is exactly the schema of the original Python tide 0.2.1, so a
//! store file it wrote opens here and migrates like any other. Every
//! migration runs inside one `BEGIN IMMEDIATE` transaction.

use sqlx::{Connection, SqliteConnection};
use tide_core::digest;

use crate::error::{Error, Result, db};

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = 5;

/// The migrations, in order; `MIGRATIONS[i]` takes version `i` to `i + 1`.
const MIGRATIONS: [&str; SCHEMA_VERSION as usize] = [
    // v1: the original Python tide 0.2.1 schema, verbatim.
    r"
    CREATE TABLE IF NOT EXISTS tide_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS tide_docs (
        collection TEXT NOT NULL,
        id         TEXT NOT NULL,
        doc        TEXT,
        lamport    INTEGER NOT NULL,
        node_id    TEXT NOT NULL,
        deleted    INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (collection, id)
    );
    CREATE INDEX IF NOT EXISTS tide_docs_by_collection ON tide_docs (collection, deleted);
    CREATE TABLE IF NOT EXISTS tide_outbox (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        collection TEXT NOT NULL,
        id         TEXT NOT NULL,
        kind       TEXT NOT NULL,
        doc        TEXT,
        lamport    INTEGER NOT NULL,
        node_id    TEXT NOT NULL
    );
    INSERT OR IGNORE INTO tide_meta(key, value) VALUES ('schema_version', '1');
    ",
    // v2: the clock moves to an integer row of its own (meta values are TEXT,
    // which compares wrongly against integers); rejected ops get a table; a
    // trigger makes a local write one statement (outbox row, document, clock).
    r"
    CREATE TABLE tide_clock (id INTEGER PRIMARY KEY CHECK (id = 1), lamport INTEGER NOT NULL);
    INSERT INTO tide_clock (id, lamport) VALUES (1, max(
        coalesce((SELECT CAST(value AS INTEGER) FROM tide_meta WHERE key = 'lamport'), 0),
        coalesce((SELECT max(lamport) FROM tide_docs), 0),
        coalesce((SELECT max(lamport) FROM tide_outbox), 0)));
    DELETE FROM tide_meta WHERE key = 'lamport';
    -- A live row without a document can only come from a malformed server;
    -- the original client crashed reading it. Keep it as a tombstone.
    UPDATE tide_docs SET deleted = 1 WHERE doc IS NULL AND deleted = 0;
    CREATE TABLE tide_rejected (
        seq        INTEGER PRIMARY KEY,
        collection TEXT NOT NULL,
        id         TEXT NOT NULL,
        kind       TEXT NOT NULL,
        doc        TEXT,
        lamport    INTEGER NOT NULL,
        node_id    TEXT NOT NULL,
        code       TEXT NOT NULL,
        message    TEXT NOT NULL
    );
    CREATE TRIGGER tide_outbox_write AFTER INSERT ON tide_outbox BEGIN
        INSERT INTO tide_docs (collection, id, doc, lamport, node_id, deleted)
        VALUES (NEW.collection, NEW.id, NEW.doc, NEW.lamport, NEW.node_id, NEW.kind = 'delete')
        ON CONFLICT (collection, id) DO UPDATE SET
            doc = excluded.doc, lamport = excluded.lamport,
            node_id = excluded.node_id, deleted = excluded.deleted;
        UPDATE tide_clock SET lamport = max(lamport, NEW.lamport) WHERE id = 1;
    END;
    UPDATE tide_meta SET value = '2' WHERE key = 'schema_version';
    ",
    // v3: digests of the live documents (PROTOCOL.md §12), from each row's
    // bucket and version hash (computed in Rust when the row is written):
    // kept by the outbox trigger for local writes and in bulk by the writer
    // for pages and repairs; `backfill` fills them for existing rows;
    // rejected ops remember whether their document was put back.
    r"
    ALTER TABLE tide_docs ADD COLUMN bucket INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tide_docs ADD COLUMN vhash INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tide_outbox ADD COLUMN bucket INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tide_outbox ADD COLUMN vhash INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tide_rejected ADD COLUMN reverted INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tide_rejected ADD COLUMN vhash INTEGER NOT NULL DEFAULT 0;
    -- The version each op replaced (its before-image; lamport NULL for none),
    -- so a refused write can go back to the last version the server took.
    ALTER TABLE tide_outbox ADD COLUMN prev_doc TEXT;
    ALTER TABLE tide_outbox ADD COLUMN prev_lamport INTEGER;
    ALTER TABLE tide_outbox ADD COLUMN prev_node_id TEXT;
    ALTER TABLE tide_outbox ADD COLUMN prev_deleted INTEGER;
    ALTER TABLE tide_rejected ADD COLUMN prev_doc TEXT;
    ALTER TABLE tide_rejected ADD COLUMN prev_lamport INTEGER;
    ALTER TABLE tide_rejected ADD COLUMN prev_node_id TEXT;
    ALTER TABLE tide_rejected ADD COLUMN prev_deleted INTEGER;
    CREATE TABLE tide_digest (
        level      INTEGER NOT NULL,
        collection TEXT NOT NULL,
        ix         INTEGER NOT NULL,
        hash       INTEGER NOT NULL,
        PRIMARY KEY (level, collection, ix)
    ) WITHOUT ROWID;
    -- Bucket deltas not yet folded into the group and bucket rows: appending
    -- is cheap where updating random buckets is not (the roots, one row per
    -- collection, are kept up to date at once).
    CREATE TABLE tide_digest_log (collection TEXT NOT NULL, bucket INTEGER NOT NULL, delta INTEGER NOT NULL);
    -- The stamps of writes re-stamped when the store re-keyed (PROTOCOL.md §13).
    CREATE TABLE tide_restamped (
        lamport     INTEGER NOT NULL,
        node_id     TEXT NOT NULL,
        new_lamport INTEGER NOT NULL,
        new_node_id TEXT NOT NULL,
        PRIMARY KEY (lamport, node_id)
    ) WITHOUT ROWID;
    DROP TRIGGER tide_outbox_write;
    CREATE TRIGGER tide_outbox_write AFTER INSERT ON tide_outbox BEGIN
        UPDATE tide_outbox SET (prev_doc, prev_lamport, prev_node_id, prev_deleted) =
            (SELECT doc, lamport, node_id, deleted FROM tide_docs WHERE collection = NEW.collection AND id = NEW.id)
        WHERE seq = NEW.seq;
        -- The digests move by (old live hash) XOR (new live hash); SQLite has
        -- no XOR operator, so a ^ b is (a | b) & ~(a & b). The root at once,
        -- the bucket through the log. Page applies and repairs do the same in
        -- bulk from Rust.
        INSERT INTO tide_digest_log (collection, bucket, delta)
        SELECT NEW.collection, NEW.bucket, d.x
        FROM (SELECT (a | b) & ~(a & b) AS x FROM (SELECT
                coalesce((SELECT iif(deleted = 0, vhash, 0) FROM tide_docs
                          WHERE collection = NEW.collection AND id = NEW.id), 0) AS a,
                iif(NEW.kind = 'delete', 0, NEW.vhash) AS b)) AS d
        WHERE d.x <> 0;
        INSERT INTO tide_digest (level, collection, ix, hash)
        SELECT 0, NEW.collection, 0, d.x
        FROM (SELECT (a | b) & ~(a & b) AS x FROM (SELECT
                coalesce((SELECT iif(deleted = 0, vhash, 0) FROM tide_docs
                          WHERE collection = NEW.collection AND id = NEW.id), 0) AS a,
                iif(NEW.kind = 'delete', 0, NEW.vhash) AS b)) AS d
        WHERE d.x <> 0
        ON CONFLICT DO UPDATE SET hash = (hash | excluded.hash) & ~(hash & excluded.hash);
        INSERT INTO tide_docs (collection, id, doc, lamport, node_id, deleted, bucket, vhash)
        VALUES (NEW.collection, NEW.id, NEW.doc, NEW.lamport, NEW.node_id, NEW.kind = 'delete', NEW.bucket, NEW.vhash)
        ON CONFLICT (collection, id) DO UPDATE SET
            doc = excluded.doc, lamport = excluded.lamport, node_id = excluded.node_id,
            deleted = excluded.deleted, vhash = excluded.vhash;
        UPDATE tide_clock SET lamport = max(lamport, NEW.lamport) WHERE id = 1;
    END;
    UPDATE tide_meta SET value = '3' WHERE key = 'schema_version';
    ",
    // v4: bounded storage (PROTOCOL.md §14). Each document row keeps the
    // server's seq for its version (NULL for a local write not yet stored
    // by the server; 0 where it is not known), by which tombstones are
    // collected behind the server's horizon; a local version keeps the seq
    // of the server's version it was edited from (`base`), which its op
    // carries, so a server that has collected the delete can tell an edit
    // of a deleted document from a new one.
    r"
    ALTER TABLE tide_docs ADD COLUMN seq INTEGER;
    ALTER TABLE tide_docs ADD COLUMN base INTEGER;
    ALTER TABLE tide_outbox ADD COLUMN base INTEGER;
    UPDATE tide_docs SET seq = 0 WHERE NOT EXISTS (SELECT 1 FROM tide_outbox AS o
        WHERE o.collection = tide_docs.collection AND o.id = tide_docs.id
        AND o.lamport = tide_docs.lamport AND o.node_id = tide_docs.node_id);
    UPDATE tide_outbox SET base = 0 WHERE prev_deleted = 0;
    UPDATE tide_docs SET base = (SELECT o.base FROM tide_outbox AS o
        WHERE o.collection = tide_docs.collection AND o.id = tide_docs.id
        AND o.lamport = tide_docs.lamport AND o.node_id = tide_docs.node_id)
    WHERE seq IS NULL AND deleted = 0;
    CREATE INDEX tide_docs_tombstones ON tide_docs (seq) WHERE deleted = 1;
    DROP TRIGGER tide_outbox_write;
    CREATE TRIGGER tide_outbox_write AFTER INSERT ON tide_outbox BEGIN
        -- The before-image, and the base: the replaced version's seq if the
        -- server stored it, else (a local version) the base it was edited
        -- from; none when it replaced nothing or a deletion.
        UPDATE tide_outbox SET (prev_doc, prev_lamport, prev_node_id, prev_deleted, base) =
            (SELECT d.doc, d.lamport, d.node_id, d.deleted, iif(d.deleted, NULL, coalesce(d.seq, d.base))
             FROM tide_docs AS d WHERE d.collection = NEW.collection AND d.id = NEW.id)
        WHERE seq = NEW.seq;
        INSERT INTO tide_digest_log (collection, bucket, delta)
        SELECT NEW.collection, NEW.bucket, d.x
        FROM (SELECT (a | b) & ~(a & b) AS x FROM (SELECT
                coalesce((SELECT iif(deleted = 0, vhash, 0) FROM tide_docs
                          WHERE collection = NEW.collection AND id = NEW.id), 0) AS a,
                iif(NEW.kind = 'delete', 0, NEW.vhash) AS b)) AS d
        WHERE d.x <> 0;
        INSERT INTO tide_digest (level, collection, ix, hash)
        SELECT 0, NEW.collection, 0, d.x
        FROM (SELECT (a | b) & ~(a & b) AS x FROM (SELECT
                coalesce((SELECT iif(deleted = 0, vhash, 0) FROM tide_docs
                          WHERE collection = NEW.collection AND id = NEW.id), 0) AS a,
                iif(NEW.kind = 'delete', 0, NEW.vhash) AS b)) AS d
        WHERE d.x <> 0
        ON CONFLICT DO UPDATE SET hash = (hash | excluded.hash) & ~(hash & excluded.hash);
        INSERT INTO tide_docs (collection, id, doc, lamport, node_id, deleted, bucket, vhash, seq, base)
        VALUES (NEW.collection, NEW.id, NEW.doc, NEW.lamport, NEW.node_id, NEW.kind = 'delete', NEW.bucket,
                NEW.vhash, NULL, (SELECT base FROM tide_outbox WHERE seq = NEW.seq))
        ON CONFLICT (collection, id) DO UPDATE SET
            doc = excluded.doc, lamport = excluded.lamport, node_id = excluded.node_id,
            deleted = excluded.deleted, vhash = excluded.vhash, seq = NULL, base = excluded.base;
        UPDATE tide_clock SET lamport = max(lamport, NEW.lamport) WHERE id = 1;
    END;
    UPDATE tide_meta SET value = '4' WHERE key = 'schema_version';
    ",
    // v5: local queries' indexes. Each indexed field path is a virtual
    // generated column of tide_docs (`col`, named by the store, never by
    // the app); each index the app declared is a row here and one SQLite
    // index over (collection, its columns, id) of the live documents.
    r"
    CREATE TABLE tide_fields (path TEXT PRIMARY KEY, col TEXT NOT NULL UNIQUE) WITHOUT ROWID;
    CREATE TABLE tide_indexes (
        collection TEXT NOT NULL,
        paths      TEXT NOT NULL,
        name       TEXT NOT NULL,
        PRIMARY KEY (collection, paths)
    ) WITHOUT ROWID;
    UPDATE tide_meta SET value = '5' WHERE key = 'schema_version';
    ",
];

/// The schema version of the open database (0 for an empty one).
pub(crate) async fn version(conn: &mut SqliteConnection) -> Result<u32> {
    let has_meta: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'tide_meta')")
            .fetch_one(&mut *conn)
            .await
            .map_err(db)?;
    if !has_meta {
        return Ok(0);
    }
    let v: Option<String> = sqlx::query_scalar("SELECT value FROM tide_meta WHERE key = 'schema_version'")
        .fetch_optional(&mut *conn)
        .await
        .map_err(db)?;
    match v {
        None => Ok(0),
        Some(v) => v.trim().parse().map_err(|_| Error::Corrupt { detail: format!("schema_version is {v:?}") }),
    }
}

/// Brings the database to [`SCHEMA_VERSION`], refusing a newer one.
pub(crate) async fn migrate(conn: &mut SqliteConnection) -> Result<()> {
    let found = version(conn).await?;
    if found > SCHEMA_VERSION {
        return Err(Error::SchemaTooNew { found, supported: SCHEMA_VERSION });
    }
    if found == SCHEMA_VERSION {
        return Ok(());
    }
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(db)?;
    // Read again under the write lock: another process may have migrated.
    let found = version(&mut tx).await?;
    for (to, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        sqlx::raw_sql(*sql).execute(&mut *tx).await.map_err(db)?;
        if to + 1 == 3 {
            canonicalize_docs(&mut tx).await?;
            backfill_digests(&mut tx).await?;
        }
    }
    tx.commit().await.map_err(db)
}

/// Rewrites the documents of a store older than version 3 in their
/// canonical text (`tide_core::Doc`), which tide reads, hashes and sends as
/// it is: the original Python tide wrote its own spacing and escapes. Text
/// that is not a JSON object is left for reads to report.
async fn canonicalize_docs(conn: &mut SqliteConnection) -> Result<()> {
    const TABLES: [(&str, &str); 2] = [
        ("SELECT rowid, doc FROM tide_docs WHERE doc IS NOT NULL", "UPDATE tide_docs SET doc = ?2 WHERE rowid = ?1"),
        (
            "SELECT rowid, doc FROM tide_outbox WHERE doc IS NOT NULL",
            "UPDATE tide_outbox SET doc = ?2 WHERE rowid = ?1",
        ),
    ];
    for (select, update) in TABLES {
        let rows: Vec<(i64, String)> = sqlx::query_as(select).fetch_all(&mut *conn).await.map_err(db)?;
        for (rowid, text) in rows {
            match tide_core::Doc::parse(&text) {
                Ok(doc) if doc.as_str() != text => {
                    sqlx::query(update).bind(rowid).bind(doc.as_str()).execute(&mut *conn).await.map_err(db)?;
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Gives every existing document its bucket and version hash, and the
/// digests their live versions.
async fn backfill_digests(conn: &mut SqliteConnection) -> Result<()> {
    let rows: Vec<(String, String, i64, String, bool, Option<String>)> =
        sqlx::query_as("SELECT collection, id, lamport, node_id, deleted, doc FROM tide_docs")
            .fetch_all(&mut *conn)
            .await
            .map_err(db)?;
    let hashed: Vec<(&str, &str, u16, i64, bool)> = rows
        .iter()
        .map(|(c, id, lamport, node, deleted, doc)| {
            let stamp = tide_core::Stamp::new(u64::try_from(*lamport).unwrap_or(0), node.clone());
            let doc = doc.as_deref().filter(|_| !deleted);
            (
                c.as_str(),
                id.as_str(),
                digest::bucket(c, id),
                digest::version_hash(c, id, &stamp, doc).to_i64(),
                *deleted,
            )
        })
        .collect();
    let updates: Vec<(&str, &str, u16, i64)> = hashed.iter().map(|&(c, id, b, h, _)| (c, id, b, h)).collect();
    sqlx::query(
        "UPDATE tide_docs SET bucket = j.value->>2, vhash = j.value->>3 FROM json_each(?1) AS j \
         WHERE tide_docs.collection = j.value->>0 AND tide_docs.id = j.value->>1",
    )
    .bind(serde_json::to_string(&updates).expect("rows serialize"))
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    let live = hashed.iter().filter(|r| !r.4).map(|&(c, _, b, h, _)| (c, b, h));
    crate::writer::add_to_digests(conn, live, crate::writer::DIGEST_LOG_ROWS_MAX).await
}
