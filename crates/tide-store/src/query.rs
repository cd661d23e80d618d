//! Local queries: filters on the fields of a collection's documents, an
//! order, a limit and keyset pages, compiled to one SQLite statement whose
//! field paths and values are all bound parameters; and the same filters
//! evaluated in memory, which live queries use to tell whether a change can
//! alter a result (and the tests use as the reference).
//!
//! # What a filter means
//!
//! A field is the JSON value at a dotted path of object keys (`"a.b"`);
//! a path through anything but objects, or to a missing key, finds nothing.
//! Comparisons (`eq`, `lt`, ...) hold only between values of one kind:
//! numbers numerically, strings by their UTF-8 bytes, booleans with
//! `false < true`; a field of another kind, or none, does not match. `eq`
//! with `null` matches a JSON `null` (not a missing field); `ne` is `not
//! eq`. `starts_with` needs a string field, `contains` an array field with
//! an element equal to the value. `exists` matches any value, `null`
//! included.
//!
//! An order sorts by SQLite's order of the fields' values: missing and
//! `null` first, then numbers and booleans (as 0 and 1) together, then
//! strings (arrays and objects sort as their JSON text); descending
//! reverses it. Ties are broken by id, ascending, so pages are stable.

use std::cmp::Ordering;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// How many documents a query returns when no limit is given.
pub const QUERY_LIMIT_DEFAULT: usize = 1_000;
/// The most documents one query may return ([`Query::limit`] is capped).
pub const QUERY_LIMIT_MAX: usize = crate::READ_ROWS_MAX;
/// The most conditions (comparisons, `and`, `or`, `not`, and each value of
/// an `is_in`) one filter may hold.
pub const QUERY_TERMS_MAX: usize = 256;
/// The most fields one order (or one index) may name.
pub const QUERY_ORDER_FIELDS_MAX: usize = 8;
/// The most segments one field path may have.
pub const PATH_SEGMENTS_MAX: usize = 16;
/// The most bytes one segment of a field path may have.
pub const PATH_SEGMENT_BYTES_MAX: usize = 128;

/// A field of a document, by its dotted path (`"address.city"`), to filter
/// or order by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Field(String);

/// The field at `path`: object keys separated by dots. Checked when the
/// query runs (each segment 1–128 bytes, no `"`, no control characters).
pub fn field(path: impl Into<String>) -> Field {
    Field(path.into())
}

/// A condition on a document's fields. Build one with [`field`] and combine
/// with [`Filter::and`], [`Filter::or`] and `!`.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// The field equals the value (same kind).
    Eq(Field, Value),
    /// The field is less than the value (same kind).
    Lt(Field, Value),
    /// The field is at most the value (same kind).
    Le(Field, Value),
    /// The field is greater than the value (same kind).
    Gt(Field, Value),
    /// The field is at least the value (same kind).
    Ge(Field, Value),
    /// The field equals one of the values.
    In(Field, Vec<Value>),
    /// The field is a string starting with this.
    StartsWith(Field, String),
    /// The field is an array with an element equal to the value.
    Contains(Field, Value),
    /// The field is present (any value, `null` included).
    Exists(Field),
    /// Every one holds (none: true).
    And(Vec<Filter>),
    /// One holds (none: false).
    Or(Vec<Filter>),
    /// It does not hold.
    Not(Box<Filter>),
}

impl Field {
    /// Equal to `value` (a number, string, boolean or `null`).
    pub fn eq(self, value: impl Into<Value>) -> Filter {
        Filter::Eq(self, value.into())
    }

    /// Not equal to `value` (`!eq`: a missing field matches).
    pub fn ne(self, value: impl Into<Value>) -> Filter {
        !self.eq(value)
    }

    /// Less than `value`.
    pub fn lt(self, value: impl Into<Value>) -> Filter {
        Filter::Lt(self, value.into())
    }

    /// At most `value`.
    pub fn le(self, value: impl Into<Value>) -> Filter {
        Filter::Le(self, value.into())
    }

