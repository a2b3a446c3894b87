//! Per-tenant data keys: the same schema, with every key alias suffixed by the tenant, so each
//! tenant's data is under its own keys and destroying them shreds exactly that tenant's data.
//!
//! The core schema names one alias per field; per-document aliases are not part of it. A
//! tenant-scoped handle therefore encrypts with a derived schema in which alias `pii` becomes
//! `pii/<tenant>`, where `<tenant>` is the owner value's label (`acme` for the string "acme",
//! `int:42`, `oid:<hex>`, `s:<string>` for a string containing `:`; see [`label`]). Decryption
//! is unchanged (envelopes name their key by id).

use bson::Bson;

use crate::error::{ArgumentError, Error, Result};
use crate::schema::{Field, Schema};

/// The alias of `alias` for `tenant`: `<alias>/<tenant>`.
#[must_use]
pub fn tenant_alias(alias: &str, tenant: &str) -> String {
    format!("{alias}/{tenant}")
}

fn check_tenant(tenant: &str) -> Result<()> {
    if tenant.is_empty() || tenant.contains(['/', '\0']) {
        return Err(Error::from(ArgumentError::TenantName));
    }
    Ok(())
}

/// `schema` with every key alias (encryption and blind index) replaced by its
/// [`tenant_alias`] for `tenant`; paths, suites, bindings and the owner field are unchanged.
///
/// # Errors
/// [`Error::InvalidArgument`] for an empty tenant name or one containing `/` (which would make
/// `alias/tenant` ambiguous).
pub fn tenant_schema(schema: &Schema, tenant: &str) -> Result<Schema> {
    check_tenant(tenant)?;
    let mut b = Schema::builder();
    if let Some(owner) = schema.owner_field() {
        b = b.owner_field(owner);
    }
    for rule in schema.rules() {
        let mut field: Field = rule.field.clone();
        if let Some(e) = field.encrypt.as_mut() {
            e.key = tenant_alias(&e.key, tenant);
        }
        if let Some(bi) = field.blind_index.as_mut() {
            bi.key = tenant_alias(&bi.key, tenant);
        }
        b = b.field(rule.path.clone(), field);
    }
    b.build()
}

/// The aliases a tenant needs keys for (create them with e.g. `InMemoryKeyring::generate`;
/// destroy all their keys to crypto-shred the tenant).
///
/// # Errors
/// As [`tenant_schema`].
pub fn tenant_aliases(schema: &Schema, tenant: &str) -> Result<Vec<String>> {
    check_tenant(tenant)?;
    let mut out: Vec<String> = Vec::new();
    for rule in schema.rules() {
        let aliases = rule
            .field
            .encrypt
            .as_ref()
            .map(|e| &e.key)
            .into_iter()
            .chain(rule.field.blind_index.as_ref().map(|b| &b.key));
        for a in aliases {
            let t = tenant_alias(a, tenant);
            if !out.contains(&t) {
                out.push(t);
            }
        }
    }
    Ok(out)
}

/// The tenant label of an owner value, which names the tenant's keys (`<alias>/<label>`).
/// Owners that MongoDB's filters tell apart get different labels, so they never share keys
/// (and shredding one never shreds another):
///
/// - a string without `:` is its own label (`acme`);
/// - a string containing `:` is `s:<string>`;
/// - an integer is `int:<decimal>`: Int32 and Int64 of one value are one owner to MongoDB's
///   equality (the owner filter `{tenant: 123}` matches both), so they are one tenant;
/// - an ObjectId is `oid:<hex>` (not the label of the string of its hex digits).
///
/// Every typed label contains `:` and no plain string label does, so no two owners collide.
/// The key vault allows any alias without NUL; its keyAltNames (`<alias>:v<n>`) stay unique
/// since the version is read from the right.
pub(super) fn label(owner: &Bson) -> Result<String> {
    match owner {
        Bson::String(s) if s.contains(':') => Ok(format!("s:{s}")),
        Bson::String(s) => Ok(s.clone()),
        Bson::ObjectId(o) => Ok(format!("oid:{}", o.to_hex())),
        Bson::Int32(n) => Ok(format!("int:{n}")),
        Bson::Int64(n) => Ok(format!("int:{n}")),
        _ => Err(Error::from(ArgumentError::TenantOwnerType)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::BlindIndex;

    #[test]
    fn aliases_are_suffixed_and_everything_else_kept() {
        let s = Schema::builder()
            .owner_field("tenant")
            .field("a", Field::randomized("pii").bind_id())
            .field(
                "b",
                Field::deterministic("det").with_blind_index(BlindIndex::new("idx")),
            )
            .build()
            .unwrap();
        let t = tenant_schema(&s, "acme").unwrap();
        assert_eq!(t.owner_field(), Some("tenant"));
        let a = t.rule("a").unwrap();
        assert_eq!(a.field.encrypt.as_ref().unwrap().key, "pii/acme");
        assert!(a.field.bind_id);
        let b = t.rule("b").unwrap();
        assert_eq!(b.field.blind_index.as_ref().unwrap().key, "idx/acme");
        assert_eq!(
            tenant_aliases(&s, "acme").unwrap(),
            ["pii/acme", "det/acme", "idx/acme"]
        );
        assert!(tenant_schema(&s, "a/b").is_err());
        assert!(tenant_schema(&s, "").is_err());
        assert!(label(&Bson::Double(1.0)).is_err());
    }

    #[test]
    fn owners_of_different_types_get_different_labels() {
        let oid = bson::oid::ObjectId::new();
        let owners = [
            Bson::String("123".into()),
            Bson::Int32(123),
            Bson::ObjectId(oid),
            Bson::String(oid.to_hex()),
            Bson::String("int:123".into()),
            Bson::String(format!("oid:{}", oid.to_hex())),
            Bson::String("s:x".into()),
            Bson::String("x".into()),
        ];
        let labels: Vec<String> = owners.iter().map(|o| label(o).unwrap()).collect();
        for (i, a) in labels.iter().enumerate() {
            for b in &labels[i + 1..] {
                assert_ne!(a, b, "{owners:?}");
            }
        }
        assert_eq!(labels[0], "123"); // plain strings keep their label
        assert_eq!(labels[1], "int:123");
        assert_eq!(label(&Bson::Int64(123)).unwrap(), "int:123");
        assert_eq!(labels[2], format!("oid:{}", oid.to_hex()));
        assert_eq!(labels[4], "s:int:123");
        assert!(label(&Bson::String("a/b".into())).is_ok_and(|l| check_tenant(&l).is_err()));
        assert!(check_tenant("a\0b").is_err());
    }
}
