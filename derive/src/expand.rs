//! From a type's definition to its `impl Encrypted`: where serde puts each field, which
//! fields are marked, the schema rules checked on them (a compile error on the field), and
//! the code that adds them — and the fields of nested types — to a `SchemaFields`.

use proc_macro2::{Span, TokenStream};
use quote::quote;
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, GenericArgument, PathArguments, Type};

use crate::attr::{self, Marks};
use crate::case::RenameRule;
use crate::rules::{self, IndexSpec, RuleSpec};

/// One marked field: its rule, where to point an error, the code that builds its `Field`.
struct Local {
    spec: RuleSpec,
    span: Span,
}

/// What the expansion adds, in field order.
enum Stmt {
    Field(String, TokenStream),
    /// The type's own marks (through its `Encrypted` implementation), under the segments.
    Nested(Vec<String>, Type),
    /// A type whose marks no path can name (why): an error when the schema is built, if it
    /// has any.
    Unnameable(Vec<String>, Type, String),
    /// `inner`, a type argument of `outer`: unnameable when `outer` does not implement
    /// `Encrypted` (a wrapper whose serialized shape is unknown here).
    Hidden {
        segs: Vec<String>,
        outer: Type,
        inner: Type,
    },
}

/// How an unmarked value is stored.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stored {
    /// As itself.
    Plain,
    /// As one element of an array of differently typed values (a tuple's).
    Element,
    /// By a function of its own (`serde(with)`, `serialize_with`).
    Custom,
}

const IN_TUPLE: &str =
    "is held in a tuple, whose elements are stored as an array a schema path cannot tell apart: use a struct with named fields";
const CUSTOM: &str =
    "is serialized by a function of its own (serde `with`/`serialize_with`), so where its fields are stored is unknown: mark the field itself, or serialize it as it is";

#[derive(Default)]
struct Cx {
    locals: Vec<Local>,
    stmts: Vec<Stmt>,
    /// The serialized paths of every stored field (marked or not), for blind-index and owner
    /// checks.
    stored: Vec<String>,
    errors: Vec<syn::Error>,
}

fn join(prefix: &[String], name: &str) -> String {
    let mut segs = prefix.to_vec();
    segs.push(name.to_owned());
    segs.join(".")
}

impl Cx {
    fn error(&mut self, span: Span, msg: impl std::fmt::Display) {
        self.errors.push(syn::Error::new(span, msg));
    }

    /// A named field of a struct or struct variant, stored at `prefix.<name>`.
    fn named(&mut self, field: &syn::Field, prefix: &[String], rule: Option<RenameRule>) {
        let Some(ident) = &field.ident else { return };
        let span = ident.span();
        let (serde, marks) = match (attr::serde_field(&field.attrs), attr::marks(&field.attrs)) {
            (Ok(s), Ok(m)) => (s, m),
            (Err(e), _) | (_, Err(e)) => return self.errors.push(e),
        };
        let name = serde.rename.clone().unwrap_or_else(|| {
            let raw = ident.unraw().to_string();
            rule.map_or_else(|| raw.clone(), |r| r.field(&raw))
        });
        let marked = marks.span.is_some();
        if serde.skip_serializing {
            if marked {
                self.error(
                    span,
                    "serde skips this field when serializing, so it is never stored: remove the fieldcrypt mark",
                );
            }
            return;
        }
        if serde.flatten {
            if marked {
                self.error(
                    span,
                    "a flattened field is not stored as a value of its own: mark the fields of its type instead",
                );
            } else {
                self.probe(&field.ty, prefix.to_vec(), stored(&serde));
            }
            return;
        }
        let path = join(prefix, &name);
        self.stored.push(path.clone());
        if marked {
            if name.contains('.') {
                self.error(
                    span,
                    format!("the serialized name {name:?} contains '.', which a schema path would read as nesting"),
                );
                return;
            }
            self.mark(marks, path, &field.ty, span);
        } else {
            let mut segs = prefix.to_vec();
            segs.push(name);
            self.probe(&field.ty, segs, stored(&serde));
        }
    }

    /// A value stored at `prefix` itself: a newtype, a newtype variant or a tuple element
    /// (`element`: one of several, stored as array elements).
    fn value(&mut self, field: &syn::Field, prefix: &[String], element: bool) {
        let span = field.ty.span();
        let (serde, marks) = match (attr::serde_field(&field.attrs), attr::marks(&field.attrs)) {
            (Ok(s), Ok(m)) => (s, m),
            (Err(e), _) | (_, Err(e)) => return self.errors.push(e),
        };
        if serde.skip_serializing {
            return;
        }
        if marks.span.is_some() {
            if element {
                self.error(
                    span,
                    "tuple fields are stored as array elements, which a schema path cannot tell apart: use named fields",
                );
            } else if prefix.is_empty() {
                self.error(
                    span,
                    "this value is stored as the document itself: mark the field that holds this type instead",
                );
            } else {
                let path = prefix.join(".");
                self.stored.push(path.clone());
                self.mark(marks, path, &field.ty, span);
            }
            return;
        }
        let how = if element {
            Stored::Element
        } else {
            stored(&serde)
        };
        self.probe(&field.ty, prefix.to_vec(), how);
    }

