//! Schemas from types: the [`Encrypted`] trait, which `#[derive(Encrypted)]` (feature
//! `derive`, crate `fieldcrypt-derive`) implements from a serde type's field marks.
//!
//! ```text
//!  #[derive(Encrypted)] ──compile time: serde names, marks, every schema rule──▶ impl Encrypted
//!  T::schema() ──encrypted_fields: marked fields, nested types' fields prefixed──▶ SchemaBuilder
//! ```
//!
//! The derive checks each type's own rules when it compiles. What it cannot see — the marks of
//! the nested types a field holds — is put together here, when the schema is built: nested
//! types are found by their own `Encrypted` implementation (the [`__derive`] probe), paths are
//! prefixed with the field's serialized name, and the result goes through
//! [`Schema::builder`], which checks the whole again.

use crate::error::{Error, Result};
use crate::schema::{Field, Schema};

/// A type whose serialized documents have encrypted fields: its schema comes from the type.
///
/// Implemented by `#[derive(Encrypted)]` (docs/SCHEMA.md); a hand-written implementation lists
/// its fields in [`Encrypted::encrypted_fields`].
///
/// ```
/// # #[cfg(feature = "derive")] {
/// use fieldcrypt::{Encrypted, Field, Schema};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize, Encrypted)]
/// struct User {
///     name: String,
///     #[fieldcrypt(key = "pii", deterministic)]
///     email: String,
/// }
///
/// let by_hand = Schema::builder().field("email", Field::deterministic("pii")).build()?;
/// assert_eq!(User::schema().rules(), by_hand.rules());
/// # }
/// # Ok::<(), fieldcrypt::Error>(())
/// ```
pub trait Encrypted {
    /// Adds this type's field rules to `out`, with paths relative to the type's own document.
    fn encrypted_fields(out: &mut SchemaFields);

    /// The owner field of documents of this type, if they are owner-scoped.
    #[must_use]
    fn owner_field() -> Option<&'static str> {
        None
    }

    /// The schema of this type's documents.
    ///
    /// # Errors
    /// [`Error::Schema`] naming the path, for what the derive cannot check when it compiles a
    /// single type: rules of nested types that overlap the outer type's, a nested type with
    /// encrypted fields inside a map or a recursive type, a serialized name that is not a
    /// plain path segment.
    fn try_schema() -> Result<Schema> {
        let mut out = SchemaFields::default();
        Self::encrypted_fields(&mut out);
        out.into_schema(Self::owner_field())
    }

    /// The schema of this type's documents.
    ///
    /// # Panics
    /// Where [`Encrypted::try_schema`] fails: a fault in the type definitions (each type's own
    /// rules are compile errors), never in data. Use `try_schema` to handle it.
    #[must_use]
    fn schema() -> Schema {
        match Self::try_schema() {
            Ok(s) => s,
            Err(e) => panic!(
                "the schema of {} is invalid: {e}",
                std::any::type_name::<Self>()
            ),
        }
    }
}

/// The field rules a type contributes to a schema, collected by [`Encrypted::encrypted_fields`].
#[derive(Debug, Default)]
pub struct SchemaFields {
    rules: Vec<(String, Field)>,
    /// The serialized path of the document being described, as segments.
    prefix: Vec<String>,
    /// The nested types being described (recursion is followed once).
    stack: Vec<&'static str>,
    /// Types met again while being described.
    recursed: Vec<&'static str>,
    error: Option<Error>,
}

impl SchemaFields {
    fn full_path(&self, path: &str) -> String {
        let mut p = self.prefix.join(".");
        if !path.is_empty() {
            if !p.is_empty() {
                p.push('.');
            }
            p.push_str(path);
        }
        p
    }

    fn fail(&mut self, path: String, reason: impl Into<String>) {
        if self.error.is_none() {
            self.error = Some(Error::schema(path, reason));
        }
    }

    /// Adds a rule at `path` (dotted, relative to the document being described).
    pub fn field(&mut self, path: &str, field: Field) {
        let full = self.full_path(path);
        self.rules.push((full, field));
    }

