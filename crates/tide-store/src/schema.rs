//! The schema and its forward migrations.
//!
//! Version 1 is exactly the schema of the original Python tide 0.2.1, so a
//! store file it wrote opens here and migrates like any other. Every
//! migration runs inside one `BEGIN IMMEDIATE` transaction.

use sqlx::{Connection, SqliteConnection};

use crate::error::{Error, Result, db};

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = 2;

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
    for sql in MIGRATIONS.iter().skip(found as usize) {
        sqlx::raw_sql(*sql).execute(&mut *tx).await.map_err(db)?;
    }
    tx.commit().await.map_err(db)
}
