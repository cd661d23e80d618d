//! `tide._engine`: tide's Rust store and sync engine for the Python package
//! (`python/tide`), which keeps the original 0.2.1 API. Documents cross as
//! JSON text; every method that waits returns an awaitable.

use std::sync::Arc;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use tide_client::Tide;
use tide_core::{SyncRequest, SyncResponse};

/// A transport written in Python (an object with `async exchange(request)`
/// taking and returning `tide.protocol` types), called on the event loop
/// the Tide was opened on.
struct PyTransport {
    transport: Py<PyAny>,
    locals: pyo3_async_runtimes::TaskLocals,
}

#[async_trait::async_trait]
impl tide_transport::Transport for PyTransport {
    async fn exchange(&self, request: &SyncRequest) -> Result<SyncResponse, tide_transport::Error> {
        let text = serde_json::to_string(request).expect("requests serialize");
        let awaited = Python::attach(|py| -> PyResult<_> {
            let data = py.import("json")?.call_method1("loads", (text,))?;
            let request = py.import("tide.protocol")?.getattr("SyncRequest")?.call_method1("from_json", (data,))?;
            let coroutine = self.transport.bind(py).call_method1("exchange", (request,))?;
            pyo3_async_runtimes::into_future_with_locals(&self.locals, coroutine)
        })
        .map_err(|e| python_error(&e))?;
        let response = awaited.await.map_err(|e| python_error(&e))?;
        let text = Python::attach(|py| -> PyResult<String> {
            let data = response.bind(py).call_method0("to_json")?;
            py.import("json")?.call_method1("dumps", (data,))?.extract()
        })
        .map_err(|e| python_error(&e))?;
        tide_transport::decode_response(200, None, text.as_bytes())
    }
}

/// Headers asked of a Python callable (sync, or async on the Tide's event
/// loop) before every exchange, as 0.2.1 does for short-lived tokens.
struct PyHeaders {
    provider: Py<PyAny>,
    locals: pyo3_async_runtimes::TaskLocals,
}

#[async_trait::async_trait]
impl tide_transport::HeaderProvider for PyHeaders {
    async fn headers(&self) -> Result<Vec<(String, String)>, tide_transport::BoxError> {
        let (ready, pending) = Python::attach(|py| -> PyResult<_> {
            let result = self.provider.bind(py).call0()?;
            if result.hasattr("__await__")? {
                Ok((None, Some(pyo3_async_runtimes::into_future_with_locals(&self.locals, result)?)))
            } else {
                Ok((Some(result.unbind()), None))
            }
        })?;
        let mapping = match (ready, pending) {
            (_, Some(awaited)) => awaited.await?,
            (Some(value), None) => value,
            (None, None) => unreachable!("one of the two"),
        };
        Ok(Python::attach(|py| pairs(mapping.bind(py)))?)
    }
}

/// A mapping's items as header pairs.
fn pairs(mapping: &Bound<'_, PyAny>) -> PyResult<Vec<(String, String)>> {
    mapping.call_method0("items")?.try_iter()?.map(|item| item?.extract()).collect()
}

/// A Python transport's exception as the sync sees it: `TransportError`
/// is retryable (the outbox waits), anything else is not.
fn python_error(e: &PyErr) -> tide_transport::Error {
    Python::attach(|py| {
        let value = e.value(py);
        let status: Option<u16> = value.getattr("status").ok().and_then(|s| s.extract().ok());
        if let Some(status) = status {
            let body: Vec<u8> = value.getattr("body").ok().and_then(|b| b.extract().ok()).unwrap_or_default();
            return tide_transport::Error::from_status(status, &body, None);
        }
        let retryable = py
            .import("tide.errors")
            .and_then(|m| m.getattr("TransportError"))
            .is_ok_and(|class| e.is_instance(py, &class));
        let message = e.to_string();
        if retryable {
            tide_transport::Error::Network { message, source: None }
        } else {
            tide_transport::Error::MalformedResponse { message }
        }
    })
}