    /// Adds the rules of the type `T` held at the serialized names `segments` (none: flattened
    /// into the document being described), prefixed with them.
    pub fn nested<T: Encrypted + ?Sized>(&mut self, segments: &[&str]) {
        let name = std::any::type_name::<T>();
        if self.stack.contains(&name) {
            self.recursed.push(name);
            return;
        }
        let before = self.rules.len();
        let depth = self.prefix.len();
        self.prefix.extend(segments.iter().map(|s| (*s).to_owned()));
        self.stack.push(name);
        T::encrypted_fields(self);
        self.stack.pop();
        let here = self.prefix.join(".");
        self.prefix.truncate(depth);
        let added = self.rules.len() > before;
        if added {
            if let Some(bad) = segments
                .iter()
                .find(|s| s.is_empty() || s.contains('.') || s.starts_with('$'))
            {
                self.fail(
                    here.clone(),
                    format!("the serialized name {bad:?} holds encrypted fields but is not a plain path segment"),
                );
            }
        }
        if self.recursed.contains(&name) {
            self.recursed.retain(|r| *r != name);
            if added {
                self.fail(
                    here,
                    format!("{name} is recursive and has encrypted fields: a schema cannot name its paths at every depth"),
                );
            }
        }
    }

    /// Refuses encrypted fields inside the values of the map at `segments`: map keys are data,
    /// not names a schema path can hold.
    pub fn map_of<T: Encrypted + ?Sized>(&mut self, segments: &[&str]) {
        self.unnameable::<T>(
            segments,
            "is held in a map: map keys are data, which schema paths cannot name",
        );
    }

    /// Refuses encrypted fields of `T` held at `segments` where no schema path can name them
    /// (`why`, e.g. in a map, a tuple, or serialized by a custom function): an error when the
    /// schema is built if `T` has any, nothing otherwise.
    pub fn unnameable<T: Encrypted + ?Sized>(&mut self, segments: &[&str], why: &str) {
        let before = self.rules.len();
        self.nested::<T>(segments);
        if self.rules.len() > before {
            let path = self.rules[before].0.clone();
            self.rules.truncate(before);
            self.fail(
                path,
                format!(
                    "{} has encrypted fields but {why}",
                    std::any::type_name::<T>()
                ),
            );
        }
    }

    /// Builds the schema: identical rules given twice (enum variants sharing a field) count
    /// once; everything else goes through [`Schema::builder`].
    fn into_schema(self, owner: Option<&str>) -> Result<Schema> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let mut b = Schema::builder();
        if let Some(o) = owner {
            b = b.owner_field(o);
        }
        let mut seen: Vec<&(String, Field)> = Vec::new();
        for r in &self.rules {
            if !seen.contains(&r) {
                seen.push(r);
                b = b.field(r.0.clone(), r.1.clone());
            }
        }
        b.build()
    }
}

/// The containers serde stores as their content or as an array of it: their element's fields,
/// at the same paths (schema paths go through arrays). Maps refuse encrypted values, whose paths
/// would be data. With these, a nested type is found by its `Encrypted` implementation whatever
/// the field's type is spelled as (an alias, a path), and `#[derive(Encrypted)]` refuses a marked
/// type held in any other generic type, whose serialized shape it cannot know.
mod containers {
    use std::borrow::Cow;
    use std::cell::RefCell;
    use std::collections::{
        BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, LinkedList, VecDeque,
    };
    use std::rc::Rc;
    use std::sync::{Arc, Mutex, RwLock};

    use super::{Encrypted, SchemaFields};

    macro_rules! stored_as_content {
        ($(impl<$($g:ident),*> for $ty:ty;)*) => {$(
            impl<$($g),*> Encrypted for $ty
            where
                T: Encrypted,
            {
                fn encrypted_fields(out: &mut SchemaFields) {
                    out.nested::<T>(&[]);
                }
            }
        )*};
    }

    stored_as_content! {
        impl<T> for Option<T>;
        impl<T> for Vec<T>;
        impl<T> for VecDeque<T>;
        impl<T> for LinkedList<T>;
        impl<T> for BTreeSet<T>;
        impl<T, S> for HashSet<T, S>;
        impl<T> for BinaryHeap<T>;
        impl<T> for RefCell<T>;
        impl<T> for Mutex<T>;
        impl<T> for RwLock<T>;
    }