    /// Greater than `value`.
    pub fn gt(self, value: impl Into<Value>) -> Filter {
        Filter::Gt(self, value.into())
    }

    /// At least `value`.
    pub fn ge(self, value: impl Into<Value>) -> Filter {
        Filter::Ge(self, value.into())
    }

    /// Equal to one of `values`.
    pub fn is_in<V: Into<Value>>(self, values: impl IntoIterator<Item = V>) -> Filter {
        Filter::In(self, values.into_iter().map(Into::into).collect())
    }

    /// A string starting with `prefix`.
    pub fn starts_with(self, prefix: impl Into<String>) -> Filter {
        Filter::StartsWith(self, prefix.into())
    }

    /// An array holding an element equal to `value`.
    pub fn contains(self, value: impl Into<Value>) -> Filter {
        Filter::Contains(self, value.into())
    }

    /// Present, whatever its value.
    pub fn exists(self) -> Filter {
        Filter::Exists(self)
    }

    /// A JSON `null` (not a missing field).
    pub fn is_null(self) -> Filter {
        Filter::Eq(self, Value::Null)
    }
}

impl Filter {
    /// This and `other`.
    #[must_use]
    pub fn and(self, other: Filter) -> Filter {
        match self {
            Filter::And(mut all) => {
                all.push(other);
                Filter::And(all)
            }
            one => Filter::And(vec![one, other]),
        }
    }

    /// This or `other`.
    #[must_use]
    pub fn or(self, other: Filter) -> Filter {
        match self {
            Filter::Or(mut any) => {
                any.push(other);
                Filter::Or(any)
            }
            one => Filter::Or(vec![one, other]),
        }
    }

    /// Whether `doc` (a document as JSON) matches: the same answer as the
    /// SQL the filter compiles to.
    pub fn matches(&self, doc: &Value) -> bool {
        match self {
            Filter::Eq(f, v) => at(doc, &f.0).is_some_and(|x| same_kind_cmp(x, v) == Some(Ordering::Equal)),
            Filter::Lt(f, v) => at(doc, &f.0).is_some_and(|x| same_kind_cmp(x, v) == Some(Ordering::Less)),
            Filter::Le(f, v) => {
                at(doc, &f.0).is_some_and(|x| matches!(same_kind_cmp(x, v), Some(Ordering::Less | Ordering::Equal)))
            }
            Filter::Gt(f, v) => at(doc, &f.0).is_some_and(|x| same_kind_cmp(x, v) == Some(Ordering::Greater)),
            Filter::Ge(f, v) => {
                at(doc, &f.0).is_some_and(|x| matches!(same_kind_cmp(x, v), Some(Ordering::Greater | Ordering::Equal)))
            }
            Filter::In(f, vs) => {
                at(doc, &f.0).is_some_and(|x| vs.iter().any(|v| same_kind_cmp(x, v) == Some(Ordering::Equal)))
            }
            Filter::StartsWith(f, p) => {
                at(doc, &f.0).and_then(Value::as_str).is_some_and(|s| s.starts_with(p.as_str()))
            }
            Filter::Contains(f, v) => at(doc, &f.0)
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|e| same_kind_cmp(e, v) == Some(Ordering::Equal))),
            Filter::Exists(f) => at(doc, &f.0).is_some(),
            Filter::And(all) => all.iter().all(|f| f.matches(doc)),
            Filter::Or(any) => any.iter().any(|f| f.matches(doc)),
            Filter::Not(f) => !f.matches(doc),
        }
    }

    fn terms(&self) -> usize {
        match self {
            Filter::And(fs) | Filter::Or(fs) => 1 + fs.iter().map(Filter::terms).sum::<usize>(),
            Filter::Not(f) => 1 + f.terms(),
            Filter::In(_, values) => values.len().max(1),
            _ => 1,
        }
    }
}

impl std::ops::Not for Filter {
    type Output = Filter;

    fn not(self) -> Filter {
        Filter::Not(Box::new(self))
    }
}

/// The value at a dotted path of object keys.
fn at<'a>(doc: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(doc, |v, key| v.as_object()?.get(key))
}