    fn mark(&mut self, m: Marks, path: String, ty: &Type, span: Span) {
        if m.blind_index.is_none() && m.index_only {
            return self.error(span, "index_only needs a blind_index(key = \"...\")");
        }
        if m.key.is_some() && m.index_only {
            return self.error(
                span,
                "index_only drops the value, so it takes no encryption key: remove `key` or `index_only`",
            );
        }
        if m.key.is_none() && m.blind_index.is_some() && !m.index_only {
            return self.error(
                span,
                "a blind index without a key stores no value: add `key = \"...\"` to keep it encrypted, or say `index_only`",
            );
        }
        if m.key.is_none() && m.blind_index.is_none() {
            return self.error(
                span,
                "a marked field needs `key = \"<alias>\"`, a `blind_index(...)`, or both",
            );
        }
        if m.each && !is_sequence(ty) {
            return self.error(
                span,
                "`each` encrypts each element of an array: the field must be a sequence (Vec, array, set, or an Option of one)",
            );
        }
        let path = if m.each {
            format!("{path}.{}", rules::EACH)
        } else {
            path
        };
        let spec = RuleSpec {
            path,
            key: m.key,
            algorithm: m.algorithm.map(|(a, _)| a),
            deterministic: m.deterministic,
            bind_id: m.bind_id,
            pad_to: m.pad_to,
            blind_index: m.blind_index.map(|b| IndexSpec {
                key: b.key,
                name: b.name,
                truncate: b.truncate,
            }),
        };
        self.locals.push(Local { spec, span });
    }

    /// A field that is not marked: its type's own marks, if it has any, prefixed with `segs`,
    /// found through the type's `Encrypted` implementation (the library implements it for the
    /// containers serde stores as their content); and, written out in the type, tuples and
    /// other generic types holding a marked type, which are refused when the schema is built.
    fn probe(&mut self, ty: &Type, segs: Vec<String>, how: Stored) {
        match how {
            Stored::Plain => {
                self.stmts.push(Stmt::Nested(segs.clone(), ty.clone()));
                self.hidden(ty, &segs);
            }
            Stored::Element => {
                self.stmts
                    .push(Stmt::Unnameable(segs, ty.clone(), IN_TUPLE.to_owned()))
            }
            Stored::Custom => {
                self.stmts
                    .push(Stmt::Unnameable(segs, ty.clone(), CUSTOM.to_owned()))
            }
        }
    }

    /// The types written inside `ty` whose marks `ty`'s own implementation would not reach.
    fn hidden(&mut self, ty: &Type, segs: &[String]) {
        match ty {
            Type::Reference(r) => self.hidden(&r.elem, segs),
            Type::Paren(p) => self.hidden(&p.elem, segs),
            Type::Group(g) => self.hidden(&g.elem, segs),
            Type::Array(a) => self.hidden(&a.elem, segs),
            Type::Slice(s) => self.hidden(&s.elem, segs),
            Type::Tuple(t) => {
                for e in &t.elems {
                    self.stmts.push(Stmt::Unnameable(
                        segs.to_vec(),
                        e.clone(),
                        IN_TUPLE.to_owned(),
                    ));
                    self.hidden(e, segs);
                }
            }
            _ => {
                let Some((_, args)) = last_segment(ty) else {
                    return;
                };
                for inner in args {
                    self.stmts.push(Stmt::Hidden {
                        segs: segs.to_vec(),
                        outer: ty.clone(),
                        inner: inner.clone(),
                    });
                    self.hidden(inner, segs);
                }
            }
        }
    }
}

fn stored(serde: &attr::SerdeField) -> Stored {
    if serde.custom {
        Stored::Custom
    } else {
        Stored::Plain
    }
}

