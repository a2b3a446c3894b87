//! What the rewriter tests share: a schema with every kind of field, and ways to read results.

use std::sync::Arc;

use bson::spec::BinarySubtype;
use bson::{Bson, Document};

use crate::envelope::ENVELOPE_SUBTYPE;
use crate::error::{Error, Result};
use crate::keyring::InMemoryKeyring;
use crate::schema::{BlindIndex, Field, Schema};
use crate::transform::{Context, Cryptor};

pub(super) fn is_envelope(v: &Bson) -> bool {
    matches!(v, Bson::Binary(b) if b.subtype == BinarySubtype::from(ENVELOPE_SUBTYPE))
}

pub(super) struct Fixture {
    pub(super) cryptor: Cryptor,
    pub(super) ctx: Context,
    pub(super) ring: Arc<InMemoryKeyring>,
}

pub(super) fn fixture(owner: bool) -> Fixture {
    let ring = Arc::new(InMemoryKeyring::new());
    for a in ["pii", "det", "idx"] {
        ring.generate(a);
    }
    let mut b = Schema::builder()
        .field("ssn", Field::randomized("pii").bind_id())
        .field("email", Field::deterministic("det"))
        .field("profile.phone", Field::deterministic("det"))
        .field(
            "name",
            Field::randomized("pii").with_blind_index(BlindIndex::new("idx")),
        )
        .field("token", Field::blind_index_only(BlindIndex::new("idx")))
        .field("tags.$[]", Field::deterministic("det"))
        .field("notes.$[]", Field::randomized("pii"))
        .field("addresses.street", Field::deterministic("det"));
    if owner {
        b = b.owner_field("tenant");
    }
    let schema = b.build().unwrap();
    let keyring: Arc<dyn crate::keyring::Keyring> = ring.clone();
    let mut ctx = Context::namespace("db.c");
    if owner {
        ctx = ctx.with_owner_field("tenant");
    }
    Fixture {
        cryptor: Cryptor::with_shared(keyring, Arc::new(schema)),
        ctx,
        ring,
    }
}

pub(super) fn refused(r: Result<impl std::fmt::Debug>) -> (String, String) {
    match r {
        Err(Error::UnsupportedQuery {
            operator, field, ..
        }) => (operator, field),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

pub(super) fn in_list(d: &Document, key: &str, op: &str) -> Vec<Bson> {
    d.get_document(key)
        .unwrap_or_else(|_| panic!("{key} missing in {d}"))
        .get_array(op)
        .unwrap()
        .clone()
}

/// Every encrypted path of the fixture, as refusals concerning the whole document name them.
pub(super) const ALL: &str =
    "ssn, email, profile.phone, name, token, tags, notes, addresses.street";