/// The kinds a comparison tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Number,
    Text,
    Bool,
    Null,
}

fn kind(v: &Value) -> Option<Kind> {
    match v {
        Value::Number(_) => Some(Kind::Number),
        Value::String(_) => Some(Kind::Text),
        Value::Bool(_) => Some(Kind::Bool),
        Value::Null => Some(Kind::Null),
        Value::Array(_) | Value::Object(_) => None,
    }
}

/// `x` against `v` when both are of one kind.
fn same_kind_cmp(x: &Value, v: &Value) -> Option<Ordering> {
    match (x, v) {
        (Value::Number(a), Value::Number(b)) => number_cmp(a, b),
        (Value::String(a), Value::String(b)) => Some(a.as_bytes().cmp(b.as_bytes())),
        (Value::Bool(a), Value::Bool(b)) => Some(a.cmp(b)),
        (Value::Null, Value::Null) => Some(Ordering::Equal),
        _ => None,
    }
}

fn number_cmp(a: &serde_json::Number, b: &serde_json::Number) -> Option<Ordering> {
    match (a.as_i64(), b.as_i64()) {
        (Some(a), Some(b)) => Some(a.cmp(&b)),
        _ => a.as_f64()?.partial_cmp(&b.as_f64()?),
    }
}

/// One field of an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Order {
    field: Field,
    descending: bool,
}

/// A query on one collection: which documents, in what order, how many,
/// from where.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    collection: String,
    filter: Option<Filter>,
    order: Vec<Order>,
    limit: usize,
    after: Option<QueryCursor>,
}

/// Where a page of a query ended, to ask for the next one (keyset paging:
/// stable while documents change). Opaque; keep it as its text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QueryCursor(String);

impl QueryCursor {
    /// The cursor as text, to keep.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for QueryCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for QueryCursor {
    type Err = std::convert::Infallible;

    /// A kept cursor (checked when the query runs).
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// A page of a query's results.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryPage<T> {
    /// The documents, in order, with their ids.
    pub docs: Vec<(String, T)>,
    /// Where to go on from, when the page was full.
    pub next: Option<QueryCursor>,
}

/// A sort value as SQLite holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum SqlValue {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}

impl Query {
    /// Every live document of `collection`, in id order, at most
    /// [`QUERY_LIMIT_DEFAULT`].
    pub fn new(collection: impl Into<String>) -> Self {
        Self { collection: collection.into(), filter: None, order: Vec::new(), limit: QUERY_LIMIT_DEFAULT, after: None }
    }

    /// Only documents matching `filter` (combined with any filter set before by `and`).
    #[must_use]
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filter = Some(match self.filter.take() {
            Some(before) => before.and(filter),
            None => filter,
        });
        self
    }

    /// Then ordered by `field`, ascending.
    #[must_use]
    pub fn order_by(mut self, field: Field) -> Self {
        self.order.push(Order { field, descending: false });
        self
    }

    /// Then ordered by `field`, descending.
    #[must_use]
    pub fn order_by_desc(mut self, field: Field) -> Self {
        self.order.push(Order { field, descending: true });
        self
    }

    /// At most `n` documents (capped at [`QUERY_LIMIT_MAX`]; at least 1).
    #[must_use]
    pub fn limit(mut self, n: usize) -> Self {
        self.limit = n.clamp(1, QUERY_LIMIT_MAX);
        self
    }

    /// The page after `cursor` (from a [`QueryPage::next`] of this query).
    #[must_use]
    pub fn after(mut self, cursor: QueryCursor) -> Self {
        self.after = Some(cursor);
        self
    }

    /// The collection it reads.
    pub fn collection(&self) -> &str {
        &self.collection
    }

    /// Its limit.
    pub(crate) fn limit_of(&self) -> usize {
        self.limit
    }

    /// Whether `doc` passes the filter.
    pub fn matches(&self, doc: &Value) -> bool {
        self.filter.as_ref().is_none_or(|f| f.matches(doc))
    }

    /// The same query from the start (no cursor).
    #[must_use]
    pub fn from_start(mut self) -> Self {
        self.after = None;
        self
    }

    /// Sorts `docs` (id, document) as the query orders them, in memory.
    pub fn sort(&self, docs: &mut [(String, Value)]) {
        docs.sort_by(|a, b| {
            for o in &self.order {
                let ord = sort_cmp(&sort_key(at(&a.1, &o.field.0)), &sort_key(at(&b.1, &o.field.0)));
                let ord = if o.descending { ord.reverse() } else { ord };
                if ord != Ordering::Equal {
                    return ord;
                }
            }
            a.0.as_bytes().cmp(b.0.as_bytes())
        });
    }

    /// Checks the query's shape before it runs.
    fn check(&self) -> Result<()> {
        tide_core::Limits::default().check_collection(&self.collection)?;
        if self.order.len() > QUERY_ORDER_FIELDS_MAX {
            return Err(invalid(format!("{} order fields; the limit is {QUERY_ORDER_FIELDS_MAX}", self.order.len())));
        }
        if let Some(f) = &self.filter {
            let terms = f.terms();
            if terms > QUERY_TERMS_MAX {
                return Err(invalid(format!("{terms} terms in one filter; the limit is {QUERY_TERMS_MAX}")));
            }
        }
        for o in &self.order {
            json_path(&o.field)?;
        }
        Ok(())
    }
}

