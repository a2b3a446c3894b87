//! Splitting a collection between workers, and walking it in `_id` order.
//!
//! Documents are visited in ascending `_id` order, so "everything after the last `_id` done"
//! is the whole checkpoint. MongoDB compares values of different BSON types by a fixed type
//! order and a `$gt` only matches within one type bracket, so the resume filter adds the
//! brackets that sort after the last `_id`'s (collections with mixed `_id` types are walked
//! completely too).

use core::fmt;
use core::str::FromStr;

use bson::spec::ElementType;
use bson::{doc, Bson, Document};
use sha2::{Digest, Sha256};

use crate::error::{ArgumentError, Error, Result};

/// Which share of a collection one worker processes.
///
/// Every partition keeps its own checkpoint, so `N` workers can each run one partition of the
/// same job at the same time, on different machines.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
#[allow(clippy::large_enum_variant)] // one per run; boxing the bounds would only add noise
pub enum Partition {
    /// The whole collection.
    #[default]
    All,
    /// Documents whose `_id` hashes to `index` modulo `count` (0-based `index`). The hash is the
    /// first 8 bytes (big-endian) of SHA-256 over the `_id`'s BSON type byte followed by its
    /// value bytes, so every worker, on any machine, agrees on it.
    Hash {
        /// This worker's share, `0..count`.
        index: u32,
        /// The number of workers.
        count: u32,
    },
    /// Documents with `from <= _id < to` (either bound may be open). Bounds compare within their
    /// own BSON type, as MongoDB's range operators do: use them on collections whose `_id`s all
    /// have one type (typically ObjectId), e.g. along the chunk boundaries of a cluster sharded on
    /// `_id`.
    Range {
        /// Inclusive lower bound.
        from: Option<Bson>,
        /// Exclusive upper bound.
        to: Option<Bson>,
    },
}

impl Partition {
    /// The hash partition `index` of `count` (0-based).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] unless `index < count`.
    pub fn hash(index: u32, count: u32) -> Result<Self> {
        if count == 0 || index >= count {
            return Err(Error::from(ArgumentError::PartitionOutOfRange {
                index,
                count,
            }));
        }
        Ok(if count == 1 {
            Partition::All
        } else {
            Partition::Hash { index, count }
        })
    }

    /// A stable label naming the partition in checkpoints and reports: `all`, `3/8`, or
    /// `range:<16 hex digits of a hash of the bounds>`.
    #[must_use]
    pub fn label(&self) -> String {
        match self {
            Partition::All => "all".into(),
            Partition::Hash { index, count } => format!("{index}/{count}"),
            Partition::Range { from, to } => {
                let text = format!(
                    "{}|{}",
                    from.clone()
                        .map_or_else(String::new, |b| b.into_canonical_extjson().to_string()),
                    to.clone()
                        .map_or_else(String::new, |b| b.into_canonical_extjson().to_string()),
                );
                let h = Sha256::digest(text.as_bytes());
                let mut s = String::from("range:");
                for b in &h[..8] {
                    s.push_str(&format!("{b:02x}"));
                }
                s
            }
        }
    }

    /// The server-side filter restricting a scan to this partition (empty for hash partitions,
    /// which are selected on the client from `_id`s alone).
    pub(crate) fn filter(&self) -> Document {
        match self {
            Partition::Range { from, to } => {
                let mut cond = Document::new();
                if let Some(f) = from {
                    cond.insert("$gte", f.clone());
                }
                if let Some(t) = to {
                    cond.insert("$lt", t.clone());
                }
                if cond.is_empty() {
                    Document::new()
                } else {
                    doc! { "_id": cond }
                }
            }
            _ => Document::new(),
        }
    }

    /// Whether the document with this `_id` (type byte, value bytes) belongs to the partition;
    /// only hash partitions select on the client.
    pub(crate) fn owns(&self, id_type: u8, id_value: &[u8]) -> bool {
        match self {
            Partition::Hash { index, count } => {
                id_hash(id_type, id_value) % u64::from(*count) == u64::from(*index)
            }
            _ => true,
        }
    }

