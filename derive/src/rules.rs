//! The schema rules, checked at compile time: the same verdicts as `Schema::builder().build()`
//! (and the TOML/JSON file format) in the library, on the rules a type's marks give.
//!
//! Plain `std`, no crate imports: the library's test `tests/derive_rules.rs` includes this file
//! and checks, case by case, that it accepts and refuses exactly what the builder does.

/// The suite names the library knows (compared as it parses them: ignoring ASCII case).
pub const SUITES: [&str; 4] = [
    "AES-256-GCM",
    "ChaCha20-Poly1305",
    "XChaCha20-Poly1305",
    "AES-256-SIV-deterministic",
];

/// The all-elements segment.
pub const EACH: &str = "$[]";

/// One field's rule as the marks give it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleSpec {
    /// The path as written (`tags.$[]`).
    pub path: String,
    /// The encryption key alias; `None` for an index-only field.
    pub key: Option<String>,
    /// A suite name.
    pub algorithm: Option<String>,
    /// Deterministic encryption.
    pub deterministic: bool,
    /// Bound to `_id`.
    pub bind_id: bool,
    /// Padding bucket.
    pub pad_to: Option<u64>,
    /// A blind index.
    pub blind_index: Option<IndexSpec>,
}

/// A blind index as the marks give it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexSpec {
    /// The index key alias.
    pub key: String,
    /// The sibling field's name.
    pub name: Option<String>,
    /// Bytes kept.
    pub truncate: Option<u64>,
}

/// The index of the suite `name` in [`SUITES`].
pub fn suite_index(name: &str) -> Option<usize> {
    SUITES.iter().position(|s| s.eq_ignore_ascii_case(name))
}

impl RuleSpec {
    /// Whether the value is encrypted deterministically.
    pub fn is_deterministic(&self) -> bool {
        self.deterministic || self.algorithm.as_deref().and_then(suite_index) == Some(3)
    }

    /// The path without `$[]` segments.
    pub fn normalized(&self) -> String {
        self.path
            .split('.')
            .filter(|s| *s != EACH)
            .collect::<Vec<_>>()
            .join(".")
    }

    /// Where the blind index is stored.
    pub fn blind_index_path(&self) -> Option<String> {
        let bi = self.blind_index.as_ref()?;
        let normalized = self.normalized();
        let (parent, leaf) = match normalized.rsplit_once('.') {
            Some((p, l)) => (Some(p.to_owned()), l.to_owned()),
            None => (None, normalized.clone()),
        };
        let name = bi.name.clone().unwrap_or_else(|| format!("{leaf}_bidx"));
        Some(match parent {
            Some(p) => format!("{p}.{name}"),
            None => name,
        })
    }
}