/// How long a call run in place waits for another thread's answer by
/// yielding the CPU before it sleeps: a SQLite connection's worker thread
/// answers a read or a commit at `synchronous=NORMAL` well within it, and a
/// sleeping thread woken on an idle virtual CPU costs tens of microseconds.
const SPIN_BEFORE_PARK: std::time::Duration = std::time::Duration::from_micros(250);

/// Wakes the thread running [`now`].
struct ThreadWaker {
    woken: std::sync::atomic::AtomicBool,
    thread: std::thread::Thread,
}

impl std::task::Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, std::sync::atomic::Ordering::Release);
        self.thread.unpark();
    }
}

/// Runs a local store call to its end on the calling (Python) thread, in
/// the engine's runtime. Unlike `Runtime::block_on` it does not sleep as
/// soon as the call waits: for up to [`SPIN_BEFORE_PARK`] it yields the CPU
/// and looks again, so an answer from a connection's worker thread is taken
/// without a wake-up.
fn now<F: std::future::Future>(call: F) -> F::Output {
    use std::sync::atomic::Ordering;
    use std::task::{Context, Poll};

    let _runtime = pyo3_async_runtimes::tokio::get_runtime().enter();
    let waker =
        Arc::new(ThreadWaker { woken: std::sync::atomic::AtomicBool::new(false), thread: std::thread::current() });
    let task_waker = std::task::Waker::from(Arc::clone(&waker));
    let mut cx = Context::from_waker(&task_waker);
    let mut call = std::pin::pin!(call);
    loop {
        if let Poll::Ready(out) = call.as_mut().poll(&mut cx) {
            return out;
        }
        let since = std::time::Instant::now();
        while !waker.woken.swap(false, Ordering::Acquire) {
            if since.elapsed() < SPIN_BEFORE_PARK {
                std::thread::yield_now();
            } else {
                std::thread::park();
            }
        }
    }
}

/// A client error as the Python exception tide 0.2.1 raises for it.
fn raise(e: &tide_client::Error) -> PyErr {
    Python::attach(|py| {
        let (name, message) = match e {
            tide_client::Error::Transport(t) if t.is_retryable() => ("TransportError", t.to_string()),
            tide_client::Error::Transport(t) => ("ProtocolError", t.to_string()),
            tide_client::Error::Closed => ("NotOpenError", e.to_string()),
            other => ("TideError", other.to_string()),
        };
        match py.import("tide.errors").and_then(|m| m.getattr(name)) {
            Ok(class) => PyErr::from_value(
                class.call1((message,)).unwrap_or_else(|err| err.into_value(py).into_bound(py).into_any()),
            ),
            Err(_) => PyRuntimeError::new_err(message),
        }
    })
}

/// Writes from Python, `(collection, id, doc JSON or None for a delete)`,
/// as one batch; a document that is not a JSON object is a `ValueError`.
fn batch(writes: Vec<(String, String, Option<String>)>) -> PyResult<tide_client::Batch> {
    let mut batch = tide_client::Batch::default();
    for (collection, id, doc) in writes {
        batch = match doc {
            Some(text) => {
                let doc = tide_core::Doc::parse(&text).map_err(|e| PyValueError::new_err(e.to_string()))?;
                batch.put_doc(&collection, &id, doc)
            }
            None => batch.delete(&collection, &id),
        };
    }
    Ok(batch)
}

/// The engine behind one `tide.Tide`.
#[pyclass]
struct Engine {
    tide: Tide,
    /// Commits at `synchronous=FULL` (they wait for the disk).
    durable: bool,
}

fn err(e: impl std::fmt::Display) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