    /// How many times more `_id`s to scan than documents wanted, to fill a batch.
    pub(crate) fn spread(&self) -> usize {
        match self {
            Partition::Hash { count, .. } => *count as usize,
            _ => 1,
        }
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

impl FromStr for Partition {
    type Err = Error;

    /// Parses `i/N` (0-based `i`), or `all`.
    fn from_str(s: &str) -> Result<Self> {
        if s == "all" {
            return Ok(Partition::All);
        }
        let bad = || Error::from(ArgumentError::PartitionSyntax(s.to_owned()));
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let i: u32 = i.trim().parse().map_err(|_| bad())?;
        let n: u32 = n.trim().parse().map_err(|_| bad())?;
        Partition::hash(i, n)
    }
}

/// The partition hash of an `_id`: SHA-256 over its type byte and value bytes, first 8 bytes.
pub(crate) fn id_hash(id_type: u8, id_value: &[u8]) -> u64 {
    let mut h = Sha256::new();
    h.update([id_type]);
    h.update(id_value);
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}

/// MongoDB's canonical type order (`canonicalizeBSONType` in the server): types with equal
/// ranks compare by value, others by rank.
fn rank(t: ElementType) -> u8 {
    use ElementType as T;
    match t {
        T::MinKey => 0,
        T::Undefined => 1,
        T::Null => 2,
        T::Double | T::Int32 | T::Int64 | T::Decimal128 => 3,
        T::String | T::Symbol => 4,
        T::EmbeddedDocument => 5,
        T::Array => 6,
        T::Binary => 7,
        T::ObjectId => 8,
        T::Boolean => 9,
        T::DateTime => 10,
        T::Timestamp => 11,
        T::RegularExpression => 12,
        T::DbPointer => 13,
        T::JavaScriptCode => 14,
        T::JavaScriptCodeWithScope => 15,
        T::MaxKey => 16,
    }
}

/// `$type` aliases with their rank.
const TYPE_NAMES: &[(&str, ElementType)] = &[
    ("minKey", ElementType::MinKey),
    ("undefined", ElementType::Undefined),
    ("null", ElementType::Null),
    ("double", ElementType::Double),
    ("int", ElementType::Int32),
    ("long", ElementType::Int64),
    ("decimal", ElementType::Decimal128),
    ("string", ElementType::String),
    ("symbol", ElementType::Symbol),
    ("object", ElementType::EmbeddedDocument),
    ("array", ElementType::Array),
    ("binData", ElementType::Binary),
    ("objectId", ElementType::ObjectId),
    ("bool", ElementType::Boolean),
    ("date", ElementType::DateTime),
    ("timestamp", ElementType::Timestamp),
    ("regex", ElementType::RegularExpression),
    ("dbPointer", ElementType::DbPointer),
    ("javascript", ElementType::JavaScriptCode),
    ("javascriptWithScope", ElementType::JavaScriptCodeWithScope),
    ("maxKey", ElementType::MaxKey),
];

/// The filter for "every `_id` after `last` in MongoDB's sort order".
pub(crate) fn after(last: &Bson) -> Document {
    let r = rank(last.element_type());
    let later: Vec<Bson> = TYPE_NAMES
        .iter()
        .filter(|(_, t)| rank(*t) > r)
        .map(|(n, _)| Bson::String((*n).to_owned()))
        .collect();
    let gt = doc! { "_id": { "$gt": last.clone() } };
    if later.is_empty() {
        gt
    } else {
        doc! { "$or": [gt, { "_id": { "$type": later } }] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_label() {
        assert_eq!("0/1".parse::<Partition>().unwrap(), Partition::All);
        assert_eq!(
            "1/3".parse::<Partition>().unwrap(),
            Partition::Hash { index: 1, count: 3 }
        );
        assert_eq!("2/4".parse::<Partition>().unwrap().label(), "2/4");
        for bad in ["3/3", "1", "a/2", "1/0", "-1/2"] {
            assert!(bad.parse::<Partition>().is_err(), "{bad}");
        }
        let r = Partition::Range {
            from: Some(Bson::Int32(1)),
            to: None,
        };
        assert!(r.label().starts_with("range:"));
        assert_eq!(r.filter(), doc! { "_id": { "$gte": 1 } });
    }

    #[test]
    fn hash_partitions_cover_every_id_once() {
        let parts: Vec<Partition> = (0..3).map(|i| Partition::hash(i, 3).unwrap()).collect();
        let mut per = [0u32; 3];
        for n in 0..3000i32 {
            let owners: Vec<usize> = (0..3)
                .filter(|&p| parts[p].owns(0x10, &n.to_le_bytes()))
                .collect();
            assert_eq!(owners.len(), 1);
            per[owners[0]] += 1;
        }
        assert!(per.iter().all(|&c| c > 800), "{per:?}");
    }

    #[test]
    fn after_adds_later_type_brackets() {
        let f = after(&Bson::Int32(5));
        let types = f.get_array("$or").unwrap()[1]
            .as_document()
            .unwrap()
            .get_document("_id")
            .unwrap()
            .get_array("$type")
            .unwrap()
            .clone();
        assert!(types.contains(&Bson::String("objectId".into())));
        assert!(types.contains(&Bson::String("string".into())));
        assert!(!types.contains(&Bson::String("long".into())));
        assert!(!types.contains(&Bson::String("null".into())));
        assert_eq!(
            after(&Bson::MaxKey),
            doc! { "_id": { "$gt": Bson::MaxKey } }
        );
    }
}
