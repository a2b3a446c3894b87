//! The operations of [`EncryptedCollection`](crate::mongo::EncryptedCollection), as action
//! builders shaped like the driver's: each is configured with `.with_options(...)` /
//! `.session(...)` and run by `.await`.
//!
//! One file per family, as the driver lays out its own actions (`insert`, `find`,
//! `find_and_modify`, `update`, `replace_one`, `delete`, `bulk_write`, `count`, `distinct`,
//! `aggregate`, `index`, `watch`);
//! each action runs the same way:
//!
//! ```text
//!  .await ──prepare.rs: check the handle, trace, prefetch keys, rewrite or refuse──▶ driver
//!         ◀──decrypted (one document, or a cursor batch by batch)────────────────── driver
//! ```
//!
//! The actions that return a cursor ([`Find`], [`Aggregate`]) are generic over an
//! [`ActionSession`], so their `IntoFuture` is written once for both session states.

/// Runs a driver action with the session, if one was given.
macro_rules! run {
    ($action:expr, $session:expr) => {
        match $session {
            Some(s) => $action.session(s).await,
            None => $action.await,
        }
    };
}

/// `with_options` and `session` setters of the actions that return no cursor.
macro_rules! options_and_session {
    ($action:ident, $options:ty) => {
        impl<'a, T> $action<'a, T> {
            /// Sets the driver options of this operation. Options that could compare or
            /// order encrypted values (sort, projection, collation, array filters, index
            /// bounds) are checked like the filter.
            pub fn with_options(mut self, options: impl Into<Option<$options>>) -> Self {
                self.options = options.into();
                self
            }

            /// Runs the operation in `session`, and in its transaction if one is started.
            pub fn session(mut self, session: &'a mut ::mongodb::ClientSession) -> Self {
                self.session = Some(session);
                self
            }
        }
    };
}

/// `IntoFuture` of an action that returns no cursor: awaiting it runs its `run` method.
macro_rules! into_future {
    ($action:ident -> $output:ty $(where T: $($bound:tt)+)?) => {
        impl<'a, T: 'a $(+ $($bound)+)?> ::std::future::IntoFuture for $action<'a, T> {
            type Output = $crate::error::Result<$output>;
            type IntoFuture = ::mongodb::BoxFuture<'a, Self::Output>;

            fn into_future(self) -> Self::IntoFuture {
                Box::pin(self.run())
            }
        }
    };
}

/// Declares an action that returns no cursor: its struct (the collection, the action's own
/// fields, the driver options, the session), a `new` taking the collection and the fields in
/// order, the `with_options` and `session` setters, and `IntoFuture` (awaiting runs `run`).
macro_rules! action {
    (
        $(#[$doc:meta])*
        $action:ident { $($field:ident: $ty:ty),* $(,)? }
        options $options:ty => $output:ty $(where T: $($bound:tt)+)?
    ) => {
        $(#[$doc])*
        #[must_use = "actions do nothing unless awaited"]
        pub struct $action<'a, T> {
            coll: &'a EncryptedCollection<T>,
            $($field: $ty,)*
            options: Option<$options>,
            session: Option<&'a mut ::mongodb::ClientSession>,
        }

        impl<'a, T> $action<'a, T> {
            fn new(coll: &'a EncryptedCollection<T>, $($field: $ty),*) -> Self {
                Self {
                    coll,
                    $($field,)*
                    options: None,
                    session: None,
                }
            }
        }

        options_and_session!($action, $options);

        into_future!($action -> $output $(where T: $($bound)+)?);
    };
}

/// The [`FindChecks`](prepare::FindChecks) of `Option<FindOptions>` or
/// `Option<FindOneOptions>`, borrowed; with `no_bounds`, of the find-and-modify options,
/// which have no `min`/`max`.
macro_rules! find_checks {
    ($options:expr) => {
        $options.as_mut().map(|o| super::prepare::FindChecks {
            sort: o.sort.as_ref(),
            projection: &mut o.projection,
            min: o.min.as_ref(),
            max: o.max.as_ref(),
            collation: o.collation.as_ref(),
            hint: &mut o.hint,
        })
    };
    ($options:expr, no_bounds) => {
        $options.as_mut().map(|o| super::prepare::FindChecks {
            sort: o.sort.as_ref(),
            projection: &mut o.projection,
            min: None,
            max: None,
            collation: o.collation.as_ref(),
            hint: &mut o.hint,
        })
    };
}

/// The [`UpdateChecks`](prepare::UpdateChecks) of `Option<UpdateOptions>` or
/// `Option<FindOneAndUpdateOptions>`, borrowed.
macro_rules! update_checks {
    ($options:expr) => {
        $options.as_mut().map(|o| super::prepare::UpdateChecks {
            array_filters: &mut o.array_filters,
            sort: o.sort.as_ref(),
            collation: o.collation.as_ref(),
            hint: Some(&mut o.hint),
        })
    };
}

/// The [`FilterChecks`](prepare::FilterChecks) of `Option<CountOptions>` or
/// `Option<DeleteOptions>`, borrowed.
macro_rules! filter_checks {
    ($options:expr) => {
        $options.as_mut().map(|o| super::prepare::FilterChecks {
            collation: o.collation.as_ref(),
            hint: &mut o.hint,
        })
    };
}

mod prepare;
mod session;

mod aggregate;
mod bulk_write;
mod count;
mod delete;
mod distinct;
mod find;
mod find_and_modify;
mod index;
mod insert;
mod replace_one;
mod update;
mod watch;

pub use aggregate::Aggregate;
pub use bulk_write::{BulkWrite, WriteModel};
pub use count::{CountDocuments, EstimatedDocumentCount};
pub use delete::Delete;
pub use distinct::Distinct;
pub use find::{Find, FindOne};
pub use find_and_modify::{FindOneAndDelete, FindOneAndReplace, FindOneAndUpdate};
pub use index::{CreateIndex, CreateIndexes};
pub use insert::{InsertMany, InsertOne};
pub use replace_one::ReplaceOne;
pub use session::{ActionSession, NoSession, WithSession};
pub use update::Update;
pub use watch::{EncryptedChangeStream, Watch};