#[pymethods]
impl Engine {
    /// Opens the store at `db_path`, syncing with `endpoint` (with
    /// `headers`: a mapping, or a callable returning one, sync or async) or
    /// through a Python `transport`, if given.
    #[staticmethod]
    #[pyo3(signature = (db_path, node_id=None, endpoint=None, headers=None, transport=None, durable=false))]
    fn open(
        py: Python<'_>,
        db_path: String,
        node_id: Option<String>,
        endpoint: Option<String>,
        headers: Option<Py<PyAny>>,
        transport: Option<Py<PyAny>>,
        durable: bool,
    ) -> PyResult<Bound<'_, PyAny>> {
        // A mapping is sent as it is; a callable is asked before every exchange.
        let headers = match headers {
            Some(h) if h.bind(py).is_callable() => Some(tide_client::Headers::Provider(Arc::new(PyHeaders {
                provider: h,
                locals: pyo3_async_runtimes::tokio::get_current_locals(py)?,
            }))),
            Some(h) => Some(tide_client::Headers::Static(pairs(h.bind(py))?)),
            None => None,
        };
        let transport = match transport {
            Some(t) => Some(PyTransport { transport: t, locals: pyo3_async_runtimes::tokio::get_current_locals(py)? }),
            None => None,
        };
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            // 0.2.1's store commits at `synchronous=NORMAL`; `durable` asks for FULL.
            let durability = if durable { tide_client::Durability::Full } else { tide_client::Durability::Normal };
            let mut builder = Tide::builder().path(db_path).durability(durability);
            if let Some(id) = node_id {
                builder = builder.node_id(id);
            }
            if let Some(endpoint) = endpoint {
                builder = builder.endpoint(endpoint);
            }
            if let Some(headers) = headers {
                builder = builder.headers(headers);
            }
            if let Some(t) = transport {
                builder = builder.transport(Arc::new(t));
            }
            // The original polls; its tests sync by hand.
            builder = builder.long_poll(None);
            let tide = builder.open().await.map_err(|e| raise(&e))?;
            Ok(Engine { tide, durable })
        })
    }

    /// The store's node id.
    fn node_id(&self) -> String {
        self.tide.node_id()
    }

    /// Commits writes (`(collection, id, doc JSON or None for a delete)`,
    /// all or none) before returning, if nothing else is being written: the
    /// commit at `synchronous=NORMAL` takes microseconds, less than handing
    /// it to another thread and back. Returns False, having written nothing,
    /// when another write or a page of remote changes is in progress or
    /// queued (the caller then awaits [`Engine::write`]), and always for a
    /// durable store, whose commits wait for the disk. The GIL is released
    /// meanwhile.
    fn write_now(&self, py: Python<'_>, writes: Vec<(String, String, Option<String>)>) -> PyResult<bool> {
        if self.durable {
            return Ok(false);
        }
        let batch = batch(writes)?;
        let tide = &self.tide;
        let done = py.detach(|| now(tide.try_commit(&batch))).map_err(|e| raise(&e))?;
        Ok(done.is_some())
    }

    /// Commits writes (as [`Engine::write_now`]'s), waiting for any write
    /// in progress; an awaitable.
    fn write<'py>(
        &self,
        py: Python<'py>,
        writes: Vec<(String, String, Option<String>)>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let batch = batch(writes)?;
        let tide = self.tide.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            tide.commit(batch).await.map_err(|e| raise(&e))?;
            Ok(())
        })
    }

    /// Every live document of a collection as `(id, JSON text)`, by id.
    fn scan<'py>(&self, py: Python<'py>, collection: String) -> PyResult<Bound<'py, PyAny>> {
        let tide = self.tide.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let docs = tide.collection::<tide_core::Doc>(&collection);
            let mut out = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let page = docs.list_docs(after.as_deref(), 1_000).await.map_err(err)?;
                let full = page.len() == 1_000;
                after = page.last().map(|(id, _)| id.clone());
                out.extend(texts(page));
                if !full {
                    return Ok(out);
                }
            }
        })
    }

    /// `get`, done before returning: one read on a reader connection (which
    /// never waits for writes) takes microseconds, less than handing it to
    /// another thread and back; the GIL is released meanwhile.
    fn get_now(&self, py: Python<'_>, collection: &str, id: &str) -> PyResult<Option<String>> {
        let tide = &self.tide;
        let doc =
            py.detach(|| now(tide.collection::<tide_core::Doc>(collection).get_doc(id))).map_err(|e| raise(&e))?;
        Ok(doc.map(|d| d.as_str().to_owned()))
    }

    /// One sync; returns how many remote changes it applied.
    fn sync_once<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let tide = self.tide.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let report = tide.sync_once().await.map_err(|e| raise(&e))?;
            Ok(report.applied)
        })
    }

    /// The sync state: `(pending, rejected, seconds since the epoch of the
    /// last success or None, last error or None, reachable or None)`.
    fn status(&self) -> (u64, u64, Option<f64>, Option<String>, Option<bool>) {
        let s = self.tide.status();
        let at = s.last_success.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_secs_f64());
        (s.pending, s.rejected, at, s.last_error, s.reachable)
    }

    /// The ops the server rejected: `(seq, op JSON, code, message)`.
    fn rejected<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let tide = self.tide.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let rejected = tide.rejected().await.map_err(|e| raise(&e))?;
            Ok(rejected
                .into_iter()
                .map(|r| (r.seq, serde_json::to_string(&r.op).expect("ops serialize"), r.code.as_str(), r.message))
                .collect::<Vec<_>>())
        })
    }

    /// The documents a query finds, as `(id, JSON)` (see [`query_of`]).
    #[pyo3(signature = (collection, conditions, order, limit))]
    fn query<'py>(
        &self,
        py: Python<'py>,
        collection: &str,
        conditions: Vec<(String, String, String)>,
        order: Vec<String>,
        limit: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let query = query_of(&self.tide, collection, conditions, order, limit)?;
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let page = query.fetch().await.map_err(|e| raise(&e))?;
            Ok(texts(page.docs))
        })
    }

    /// A live query (see [`query_of`]): a `QueryWatcher`, awaited.
    #[pyo3(signature = (collection, conditions, order, limit))]
    fn watch_query<'py>(
        &self,
        py: Python<'py>,
        collection: &str,
        conditions: Vec<(String, String, String)>,
        order: Vec<String>,
        limit: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let query = query_of(&self.tide, collection, conditions, order, limit)?;
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let live = query.watch().await.map_err(|e| raise(&e))?;
            Ok(QueryWatcher { live: Arc::new(tokio::sync::Mutex::new(live)) })
        })
    }

    /// Declares (`create`) or drops an index of a collection on `fields`.
    fn index<'py>(
        &self,
        py: Python<'py>,
        collection: String,
        fields: Vec<String>,
        create: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let tide = self.tide.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let docs = tide.collection::<tide_core::Doc>(&collection);
            let fields = fields.into_iter().map(tide_client::field);
            let done = if create { docs.create_index(fields).await } else { docs.drop_index(fields).await };
            done.map_err(|e| raise(&e))
        })
    }

    /// Forgets a rejected op (the local document stays as it is).
    fn discard_rejected<'py>(&self, py: Python<'py>, seq: u64) -> PyResult<Bound<'py, PyAny>> {
        let tide = self.tide.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            tide.discard_rejected(seq).await.map_err(|e| raise(&e))
        })
    }

    /// Writes a rejected op again with a fresh stamp; whether `seq` was one.
    fn retry_rejected<'py>(&self, py: Python<'py>, seq: u64) -> PyResult<Bound<'py, PyAny>> {
        let tide = self.tide.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            Ok(tide.retry_rejected(seq).await.map_err(|e| raise(&e))?.is_some())
        })
    }

    /// The ops waiting in the outbox, oldest first, as `(seq, op JSON)`.
    fn pending_ops<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let tide = self.tide.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let pending = tide.pending(tide_store::READ_ROWS_MAX).await.map_err(|e| raise(&e))?;
            Ok(pending
                .into_iter()
                .map(|p| (p.seq, serde_json::to_string(&p.op).expect("ops serialize")))
                .collect::<Vec<_>>())
        })
    }

    /// Changes from now on (of `collection`, or all): a `Watcher`.
    #[pyo3(signature = (collection=None))]
    fn watch(&self, collection: Option<String>) -> Watcher {
        Watcher { watch: Arc::new(tokio::sync::Mutex::new(self.tide.watch())), collection }
    }

    /// Closes the store.
    fn close<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let tide = self.tide.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            tide.close().await;
            Ok(())
        })
    }
}

