//! Access rules: which collections a principal may read and which writes it
//! may make (PROTOCOL.md §15).
//!
//! Without rules a principal reads and writes everything in its namespace.
//! With them, a page, a digest, a fetch and a repair answer only collections
//! the principal may read, and a write it may not make is answered per op
//! `rejected` with code `forbidden` and the reason.

use std::collections::BTreeSet;
use std::path::Path;

use serde::Deserialize;
use tide_core::Op;

use crate::auth::Principal;

/// The collections a principal may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readable {
    /// Every collection of its namespace.
    All,
    /// These collections only.
    Only(BTreeSet<String>),
}

impl Readable {
    /// Whether `collection` is readable.
    pub fn contains(&self, collection: &str) -> bool {
        match self {
            Self::All => true,
            Self::Only(set) => set.contains(collection),
        }
    }

    /// As the response's `readable` field: absent for every collection.
    pub(crate) fn to_wire(&self) -> Option<Vec<String>> {
        match self {
            Self::All => None,
            Self::Only(set) => Some(set.iter().cloned().collect()),
        }
    }
}

/// An embedding application's access rules. Both calls run for every
/// request (`may_write` once per op, inside the write group), so they must
/// be quick and must not block.
pub trait AccessRules: Send + Sync + 'static {
    /// The collections `principal` may read.
    fn readable(&self, principal: &Principal) -> Readable;

    /// Whether `principal` may make the write `op`; the error is the reason
    /// the client is given.
    ///
    /// # Errors
    ///
    /// The reason the write is refused.
    fn may_write(&self, principal: &Principal, op: &Op) -> Result<(), String>;
}

/// What a request may read: the principal's readable collections, and of
/// them the ones its subscription names (`collections`, absent for all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scope {
    pub(crate) readable: Readable,
    /// The collections a page and the roots cover; `None` for every one.
    pub(crate) collections: Option<Vec<String>>,
}

impl Scope {
    /// The scope of a request from `principal` asking for `subscribed`.
    pub(crate) fn of(rules: Option<&dyn AccessRules>, principal: &Principal, subscribed: Option<&[String]>) -> Self {
        let readable = rules.map_or(Readable::All, |r| r.readable(principal));
        let collections = match (&readable, subscribed) {
            (Readable::All, None) => None,
            (Readable::All, Some(s)) => Some(s.to_vec()),
            (Readable::Only(set), None) => Some(set.iter().cloned().collect()),
            (Readable::Only(set), Some(s)) => Some(s.iter().filter(|c| set.contains(*c)).cloned().collect()),
        };
        Self { readable, collections }
    }

    /// The collections as a JSON array, for an SQLite statement (`None`: all).
    pub(crate) fn json(&self) -> Option<String> {
        self.collections.as_ref().map(|c| serde_json::to_string(c).expect("names serialize"))
    }
}

/// Why a rules file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("access rules {path}: {message}")]
pub struct RulesError {
    path: String,
    message: String,
}

/// Access rules from a TOML file (`tide-server --rules FILE`): a list of
/// `[[rule]]` tables. A principal's rules are those whose `principal` is its
/// id or `"*"`; it may read the union of their `read` lists and make a
/// write when one of them lists the collection in `write` (and the id
/// starts with its `id_prefix`, when the rule has one). `"*"` in a list
/// means every collection, and `{principal}` in a name or a prefix stands
/// for the principal's id. A principal no rule names reads and writes
/// nothing.
///
/// ```toml
/// # Everyone shares "public" and has a private "notes-<id>".
/// [[rule]]
/// principal = "*"
/// read = ["public", "notes-{principal}"]
/// write = ["public", "notes-{principal}"]
///
/// # Everyone reads all posts and writes only ids under its own prefix.
/// [[rule]]
/// principal = "*"
/// read = ["posts"]
/// write = ["posts"]
/// id_prefix = "{principal}/"
///
/// [[rule]]
/// principal = "admin"
/// read = ["*"]
/// write = ["*"]
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesFile {
    #[serde(rename = "rule", default)]
    rules: Vec<Rule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    principal: String,
    #[serde(default)]
    read: Vec<String>,
    #[serde(default)]
    write: Vec<String>,
    id_prefix: Option<String>,
}

/// What `{principal}` in a rule stands for.
const PRINCIPAL: &str = "{principal}";

fn expand(template: &str, principal: &Principal) -> String {
    template.replace(PRINCIPAL, &principal.id)
}

impl Rule {
    fn applies(&self, principal: &Principal) -> bool {
        self.principal == "*" || self.principal == principal.id
    }

    fn names(list: &[String], collection: &str, principal: &Principal) -> bool {
        list.iter().any(|c| c == "*" || expand(c, principal) == collection)
    }
}

impl RulesFile {
    /// Reads and checks the rules at `path`.
    ///
    /// # Errors
    ///
    /// The file cannot be read, is not TOML, has unknown keys, or names an
    /// invalid collection, an empty principal or an empty `id_prefix`.
    pub fn load(path: &Path) -> Result<Self, RulesError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RulesError { path: path.display().to_string(), message: e.to_string() })?;
        Self::parse(&text).map_err(|message| RulesError { path: path.display().to_string(), message })
    }

    /// Parses and checks rules given as TOML text.
    ///
    /// # Errors
    ///
    /// As [`RulesFile::load`], the message naming the rule at fault.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        let limits = tide_core::Limits::default();
        for (i, rule) in file.rules.iter().enumerate() {
            let at = |what: String| format!("rule {} (principal {:?}): {what}", i + 1, rule.principal);
            if rule.principal.is_empty() {
                return Err(at("`principal` is empty; use \"*\" for everyone".into()));
            }
            for name in rule.read.iter().chain(&rule.write).filter(|c| *c != "*") {
                // Checked with a one-byte id in place of `{principal}`.
                limits.check_collection(&name.replace(PRINCIPAL, "p")).map_err(|v| at(v.message))?;
            }
            if rule.id_prefix.as_deref() == Some("") {
                return Err(at("`id_prefix` is empty; leave it out for any id".into()));
            }
        }
        Ok(file)
    }

    /// How many rules the file holds.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether the file holds no rule (everyone reads and writes nothing).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