fn invalid(message: String) -> Error {
    Error::InvalidQuery { message }
}

/// The SQLite JSON path of a field (`$."a"."b"`), checked.
pub(crate) fn json_path(field: &Field) -> Result<String> {
    let segments: Vec<&str> = field.0.split('.').collect();
    if segments.len() > PATH_SEGMENTS_MAX {
        return Err(invalid(format!(
            "field {:?} has {} segments; the limit is {PATH_SEGMENTS_MAX}",
            field.0,
            segments.len()
        )));
    }
    let mut path = String::from("$");
    for s in segments {
        if s.is_empty() || s.len() > PATH_SEGMENT_BYTES_MAX || s.contains('"') || s.chars().any(char::is_control) {
            return Err(invalid(format!(
                "field {:?}: each dot-separated key must be 1–{PATH_SEGMENT_BYTES_MAX} bytes without '\"' or control characters",
                field.0
            )));
        }
        let _ = write!(path, ".\"{s}\"");
    }
    Ok(path)
}

/// A field's name from its JSON path: `$."a"."b"` is `a.b`.
pub(crate) fn field_name(path: &str) -> String {
    path.trim_start_matches('$')
        .split(".\"")
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('"'))
        .collect::<Vec<_>>()
        .join(".")
}

/// A sort key as SQLite orders `json_extract` results.
#[derive(Debug, Clone, PartialEq)]
enum SortKey {
    Null,
    Num(f64),
    Text(String),
}

fn sort_key(v: Option<&Value>) -> SortKey {
    match v {
        None | Some(Value::Null) => SortKey::Null,
        Some(Value::Bool(b)) => SortKey::Num(f64::from(u8::from(*b))),
        Some(Value::Number(n)) => SortKey::Num(n.as_f64().unwrap_or(0.0)),
        Some(Value::String(s)) => SortKey::Text(s.clone()),
        Some(other) => SortKey::Text(other.to_string()),
    }
}

fn sort_cmp(a: &SortKey, b: &SortKey) -> Ordering {
    let class = |k: &SortKey| match k {
        SortKey::Null => 0,
        SortKey::Num(_) => 1,
        SortKey::Text(_) => 2,
    };
    match (a, b) {
        (SortKey::Num(x), SortKey::Num(y)) => x.total_cmp(y),
        (SortKey::Text(x), SortKey::Text(y)) => x.as_bytes().cmp(y.as_bytes()),
        _ => class(a).cmp(&class(b)),
    }
}

/// A value bound to a statement.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Bind {
    Text(String),
    Int(i64),
    Real(f64),
    Null,
}

/// A compiled query: SQL and its bound values in order.
#[derive(Debug, Default)]
pub(crate) struct Sql {
    pub(crate) text: String,
    pub(crate) binds: Vec<Bind>,
}

