//! Reading the attributes: `#[fieldcrypt(...)]` (the marks) and the `#[serde(...)]` options
//! that decide where a field is serialized. serde options this crate does not need are
//! skipped whole, whatever their form.

use proc_macro2::Span;
use syn::meta::ParseNestedMeta;
use syn::spanned::Spanned;
use syn::{Attribute, LitInt, LitStr, Token};

use crate::case::RenameRule;

/// The marks of one field: `#[fieldcrypt(key = "pii", deterministic, ...)]`.
#[derive(Default)]
pub struct Marks {
    /// Any mark at all was given.
    pub span: Option<Span>,
    pub key: Option<String>,
    pub algorithm: Option<(String, Span)>,
    pub deterministic: bool,
    pub bind_id: bool,
    pub pad_to: Option<u64>,
    pub each: bool,
    pub index_only: bool,
    pub blind_index: Option<IndexMarks>,
}

/// `blind_index(key = "...", name = "...", truncate = N)`.
pub struct IndexMarks {
    pub key: String,
    pub name: Option<String>,
    pub truncate: Option<u64>,
}

/// The container's `#[fieldcrypt(owner = "...")]`.
#[derive(Default)]
pub struct ContainerMarks {
    pub owner: Option<(String, Span)>,
}

/// What serde does with a field or variant.
#[derive(Default)]
pub struct SerdeField {
    pub rename: Option<String>,
    /// `rename_all` on a variant: applies to its fields.
    pub rename_all: Option<RenameRule>,
    pub skip_serializing: bool,
    pub flatten: bool,
    /// `with` or `serialize_with`: serialized by another function.
    pub custom: bool,
    /// `untagged` on a variant.
    pub untagged: bool,
}

/// What serde does with a struct or enum.
#[derive(Default)]
pub struct SerdeContainer {
    pub rename_all: Option<RenameRule>,
    pub rename_all_fields: Option<RenameRule>,
    pub tag: Option<String>,
    pub content: Option<String>,
    pub untagged: bool,
    pub transparent: bool,
    /// `into`: serialized as another type.
    pub into: Option<Span>,
    /// `remote`: a definition of another crate's type.
    pub remote: Option<Span>,
}

fn string(meta: &ParseNestedMeta) -> syn::Result<String> {
    Ok(meta.value()?.parse::<LitStr>()?.value())
}

fn number(meta: &ParseNestedMeta) -> syn::Result<u64> {
    meta.value()?.parse::<LitInt>()?.base10_parse()
}

/// Skips an option this crate does not read: `name`, `name = <tokens>` or `name(...)`.
fn skip(meta: &ParseNestedMeta) -> syn::Result<()> {
    if meta.input.peek(Token![=]) {
        meta.input.parse::<Token![=]>()?;
        while !meta.input.is_empty() && !meta.input.peek(Token![,]) {
            meta.input.parse::<proc_macro2::TokenTree>()?;
        }
    } else if meta.input.peek(syn::token::Paren) {
        meta.input.parse::<proc_macro2::TokenTree>()?;
    }
    Ok(())
}

/// A serde name option: `name = "x"` or `name(serialize = "x", deserialize = "y")`; the
/// serialized one, which is what is stored.
fn serialized_name(meta: &ParseNestedMeta) -> syn::Result<Option<String>> {
    if meta.input.peek(Token![=]) {
        return string(meta).map(Some);
    }
    let mut out = None;
    meta.parse_nested_meta(|inner| {
        if inner.path.is_ident("serialize") {
            out = Some(string(&inner)?);
        } else {
            skip(&inner)?;
        }
        Ok(())
    })?;
    Ok(out)
}

fn rule(meta: &ParseNestedMeta) -> syn::Result<Option<RenameRule>> {
    let span = meta.path.span();
    match serialized_name(meta)? {
        Some(name) => RenameRule::parse(&name)
            .map(Some)
            .ok_or_else(|| syn::Error::new(span, format!("unknown serde rename rule {name:?}"))),
        None => Ok(None),
    }
}