/// The last path segment's name and its type arguments.
fn last_segment(ty: &Type) -> Option<(String, Vec<&Type>)> {
    let Type::Path(p) = ty else { return None };
    let seg = p.path.segments.last()?;
    let args = match &seg.arguments {
        PathArguments::AngleBracketed(a) => a
            .args
            .iter()
            .filter_map(|a| match a {
                GenericArgument::Type(t) => Some(t),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Some((seg.ident.to_string(), args))
}

/// Through the wrappers serde serializes as their content (`Option`, `Box`, references, …):
/// whether the type is a sequence (stored as an array), for `each`.
fn is_sequence(mut ty: &Type) -> bool {
    let mut seq = false;
    loop {
        match ty {
            Type::Reference(r) => ty = &r.elem,
            Type::Paren(p) => ty = &p.elem,
            Type::Group(g) => ty = &g.elem,
            Type::Array(a) => {
                seq = true;
                ty = &a.elem;
            }
            Type::Slice(s) => {
                seq = true;
                ty = &s.elem;
            }
            _ => match last_segment(ty) {
                Some((name, args)) => match (name.as_str(), args.as_slice()) {
                    ("Option" | "Box" | "Rc" | "Arc", [inner]) => ty = inner,
                    (
                        "Vec" | "VecDeque" | "LinkedList" | "HashSet" | "BTreeSet" | "BinaryHeap",
                        [inner, ..],
                    ) => {
                        seq = true;
                        ty = inner;
                    }
                    _ => return seq,
                },
                None => return seq,
            },
        }
    }
}

fn field_expr(spec: &RuleSpec) -> TokenStream {
    let fc = quote!(::fieldcrypt);
    let index = spec.blind_index.as_ref().map(|b| {
        let key = &b.key;
        let name = b.name.as_ref().map(|n| quote!(.name(#n)));
        let truncate = b.truncate.map(|t| {
            let t = proc_macro2::Literal::u64_unsuffixed(t);
            quote!(.truncate(#t))
        });
        quote!(#fc::BlindIndex::new(#key) #name #truncate)
    });
    let mut out = match (&spec.key, spec.is_deterministic()) {
        (Some(k), true) => quote!(#fc::Field::deterministic(#k)),
        (Some(k), false) => {
            let suite = spec
                .algorithm
                .as_deref()
                .and_then(rules::suite_index)
                .map(|i| {
                    let v = match i {
                        0 => quote!(Aes256Gcm),
                        1 => quote!(ChaCha20Poly1305),
                        _ => quote!(XChaCha20Poly1305),
                    };
                    quote!(.suite(#fc::Suite::#v))
                });
            quote!(#fc::Field::randomized(#k) #suite)
        }
        (None, _) => quote!(#fc::Field::blind_index_only(#index)),
    };
    if spec.bind_id {
        out = quote!(#out.bind_id());
    }
    if let Some(p) = spec.pad_to {
        let p = proc_macro2::Literal::u64_unsuffixed(p);
        out = quote!(#out.pad_to(#p));
    }
    if spec.key.is_some() {
        if let Some(index) = index {
            out = quote!(#out.with_blind_index(#index));
        }
    }
    out
}

/// Checks the marked fields against every schema rule; the errors point at the fields.
fn check(cx: &mut Cx, owner: Option<(&str, Span)>) {
    // The same rule from several enum variants counts once (the library drops repeats too).
    let mut unique: Vec<&Local> = Vec::new();
    for l in &cx.locals {
        if !unique.iter().any(|u| u.spec == l.spec) {
            unique.push(l);
        }
    }
    let mut errors = Vec::new();
    for l in &unique {
        if let Err(why) = rules::check_rule(&l.spec) {
            errors.push(syn::Error::new(l.span, why));
        }
    }
    if errors.is_empty() {
        let specs: Vec<RuleSpec> = unique.iter().map(|l| l.spec.clone()).collect();
        if let Err((at, why)) = rules::check_schema(&specs, owner.map(|(o, _)| o)) {
            let span = at.map_or_else(
                || owner.map_or_else(Span::call_site, |(_, s)| s),
                |i| unique[i].span,
            );
            errors.push(syn::Error::new(span, why));
        }
    }
    if errors.is_empty() {
        for l in &unique {
            if let Some(bi) = l.spec.blind_index_path() {
                if cx.stored.contains(&bi) {
                    errors.push(syn::Error::new(
                        l.span,
                        format!("its blind index would be stored at {bi:?}, where another field of this type is stored: name it with blind_index(name = \"...\")"),
                    ));
                }
            }
        }
        if let Some((o, span)) = owner {
            if !cx.stored.iter().any(|p| p == o) {
                errors.push(syn::Error::new(
                    span,
                    format!("the owner field {o:?} is not a stored top-level field of this type (serialized names count)"),
                ));
            }
        }
    }
    cx.errors.extend(errors);
}

pub fn expand(input: &DeriveInput) -> syn::Result<TokenStream> {
    let serde = attr::serde_container(&input.attrs)?;
    let container = attr::container_marks(&input.attrs)?;
    if let Some(t) = input.generics.type_params().next() {
        return Err(syn::Error::new(
            t.span(),
            "Encrypted cannot be derived for a generic type: whether a type parameter has encrypted fields is not known where the derive expands",
        ));
    }
    if let Some(span) = serde.into {
        return Err(syn::Error::new(
            span,
            "serde(into) stores another type: derive Encrypted on that type",
        ));
    }
    if let Some(span) = serde.remote {
        return Err(syn::Error::new(
            span,
            "serde(remote) describes another type: derive Encrypted on the type that is stored",
        ));
    }
    let mut cx = Cx::default();
    match &input.data {
        Data::Struct(s) => match &s.fields {
            Fields::Named(named) if serde.transparent => {
                for f in &named.named {
                    cx.value(f, &[], false);
                }
            }
            Fields::Named(named) => {
                for f in &named.named {
                    cx.named(f, &[], serde.rename_all);
                }
            }
            Fields::Unnamed(u) => {
                let element = u.unnamed.len() > 1;
                for f in &u.unnamed {
                    cx.value(f, &[], element);
                }
            }
            Fields::Unit => {}
        },
        Data::Enum(e) => {
            if let Some((_, span)) = &container.owner {
                return Err(syn::Error::new(
                    *span,
                    "owner is supported on structs only: put the enum in a struct that holds the owner field",
                ));
            }
            for v in &e.variants {
                let vs = attr::serde_field(&v.attrs)?;
                if vs.skip_serializing {
                    continue;
                }
                let name = vs.rename.clone().unwrap_or_else(|| {
                    let raw = v.ident.unraw().to_string();
                    serde
                        .rename_all
                        .map_or_else(|| raw.clone(), |r| r.variant(&raw))
                });
                let prefix: Vec<String> = if serde.untagged || vs.untagged {
                    Vec::new()
                } else if serde.tag.is_some() {
                    serde.content.iter().cloned().collect()
                } else {
                    vec![name]
                };
                let rule = vs.rename_all.or(serde.rename_all_fields);
                match &v.fields {
                    Fields::Named(named) => {
                        for f in &named.named {
                            cx.named(f, &prefix, rule);
                        }
                    }
                    Fields::Unnamed(u) => {
                        let element = u.unnamed.len() > 1;
                        for f in &u.unnamed {
                            cx.value(f, &prefix, element);
                        }
                    }
                    Fields::Unit => {}
                }
            }
        }
        Data::Union(u) => {
            return Err(syn::Error::new(
                u.union_token.span,
                "Encrypted cannot be derived for a union",
            ))
        }
    }
    if cx.errors.is_empty() {
        let owner = container.owner.as_ref().map(|(o, s)| (o.as_str(), *s));
        check(&mut cx, owner);
    }
    if let Some(mut first) = cx.errors.first().cloned() {
        for e in cx.errors.iter().skip(1) {
            first.combine(e.clone());
        }
        return Err(first);
    }
    let mut stmts = Vec::new();
    for l in &cx.locals {
        let path = &l.spec.path;
        let f = field_expr(&l.spec);
        stmts.push(Stmt::Field(path.clone(), f));
    }
    // Marked fields first, then nested types: the order only changes the order of rules.
    stmts.append(&mut cx.stmts);
    let body = stmts.iter().map(|s| match s {
        Stmt::Field(path, f) => quote!(out.field(#path, #f);),
        Stmt::Nested(segs, ty) => quote!(
            (&::fieldcrypt::__derive::Probe::<#ty>::new()).nested_into(out, &[#(#segs),*]);
        ),
        Stmt::Unnameable(segs, ty, why) => quote!(
            (&::fieldcrypt::__derive::Probe::<#ty>::new()).unnameable_into(out, &[#(#segs),*], #why);
        ),
        Stmt::Hidden { segs, outer, inner } => {
            let name = last_segment(outer).map_or_else(|| "?".to_owned(), |(n, _)| n);
            let why = format!(
                "is held in `{name}`, which does not implement Encrypted, so where its fields are stored is unknown: implement Encrypted for `{name}` (forwarding to its content), or mark the field itself"
            );
            quote!(
                if !(&::fieldcrypt::__derive::Probe::<#outer>::new()).is_encrypted() {
                    (&::fieldcrypt::__derive::Probe::<#inner>::new()).unnameable_into(out, &[#(#segs),*], #why);
                }
            )
        }
    });
    let owner = container.owner.as_ref().map(|(o, _)| {
        quote!(
            fn owner_field() -> ::core::option::Option<&'static str> {
                ::core::option::Option::Some(#o)
            }
        )
    });
    let name = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    Ok(quote! {
        #[automatically_derived]
        impl #impl_generics ::fieldcrypt::Encrypted for #name #ty_generics #where_clause {
            #[allow(unused_variables, unused_imports)]
            fn encrypted_fields(out: &mut ::fieldcrypt::SchemaFields) {
                use ::fieldcrypt::__derive::{ViaEncrypted as _, ViaPlain as _};
                #(#body)*
            }
            #owner
        }
    })
}