impl Sql {
    fn push(&mut self, s: &str) {
        self.text.push_str(s);
    }

    fn bind(&mut self, b: Bind) {
        self.text.push('?');
        self.binds.push(b);
    }

    /// A field's value: its indexed column, or `json_extract` of its bound path.
    fn value_of(&mut self, field: &Field, columns: &Indexed<'_>) -> Result<()> {
        let path = json_path(field)?;
        if let Some(column) = columns.columns.get(&path) {
            self.push(column);
        } else {
            self.push("json_extract(doc, ");
            self.bind(Bind::Text(path));
            self.push(")");
        }
        Ok(())
    }

    /// `json_type` of a field's bound path.
    fn type_of(&mut self, field: &Field) -> Result<()> {
        self.push("json_type(doc, ");
        self.bind(Bind::Text(json_path(field)?));
        self.push(")");
        Ok(())
    }

    fn kind_check(&mut self, field: &Field, kind: Kind) -> Result<()> {
        self.type_of(field)?;
        self.push(match kind {
            Kind::Number => " IN ('integer', 'real')",
            Kind::Text => " = 'text'",
            Kind::Bool => " IN ('true', 'false')",
            Kind::Null => " = 'null'",
        });
        Ok(())
    }

    fn compare(&mut self, field: &Field, op: &str, value: &Value, columns: &Indexed<'_>) -> Result<()> {
        let Some(k) = kind(value) else {
            return Err(invalid(format!("field {:?} is compared with {value}: compare with a scalar", field.0)));
        };
        if k == Kind::Null {
            if op != "=" {
                return Err(invalid(format!("field {:?}: null can only be tested for equality", field.0)));
            }
            return self.kind_check(field, Kind::Null);
        }
        self.push("(");
        self.value_of(field, columns)?;
        self.push(" ");
        self.push(op);
        self.push(" ");
        self.bind(scalar_bind(value));
        // Only a string equals a string that cannot be an array's or an
        // object's JSON text (numbers and booleans are not TEXT): one JSON
        // function a row fewer.
        if op != "=" || !value.as_str().is_some_and(plain_text) {
            self.push(" AND ");
            self.kind_check(field, k)?;
        }
        self.push(")");
        Ok(())
    }

    /// Compiles `filter`; `columns` names the indexed column of a path.
    pub(crate) fn filter(&mut self, filter: &Filter, columns: &Indexed<'_>) -> Result<()> {
        match filter {
            Filter::Eq(f, v) => self.compare(f, "=", v, columns),
            Filter::Lt(f, v) => self.compare(f, "<", v, columns),
            Filter::Le(f, v) => self.compare(f, "<=", v, columns),
            Filter::Gt(f, v) => self.compare(f, ">", v, columns),
            Filter::Ge(f, v) => self.compare(f, ">=", v, columns),
            Filter::In(f, values) => self.is_in(f, values, columns),
            Filter::StartsWith(f, prefix) => {
                self.push("(");
                self.value_of(f, columns)?;
                self.push(" >= ");
                self.bind(Bind::Text(prefix.clone()));
                if let Some(upper) = successor(prefix) {
                    self.push(" AND ");
                    self.value_of(f, columns)?;
                    self.push(" < ");
                    self.bind(Bind::Text(upper));
                }
                // A range of plain text holds strings only (see `compare`).
                if !plain_text(prefix) {
                    self.push(" AND ");
                    self.kind_check(f, Kind::Text)?;
                }
                self.push(")");
                Ok(())
            }
            Filter::Contains(f, v) => {
                let Some(k) = kind(v) else {
                    return Err(invalid(format!("field {:?}: contains takes a scalar", f.0)));
                };
                self.push("(");
                self.type_of(f)?;
                self.push(" = 'array' AND EXISTS (SELECT 1 FROM json_each(doc, ");
                self.bind(Bind::Text(json_path(f)?));
                self.push(") AS e WHERE ");
                if k != Kind::Null {
                    self.push("e.value = ");
                    self.bind(scalar_bind(v));
                    self.push(" AND ");
                }
                self.push(match k {
                    Kind::Number => "e.type IN ('integer', 'real')",
                    Kind::Text => "e.type = 'text'",
                    Kind::Bool => "e.type IN ('true', 'false')",
                    Kind::Null => "e.type = 'null'",
                });
                self.push("))");
                Ok(())
            }
            Filter::Exists(f) => {
                self.type_of(f)?;
                self.push(" IS NOT NULL");
                Ok(())
            }
            Filter::And(all) => self.join(all, " AND ", "1", columns),
            Filter::Or(any) => self.join(any, " OR ", "0", columns),
            Filter::Not(f) => {
                // A comparison with a missing field is NULL in SQL, false here.
                self.push("NOT coalesce(");
                self.filter(f, columns)?;
                self.push(", 0)");
                Ok(())
            }
        }
    }