fn serde_attrs(
    attrs: &[Attribute],
    mut f: impl FnMut(&ParseNestedMeta) -> syn::Result<bool>,
) -> syn::Result<()> {
    for attr in attrs.iter().filter(|a| a.path().is_ident("serde")) {
        attr.parse_nested_meta(|meta| {
            if !f(&meta)? {
                skip(&meta)?;
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// serde's options on a field or variant.
pub fn serde_field(attrs: &[Attribute]) -> syn::Result<SerdeField> {
    let mut out = SerdeField::default();
    serde_attrs(attrs, |meta| {
        let p = &meta.path;
        if p.is_ident("rename") {
            if let Some(n) = serialized_name(meta)? {
                out.rename = Some(n);
            }
        } else if p.is_ident("rename_all") {
            out.rename_all = rule(meta)?;
        } else if p.is_ident("skip") || p.is_ident("skip_serializing") {
            out.skip_serializing = true;
        } else if p.is_ident("flatten") {
            out.flatten = true;
        } else if p.is_ident("untagged") {
            out.untagged = true;
        } else if p.is_ident("with") || p.is_ident("serialize_with") {
            out.custom = true;
            return Ok(false);
        } else {
            return Ok(false);
        }
        Ok(true)
    })?;
    Ok(out)
}

/// serde's options on a struct or enum.
pub fn serde_container(attrs: &[Attribute]) -> syn::Result<SerdeContainer> {
    let mut out = SerdeContainer::default();
    serde_attrs(attrs, |meta| {
        let p = &meta.path;
        if p.is_ident("rename_all") {
            out.rename_all = rule(meta)?;
        } else if p.is_ident("rename_all_fields") {
            out.rename_all_fields = rule(meta)?;
        } else if p.is_ident("tag") {
            out.tag = Some(string(meta)?);
        } else if p.is_ident("content") {
            out.content = Some(string(meta)?);
        } else if p.is_ident("untagged") {
            out.untagged = true;
        } else if p.is_ident("transparent") {
            out.transparent = true;
        } else if p.is_ident("into") {
            out.into = Some(p.span());
            return Ok(false);
        } else if p.is_ident("remote") {
            out.remote = Some(p.span());
            return Ok(false);
        } else {
            return Ok(false);
        }
        Ok(true)
    })?;
    Ok(out)
}

/// The `#[fieldcrypt(...)]` marks of a field.
pub fn marks(attrs: &[Attribute]) -> syn::Result<Marks> {
    let mut m = Marks::default();
    for attr in attrs.iter().filter(|a| a.path().is_ident("fieldcrypt")) {
        m.span = Some(attr.span());
        attr.parse_nested_meta(|meta| {
            let p = &meta.path;
            if p.is_ident("key") {
                m.key = Some(string(&meta)?);
            } else if p.is_ident("algorithm") {
                let lit = meta.value()?.parse::<LitStr>()?;
                m.algorithm = Some((lit.value(), lit.span()));
            } else if p.is_ident("deterministic") {
                m.deterministic = true;
            } else if p.is_ident("bind_id") {
                m.bind_id = true;
            } else if p.is_ident("pad_to") {
                m.pad_to = Some(number(&meta)?);
            } else if p.is_ident("each") {
                m.each = true;
            } else if p.is_ident("index_only") {
                m.index_only = true;
            } else if p.is_ident("blind_index") {
                let mut key = None;
                let mut name = None;
                let mut truncate = None;
                meta.parse_nested_meta(|inner| {
                    if inner.path.is_ident("key") {
                        key = Some(string(&inner)?);
                    } else if inner.path.is_ident("name") {
                        name = Some(string(&inner)?);
                    } else if inner.path.is_ident("truncate") {
                        truncate = Some(number(&inner)?);
                    } else {
                        return Err(inner.error(
                            "unknown blind_index option: expected `key`, `name` or `truncate`",
                        ));
                    }
                    Ok(())
                })?;
                let Some(key) = key else {
                    return Err(meta.error("blind_index needs `key = \"<alias>\"`"));
                };
                m.blind_index = Some(IndexMarks {
                    key,
                    name,
                    truncate,
                });
            } else {
                return Err(meta.error(
                    "unknown fieldcrypt option: expected `key`, `algorithm`, `deterministic`, `bind_id`, `pad_to`, `each`, `blind_index(...)` or `index_only`",
                ));
            }
            Ok(())
        })?;
    }
    Ok(m)
}

/// The `#[fieldcrypt(...)]` options of a struct or enum.
pub fn container_marks(attrs: &[Attribute]) -> syn::Result<ContainerMarks> {
    let mut c = ContainerMarks::default();
    for attr in attrs.iter().filter(|a| a.path().is_ident("fieldcrypt")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("owner") {
                let lit = meta.value()?.parse::<LitStr>()?;
                c.owner = Some((lit.value(), lit.span()));
                Ok(())
            } else {
                Err(meta
                    .error("unknown fieldcrypt option on a type: expected `owner = \"<field>\"`"))
            }
        })?;
    }
    Ok(c)
}