/// A query from Python: `conditions` are `(field, op, value JSON)` with op
/// one of `==`, `!=`, `<`, `<=`, `>`, `>=`, `in`, `startswith`, `contains`,
/// `exists`; `order` is field names, `-field` descending.
fn query_of(
    tide: &Tide,
    collection: &str,
    conditions: Vec<(String, String, String)>,
    order: Vec<String>,
    limit: usize,
) -> PyResult<tide_client::Query<tide_core::Doc>> {
    use tide_client::field;
    let mut query = tide.collection::<tide_core::Doc>(collection).query().limit(limit);
    for (name, op, value) in conditions {
        let value: serde_json::Value =
            serde_json::from_str(&value).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let f = field(name);
        let filter = match op.as_str() {
            "==" => f.eq(value),
            "!=" => f.ne(value),
            "<" => f.lt(value),
            "<=" => f.le(value),
            ">" => f.gt(value),
            ">=" => f.ge(value),
            "in" => f.is_in(value.as_array().cloned().unwrap_or_default()),
            "startswith" => f.starts_with(value.as_str().unwrap_or_default()),
            "contains" => f.contains(value),
            "exists" => f.exists(),
            other => return Err(PyValueError::new_err(format!("unknown operator {other:?}"))),
        };
        query = query.filter(filter);
    }
    for o in order {
        query = match o.strip_prefix('-') {
            Some(name) => query.order_by_desc(field(name)),
            None => query.order_by(field(o)),
        };
    }
    Ok(query)
}