    /// `x IN (...)` per kind of value, so an index on the field serves it.
    fn is_in(&mut self, field: &Field, values: &[Value], columns: &Indexed<'_>) -> Result<()> {
        let mut groups: Vec<(Kind, Vec<&Value>)> = Vec::new();
        for v in values {
            let Some(k) = kind(v) else {
                return Err(invalid(format!("field {:?} is compared with {v}: compare with a scalar", field.0)));
            };
            match groups.iter_mut().find(|(g, _)| *g == k) {
                Some((_, vs)) => vs.push(v),
                None => groups.push((k, vec![v])),
            }
        }
        if groups.is_empty() {
            self.push("0");
            return Ok(());
        }
        self.push("(");
        for (i, (k, vs)) in groups.iter().enumerate() {
            if i > 0 {
                self.push(" OR ");
            }
            if *k == Kind::Null {
                self.kind_check(field, Kind::Null)?;
                continue;
            }
            self.push("(");
            self.value_of(field, columns)?;
            self.push(" IN (");
            for (j, v) in vs.iter().enumerate() {
                if j > 0 {
                    self.push(", ");
                }
                self.bind(scalar_bind(v));
            }
            self.push(")");
            if *k != Kind::Text || !vs.iter().all(|v| v.as_str().is_some_and(plain_text)) {
                self.push(" AND ");
                self.kind_check(field, *k)?;
            }
            self.push(")");
        }
        self.push(")");
        Ok(())
    }

    fn join(&mut self, filters: &[Filter], by: &str, empty: &str, columns: &Indexed<'_>) -> Result<()> {
        if filters.is_empty() {
            self.push(empty);
            return Ok(());
        }
        self.push("(");
        for (i, f) in filters.iter().enumerate() {
            if i > 0 {
                self.push(by);
            }
            self.filter(f, columns)?;
        }
        self.push(")");
        Ok(())
    }
}

/// Whether every string from this one up to its successor is text that no
/// array or object renders as (JSON text begins with `[` or `{`), so a
/// comparison with it needs no check of the field's kind.
fn plain_text(s: &str) -> bool {
    !s.is_empty() && !s.starts_with(['[', '{'])
}

fn scalar_bind(v: &Value) -> Bind {
    match v {
        Value::Number(n) => n.as_i64().map_or_else(|| Bind::Real(n.as_f64().unwrap_or(0.0)), Bind::Int),
        Value::String(s) => Bind::Text(s.clone()),
        Value::Bool(b) => Bind::Int(i64::from(*b)),
        _ => Bind::Null,
    }
}

/// The least string greater than every string starting with `prefix`
/// (its last character, the next one up), if there is one.
fn successor(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = (u32::from(last) + 1..=u32::from(char::MAX)).find_map(char::from_u32);
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// What the store has indexed: each indexed path's generated column, and
/// the indexes declared for the query's collection (name, paths).
pub(crate) struct Indexed<'a> {
    pub(crate) columns: &'a std::collections::HashMap<String, String>,
    pub(crate) indexes: &'a [(String, Vec<String>)],
}