impl AccessRules for RulesFile {
    fn readable(&self, principal: &Principal) -> Readable {
        let mut set = BTreeSet::new();
        for rule in self.rules.iter().filter(|r| r.applies(principal)) {
            for name in &rule.read {
                if name == "*" {
                    return Readable::All;
                }
                set.insert(expand(name, principal));
            }
        }
        Readable::Only(set)
    }

    fn may_write(&self, principal: &Principal, op: &Op) -> Result<(), String> {
        let mut prefixes = Vec::new();
        for rule in
            self.rules.iter().filter(|r| r.applies(principal) && Rule::names(&r.write, &op.collection, principal))
        {
            match &rule.id_prefix {
                None => return Ok(()),
                Some(prefix) => {
                    let prefix = expand(prefix, principal);
                    if op.id.starts_with(&prefix) {
                        return Ok(());
                    }
                    prefixes.push(prefix);
                }
            }
        }
        if prefixes.is_empty() {
            Err(format!("principal {:?} may not write collection {:?}", principal.id, op.collection))
        } else {
            Err(format!(
                "principal {:?} may write in collection {:?} only ids starting with {}",
                principal.id,
                op.collection,
                prefixes.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(" or ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use tide_core::{Op, Payload, Stamp};

    use super::{AccessRules, Readable, RulesFile, Scope};
    use crate::auth::{Namespace, Principal};

    const RULES: &str = r#"
        [[rule]]
        principal = "*"
        read = ["public", "notes-{principal}"]
        write = ["public", "notes-{principal}"]

        [[rule]]
        principal = "*"
        read = ["posts"]
        write = ["posts"]
        id_prefix = "{principal}/"

        [[rule]]
        principal = "admin"
        read = ["*"]
        write = ["*"]
    "#;

    fn who(id: &str) -> Principal {
        Principal { id: id.into(), namespace: Namespace::new("ns") }
    }

    fn delete(collection: &str, id: &str) -> Op {
        Op {
            collection: collection.into(),
            id: id.into(),
            stamp: Stamp::new(1, "n"),
            payload: Payload::Delete,
            op_id: None,
        }
    }

    #[test]
    fn a_principal_reads_the_union_of_its_rules() {
        let rules = RulesFile::parse(RULES).unwrap();
        let names = |set: &[&str]| Readable::Only(set.iter().map(|s| (*s).to_owned()).collect());
        assert_eq!(rules.readable(&who("ann")), names(&["notes-ann", "posts", "public"]));
        assert_eq!(rules.readable(&who("admin")), Readable::All);
        let nobody = RulesFile::parse("[[rule]]\nprincipal = \"ann\"\nread = [\"x\"]").unwrap();
        assert_eq!(nobody.readable(&who("bob")), names(&[]));
    }

    #[test]
    fn writes_need_a_rule_naming_the_collection_and_its_prefix() {
        let rules = RulesFile::parse(RULES).unwrap();
        assert_eq!(rules.may_write(&who("ann"), &delete("notes-ann", "1")), Ok(()));
        assert_eq!(rules.may_write(&who("ann"), &delete("posts", "ann/1")), Ok(()));
        let other = rules.may_write(&who("ann"), &delete("notes-bob", "1")).unwrap_err();
        assert_eq!(other, r#"principal "ann" may not write collection "notes-bob""#);
        let prefix = rules.may_write(&who("ann"), &delete("posts", "bob/1")).unwrap_err();
        assert_eq!(prefix, r#"principal "ann" may write in collection "posts" only ids starting with "ann/""#);
        assert_eq!(rules.may_write(&who("admin"), &delete("anything", "x")), Ok(()));
    }

    #[test]
    fn a_scope_is_the_readable_part_of_the_subscription() {
        let rules = RulesFile::parse(RULES).unwrap();
        let subscribed = ["public".to_owned(), "notes-bob".to_owned()];
        let scope = Scope::of(Some(&rules), &who("ann"), Some(&subscribed));
        assert_eq!(scope.collections, Some(vec!["public".to_owned()]));
        assert_eq!(scope.json().as_deref(), Some(r#"["public"]"#));
        assert_eq!(Scope::of(None, &who("ann"), None), Scope { readable: Readable::All, collections: None });
        let all = Scope::of(Some(&rules), &who("ann"), None);
        assert_eq!(all.collections.map(|c| c.len()), Some(3));
    }

    #[test]
    fn bad_rules_are_refused_with_the_rule_at_fault() {
        let err = |text: &str| RulesFile::parse(text).unwrap_err();
        assert!(err("[[rule]]\nprincipal = \"\"").contains("rule 1"), "empty principal");
        assert!(err("[[rule]]\nprincipal = \"a\"\nread = [\"a/b\"]").contains("rule 1 (principal \"a\")"));
        assert!(err("[[rule]]\nprincipal = \"a\"\nid_prefix = \"\"").contains("`id_prefix` is empty"));
        assert!(err("[[rule]]\nprincipal = \"a\"\nreed = [\"x\"]").contains("reed"), "unknown key");
        assert!(RulesFile::parse("[[rule]\n").is_err(), "not TOML");
    }
}