/// Checks one rule on its own; the reason on failure.
pub fn check_rule(r: &RuleSpec) -> Result<(), String> {
    let bad = |why: &str| Err(why.to_owned());
    if r.path.is_empty() {
        return bad("empty path");
    }
    let segs: Vec<&str> = r.path.split('.').collect();
    let mut each_element = false;
    for (i, s) in segs.iter().enumerate() {
        if s.is_empty() {
            return bad("empty path segment");
        }
        if *s == EACH {
            if i == 0 {
                return bad("a path cannot start with $[]");
            }
            if i == segs.len() - 1 {
                each_element = true;
            }
            continue;
        }
        if s.starts_with('$') {
            return bad("path segments cannot start with '$' (only a trailing $[] is allowed)");
        }
        if s.contains('\0') {
            return bad("path segments cannot contain NUL");
        }
    }
    if r.normalized().split('.').next() == Some("_id") {
        return bad("_id cannot be encrypted: it identifies and binds the document");
    }
    if let Some(a) = &r.algorithm {
        match suite_index(a) {
            None => {
                return Err(format!(
                    "unknown algorithm {a:?} (one of {})",
                    SUITES.join(", ")
                ))
            }
            Some(i) if r.deterministic && i != 3 => {
                return Err(format!(
                    "deterministic contradicts algorithm {a:?}, a randomized suite: give one of the two"
                ))
            }
            Some(_) => {}
        }
    }
    match &r.key {
        None if r.algorithm.is_some() || r.deterministic => return bad("an algorithm needs a key"),
        None if r.blind_index.is_none() => {
            return bad("a field needs a key (encryption), a blind index, or both")
        }
        None if r.bind_id || r.pad_to.is_some() => {
            return bad(
                "bind_id and pad_to need encryption (an index-only field stores no ciphertext)",
            )
        }
        Some(k) if k.is_empty() => return bad("empty key alias"),
        Some(_) if r.is_deterministic() && r.bind_id => {
            return bad("deterministic encryption cannot be bound to _id: equal values would no longer give equal ciphertexts, defeating equality queries")
        }
        _ => {}
    }
    if r.pad_to == Some(0) || r.pad_to.is_some_and(|p| p > 1 << 16) {
        return bad("pad_to must be between 1 and 65536 bytes");
    }
    if let Some(bi) = &r.blind_index {
        if bi.key.is_empty() {
            return bad("empty blind-index key alias");
        }
        if !(8..=32).contains(&bi.truncate.unwrap_or(32)) {
            return bad("blind-index truncation must be between 8 and 32 bytes");
        }
        if each_element {
            return bad("blind indexes on each element of an array ($[]) are not supported");
        }
        if let Some(n) = &bi.name {
            if n.is_empty() || n.contains('.') || n.starts_with('$') {
                return bad("blind-index name must be a plain field name");
            }
        }
        if r.key.as_deref() == Some(bi.key.as_str()) {
            return bad("use a different key alias for the blind index than for encryption");
        }
    }
    Ok(())
}

/// Whether one path is the other or lies inside it.
pub fn overlaps(a: &str, b: &str) -> bool {
    let inside =
        |x: &str, y: &str| x == y || (x.starts_with(y) && x.as_bytes().get(y.len()) == Some(&b'.'));
    inside(a, b) || inside(b, a)
}

/// Checks a whole set of rules and the owner field: each rule, then overlaps (a path inside or
/// equal to another, blind indexes included), then the owner. On failure, the index of the
/// rule to blame (`None`: the owner itself) and the reason.
pub fn check_schema(
    rules: &[RuleSpec],
    owner: Option<&str>,
) -> Result<(), (Option<usize>, String)> {
    for (i, r) in rules.iter().enumerate() {
        check_rule(r).map_err(|e| (Some(i), e))?;
    }
    let mut occupied: Vec<(String, usize)> = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        occupied.push((r.normalized(), i));
        if let Some(bi) = r.blind_index_path() {
            occupied.push((bi, i));
        }
    }
    for (a, (pa, ia)) in occupied.iter().enumerate() {
        for (pb, ib) in &occupied[a + 1..] {
            if overlaps(pa, pb) {
                let why = if ia == ib {
                    format!("its blind index {pb:?} overlaps its own path")
                } else if pa == pb {
                    format!("{pa:?} is also the path of another field (serialized names count)")
                } else {
                    format!(
                        "overlaps {:?} (one path is inside the other)",
                        rules[*ia].path
                    )
                };
                return Err((Some(*ib), why));
            }
        }
    }
    if let Some(o) = owner {
        if o.is_empty() || o.contains('.') || o.starts_with('$') || o == "_id" {
            return Err((
                None,
                "the owner field must be a top-level field name other than _id".to_owned(),
            ));
        }
        if let Some((_, i)) = occupied.iter().find(|(p, _)| overlaps(p, o)) {
            return Err((
                Some(*i),
                "the owner field cannot be encrypted or indexed (it is bound and filtered in clear)"
                    .to_owned(),
            ));
        }
    }
    Ok(())
}