impl Indexed<'_> {
    /// The declared index that serves `query` best, if one does: the one
    /// whose leading fields the filter's top-level conditions pin down
    /// most (equal or `is_in`, then one range or prefix), else one whose
    /// first field is the query's first order field. SQLite is told to use
    /// it (`INDEXED BY`): without statistics its guesses favour the
    /// primary key, which every query also constrains.
    fn choose(&self, query: &Query) -> Result<Option<&str>> {
        let mut conjuncts = Vec::new();
        if let Some(f) = &query.filter {
            flatten_and(f, &mut conjuncts);
        }
        let mut constrained: Vec<(String, bool)> = Vec::new();
        for c in conjuncts {
            match c {
                Filter::Eq(f, v) if !v.is_null() => constrained.push((json_path(f)?, true)),
                Filter::In(f, vs) if !vs.is_empty() && vs.iter().all(|v| kind(v) == kind(&vs[0]) && !v.is_null()) => {
                    constrained.push((json_path(f)?, true));
                }
                Filter::Lt(f, _)
                | Filter::Le(f, _)
                | Filter::Gt(f, _)
                | Filter::Ge(f, _)
                | Filter::StartsWith(f, _) => {
                    constrained.push((json_path(f)?, false));
                }
                _ => {}
            }
        }
        let first_order = query.order.first().map(|o| json_path(&o.field)).transpose()?;
        let mut best: Option<(usize, &str)> = None;
        for (name, paths) in self.indexes {
            let mut score = 0;
            for path in paths {
                let equal = constrained.iter().any(|(p, eq)| p == path && *eq);
                let range = constrained.iter().any(|(p, eq)| p == path && !*eq);
                if equal {
                    score += 2;
                } else {
                    score += usize::from(range);
                    break;
                }
            }
            if score == 0 && first_order.as_ref() == paths.first() {
                score = 1;
            }
            if score > 0 && best.is_none_or(|(b, _)| score > b) {
                best = Some((score, name.as_str()));
            }
        }
        Ok(best.map(|(_, name)| name))
    }
}

fn flatten_and<'f>(filter: &'f Filter, out: &mut Vec<&'f Filter>) {
    match filter {
        Filter::And(all) => all.iter().for_each(|f| flatten_and(f, out)),
        one => out.push(one),
    }
}

/// What a query's statement selects: `id, doc`, then its order's values.
pub(crate) fn select(query: &Query, columns: &Indexed<'_>, count: bool, hint: bool) -> Result<Sql> {
    query.check()?;
    let mut sql = Sql::default();
    if count {
        sql.push("SELECT count(*)");
    } else {
        sql.push("SELECT id, doc");
        for o in &query.order {
            sql.push(", ");
            sql.value_of(&o.field, columns)?;
        }
    }
    sql.push(" FROM tide_docs");
    if let Some(index) = columns.choose(query)?.filter(|_| hint) {
        // The store's own name (`tide_ix_` and column numbers).
        sql.push(" INDEXED BY ");
        sql.push(index);
    }
    sql.push(" WHERE collection = ");
    sql.bind(Bind::Text(query.collection.clone()));
    sql.push(" AND deleted = 0");
    if let Some(f) = &query.filter {
        sql.push(" AND ");
        sql.filter(f, columns)?;
    }
    if count {
        return Ok(sql);
    }
    if let Some(after) = &query.after {
        let (values, id) = decode_cursor(after, query.order.len())?;
        sql.push(" AND ");
        after_clause(&mut sql, &query.order, &values, &id, columns)?;
    }
    sql.push(" ORDER BY ");
    for o in &query.order {
        sql.value_of(&o.field, columns)?;
        sql.push(if o.descending { " DESC, " } else { ", " });
    }
    sql.push("id LIMIT ");
    sql.bind(Bind::Int(i64::try_from(query.limit).unwrap_or(i64::MAX)));
    Ok(sql)
}