/// Documents as `(id, JSON text)`.
fn texts(docs: Vec<(String, tide_core::Doc)>) -> Vec<(String, String)> {
    docs.into_iter().map(|(id, doc)| (id, doc.as_str().to_owned())).collect()
}

/// A live query's results.
#[pyclass]
struct QueryWatcher {
    live: Arc<tokio::sync::Mutex<tide_client::LiveQuery<tide_core::Doc>>>,
}

#[pymethods]
impl QueryWatcher {
    /// The next result as `(id, doc JSON)` pairs: at once the first time,
    /// then when a change alters it; None once the Tide is closed.
    fn next<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let live = Arc::clone(&self.live);
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            match live.lock().await.next().await {
                Some(update) => Ok(Some(texts(update.map_err(|e| raise(&e))?.docs))),
                None => Ok(None),
            }
        })
    }
}

/// Local and remote changes, in commit order.
#[pyclass]
struct Watcher {
    watch: Arc<tokio::sync::Mutex<tide_client::Watch>>,
    collection: Option<String>,
}

#[pymethods]
impl Watcher {
    /// The next change as `(collection, id, kind, doc JSON or None,
    /// source)`, or None once the Tide is closed.
    fn next<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let (watch, collection) = (Arc::clone(&self.watch), self.collection.clone());
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let mut watch = watch.lock().await;
            loop {
                let Some(event) = watch.next().await else { return Ok(None) };
                let tide_client::WatchEvent::Change(change) = event else { continue };
                if collection.as_ref().is_some_and(|c| *c != change.collection) {
                    continue;
                }
                let kind = if change.doc.is_some() { "put" } else { "delete" };
                let source = match change.source {
                    tide_client::Source::Local => "local",
                    _ => "remote",
                };
                let doc = change.doc.map(|d| d.as_str().to_owned());
                return Ok(Some((change.collection, change.id, kind, doc, source)));
            }
        })
    }
}

/// The module.
#[pymodule]
fn _engine(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_class::<Watcher>()?;
    m.add_class::<QueryWatcher>()?;
    Ok(())
}