    macro_rules! stored_as_content_unsized {
        ($($ty:ty;)*) => {$(
            impl<T: Encrypted + ?Sized> Encrypted for $ty {
                fn encrypted_fields(out: &mut SchemaFields) {
                    out.nested::<T>(&[]);
                }
            }
        )*};
    }

    stored_as_content_unsized! {
        Box<T>;
        Rc<T>;
        Arc<T>;
        &T;
    }

    impl<T: Encrypted> Encrypted for [T] {
        fn encrypted_fields(out: &mut SchemaFields) {
            out.nested::<T>(&[]);
        }
    }

    impl<T: Encrypted, const N: usize> Encrypted for [T; N] {
        fn encrypted_fields(out: &mut SchemaFields) {
            out.nested::<T>(&[]);
        }
    }

    impl<T: Encrypted + ToOwned + ?Sized> Encrypted for Cow<'_, T> {
        fn encrypted_fields(out: &mut SchemaFields) {
            out.nested::<T>(&[]);
        }
    }

    impl<K, V: Encrypted> Encrypted for BTreeMap<K, V> {
        fn encrypted_fields(out: &mut SchemaFields) {
            out.map_of::<V>(&[]);
        }
    }

    impl<K, V: Encrypted, S> Encrypted for HashMap<K, V, S> {
        fn encrypted_fields(out: &mut SchemaFields) {
            out.map_of::<V>(&[]);
        }
    }

    /// Serialized as nothing: no fields, whatever `T` is.
    impl<T: ?Sized> Encrypted for core::marker::PhantomData<T> {
        fn encrypted_fields(_out: &mut SchemaFields) {}
    }
}

/// What `#[derive(Encrypted)]` expands to refers to this module; not an API.
#[doc(hidden)]
pub mod __derive {
    use super::{Encrypted, SchemaFields};

    /// Finds out, where the derive expands, whether a field's type implements [`Encrypted`]:
    /// method resolution picks [`ViaEncrypted`] on `Probe<T>` when it does, [`ViaPlain`] on
    /// `&Probe<T>` otherwise.
    pub struct Probe<T: ?Sized>(core::marker::PhantomData<*const T>);

    impl<T: ?Sized> Default for Probe<T> {
        fn default() -> Self {
            Self::new()
        }
    }

    impl<T: ?Sized> Probe<T> {
        /// A probe.
        #[must_use]
        pub const fn new() -> Self {
            Probe(core::marker::PhantomData)
        }
    }

    /// The probe of a type with encrypted fields.
    pub trait ViaEncrypted {
        /// [`SchemaFields::nested`].
        fn nested_into(&self, out: &mut SchemaFields, segments: &[&str]);
        /// [`SchemaFields::unnameable`].
        fn unnameable_into(&self, out: &mut SchemaFields, segments: &[&str], why: &str);
        /// Whether the type implements [`Encrypted`]: here, yes.
        fn is_encrypted(&self) -> bool {
            true
        }
    }

    impl<T: Encrypted + ?Sized> ViaEncrypted for Probe<T> {
        fn nested_into(&self, out: &mut SchemaFields, segments: &[&str]) {
            out.nested::<T>(segments);
        }
        fn unnameable_into(&self, out: &mut SchemaFields, segments: &[&str], why: &str) {
            out.unnameable::<T>(segments, why);
        }
    }

    /// The probe of any other type: nothing to add.
    pub trait ViaPlain {
        /// Adds nothing.
        fn nested_into(&self, _out: &mut SchemaFields, _segments: &[&str]) {}
        /// Adds nothing.
        fn unnameable_into(&self, _out: &mut SchemaFields, _segments: &[&str], _why: &str) {}
        /// Whether the type implements [`Encrypted`]: here, no.
        fn is_encrypted(&self) -> bool {
            false
        }
    }

    impl<T: ?Sized> ViaPlain for &Probe<T> {}
}