/// The rows after a cursor in the query's order: `(k1 after a1) OR (k1 IS
/// a1 AND (... (id > last id)))`.
fn after_clause(sql: &mut Sql, order: &[Order], values: &[SqlValue], id: &str, columns: &Indexed<'_>) -> Result<()> {
    let Some((o, rest)) = order.split_first() else {
        sql.push("id > ");
        sql.bind(Bind::Text(id.to_owned()));
        return Ok(());
    };
    let value = &values[0];
    sql.push("(");
    match (value, o.descending) {
        (SqlValue::Null, false) => {
            sql.value_of(&o.field, columns)?;
            sql.push(" IS NOT NULL");
        }
        (SqlValue::Null, true) => sql.push("0"),
        (v, false) => {
            sql.value_of(&o.field, columns)?;
            sql.push(" > ");
            sql.bind(v.bind());
        }
        (v, true) => {
            sql.push("(");
            sql.value_of(&o.field, columns)?;
            sql.push(" < ");
            sql.bind(v.bind());
            sql.push(" OR ");
            sql.value_of(&o.field, columns)?;
            sql.push(" IS NULL)");
        }
    }
    sql.push(" OR (");
    sql.value_of(&o.field, columns)?;
    sql.push(" IS ");
    sql.bind(value.bind());
    sql.push(" AND ");
    after_clause(sql, rest, &values[1..], id, columns)?;
    sql.push("))");
    Ok(())
}

impl SqlValue {
    fn bind(&self) -> Bind {
        match self {
            SqlValue::Null => Bind::Null,
            SqlValue::Int(i) => Bind::Int(*i),
            SqlValue::Real(r) => Bind::Real(*r),
            SqlValue::Text(t) => Bind::Text(t.clone()),
        }
    }
}

/// The cursor after a row with these order values and id.
pub(crate) fn encode_cursor(values: Vec<SqlValue>, id: String) -> QueryCursor {
    QueryCursor(serde_json::to_string(&(values, id)).expect("cursor values serialize"))
}

fn decode_cursor(cursor: &QueryCursor, fields: usize) -> Result<(Vec<SqlValue>, String)> {
    let bad = || invalid("the cursor is not one of this query's".into());
    let (values, id): (Vec<SqlValue>, String) = serde_json::from_str(&cursor.0).map_err(|_| bad())?;
    if values.len() != fields {
        return Err(bad());
    }
    Ok((values, id))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{Query, field, successor};

    #[test]
    fn a_prefix_has_a_successor_unless_it_is_all_max_chars() {
        assert_eq!(successor("ab").as_deref(), Some("ac"));
        assert_eq!(successor("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(successor("\u{D7FF}").as_deref(), Some("\u{E000}"));
        assert_eq!(successor(""), None);
        assert_eq!(successor("\u{10FFFF}"), None);
    }

    #[test]
    fn comparisons_hold_within_one_kind_only() {
        let doc = json!({"n": 2, "s": "2", "b": true, "z": null, "a": [1, "x"], "o": {"k": 5}});
        assert!(field("n").eq(2).matches(&doc));
        assert!(field("n").eq(2.0).matches(&doc));
        assert!(!field("s").eq(2).matches(&doc));
        assert!(!field("b").eq(1).matches(&doc));
        assert!(field("b").gt(false).matches(&doc));
        assert!(field("z").is_null().matches(&doc) && !field("missing").is_null().matches(&doc));
        assert!(field("missing").ne(1).matches(&doc));
        assert!(field("a").contains("x").matches(&doc) && !field("a").contains("1").matches(&doc));
        assert!(field("o.k").ge(5).matches(&doc) && !field("o.k.deeper").exists().matches(&doc));
        assert!(field("s").starts_with("").matches(&doc));
    }

    #[test]
    fn bad_paths_and_operands_are_refused_before_running() {
        let none = std::collections::HashMap::new();
        let columns = super::Indexed { columns: &none, indexes: &[] };
        let bad = [
            Query::new("c").filter(field("a..b").eq(1)),
            Query::new("c").filter(field("a\"b").eq(1)),
            Query::new("c").filter(field("a").lt(serde_json::Value::Null)),
            Query::new("c").filter(field("a").eq(json!([1]))),
        ];
        for q in bad {
            assert!(super::select(&q, &columns, false, true).is_err(), "{q:?}");
        }
    }
}
