//! Managing the key vault's keys: create, rotate, change state, destroy, list, rewrap and
//! import. Every write is a compare-and-set on the key documents, safe against concurrent
//! writers in other processes (docs/KEY_VAULT.md).

// The second half of `KeyVault`'s impl: it uses the vault's private helpers and imports.
use super::*;

impl KeyVault {
    /// Creates a new fieldcrypt key (32 bytes from the OS CSPRNG) for `alias` and makes it
    /// the primary; the previous primary becomes active (decrypts, no longer encrypts).
    ///
    /// Safe against concurrent creators in other processes: each gets its own version, and of
    /// concurrent rotations exactly one ends as primary.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an empty alias, [`Error::KeyVault`] when other writers keep winning, KEK errors, [`Error::Mongo`].
    pub async fn create_key(&self, alias: &str) -> Result<KeyId> {
        check_alias(alias)?;
        self.ensure_indexes().await?;
        match self.insert_key(alias, false).await? {
            Some(id) => Ok(id),
            // Only a first-key-only insert gives way to another creator; this one retries.
            None => Err(Error::from(KeyVaultError::LostRaces {
                what: format!("create a key for {alias:?}"),
                attempts: MAX_ATTEMPTS,
            })),
        }
    }

    /// Same as [`KeyVault::create_key`]: a rotation makes a new primary for the alias.
    ///
    /// # Errors
    /// As [`KeyVault::create_key`].
    pub async fn rotate(&self, alias: &str) -> Result<KeyId> {
        self.create_key(alias).await
    }

    /// The primary key of `alias`, creating the alias's first key if it has none (e.g. a
    /// tenant's own key, [`tenant_alias`](crate::mongo::tenant_alias)`("pii", tenant)`, on the
    /// tenant's first write).
    /// Concurrent callers in any process end up with the same key.
    ///
    /// An alias whose keys are all disabled or destroyed is not given a new key: that is
    /// [`Error::NoPrimaryKey`] (a destroyed tenant stays destroyed until someone rotates it on
    /// purpose).
    ///
    /// # Errors
    /// [`Error::NoPrimaryKey`], [`Error::InvalidArgument`] for an empty alias, KEK errors,
    /// [`Error::Mongo`].
    pub async fn ensure_alias(&self, alias: &str) -> Result<KeyId> {
        if let Some(id) = self.cache.cached_primary_id(alias) {
            return Ok(id);
        }
        check_alias(alias)?;
        for _ in 0..MAX_ATTEMPTS {
            let mut keys = self.alias_keys(alias).await?;
            if !keys.is_empty() {
                elect(&mut keys);
                return keys
                    .iter()
                    .find(|k| k.state == KeyState::Primary)
                    .map(|k| k.id)
                    .ok_or_else(|| Error::NoPrimaryKey(alias.to_owned()));
            }
            self.ensure_indexes().await?;
            if let Some(id) = self.insert_key(alias, true).await? {
                return Ok(id);
            }
            // Someone else created the first key meanwhile: read it.
        }
        Err(Error::from(KeyVaultError::LostRaces {
            what: format!("create the first key of {alias:?}"),
            attempts: MAX_ATTEMPTS,
        }))
    }

    /// Inserts a new primary key for `alias` (or, with `first_only`, only if the alias has no
    /// key yet: `None` otherwise), then demotes the older primaries.
    async fn insert_key(&self, alias: &str, first_only: bool) -> Result<Option<KeyId>> {
        let kek = self.keks().wrap;
        let id = KeyId::random();
        let (master_key, wrapped) = {
            let material = KeyMaterial::generate(FIELDCRYPT_KEY_LEN);
            let ad = document::associated_data(&id, alias, KeyKind::Fieldcrypt);
            self.wrap_with(&*kek, &material, &ad).await?
            // `material` is wiped here; only the wrapped form is kept.
        };
        // After a duplicate, never retry the same numbers: the keyAltName may be taken by a
        // document that is not one of this alias's keys (a CSFLE key named like one).
        let (mut tried_version, mut tried_generation) = (0, 0);
        for _ in 0..MAX_ATTEMPTS {
            let existing = self.alias_keys(alias).await?;
            if first_only && !existing.is_empty() {
                return Ok(None);
            }
            let version = existing
                .iter()
                .filter_map(|k| k.managed.map(|m| m.version))
                .max()
                .unwrap_or(0)
                .max(tried_version)
                + 1;
            let generation = next_generation(
                existing
                    .iter()
                    .map(StoredKey::generation)
                    .max()
                    .unwrap_or(0)
                    .max(tried_generation),
                alias,
            )?;
            (tried_version, tried_generation) = (version, generation);
            let doc = NewKey {
                id,
                alias,
                kind: KeyKind::Fieldcrypt,
                version,
                generation,
                master_key: &master_key,
                wrapped: &wrapped,
            }
            .to_document();
            match self.coll.insert_one(doc).await {
                Ok(_) => {
                    self.demote_below(alias, generation).await?;
                    self.cache.invalidate_alias(alias);
                    tracing::info!(key = %id, alias, version, "created primary key");
                    return Ok(Some(id));
                }
                // Another process took this version or generation: recount and retry.
                Err(e) if is_duplicate_key(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::from(KeyVaultError::LostRaces {
            what: format!("create a key for {alias:?}"),
            attempts: MAX_ATTEMPTS,
        }))
    }

    /// Demotes every primary of `alias` whose claim is older than `generation`.
    pub(super) async fn demote_below(&self, alias: &str, generation: i64) -> Result<()> {
        self.coll
            .update_many(
                doc! {
                    ALIAS: alias,
                    STATE: KeyState::Primary.as_str(),
                    "$or": [
                        { GENERATION: { "$lt": generation } },
                        { GENERATION: { "$exists": false } },
                    ],
                },
                doc! {
                    "$set": { STATE: KeyState::Active.as_str() },
                    "$currentDate": { UPDATE_DATE: true },
                },
            )
            .await?;
        Ok(())
    }

    /// Changes a key's state, with the rules of [`InMemoryKeyring::set_state`]: promoting a
    /// key to primary demotes its alias's current primary; a destroyed key stays destroyed;
    /// destroying removes `keyMaterial` from the document (see [`KeyVault::destroy`]).
    ///
    /// This process sees the change at once; others within their cache TTL.
    ///
    /// # Errors
    /// [`Error::UnknownKey`]; [`Error::KeyDestroyed`] when reviving a destroyed key;
    /// [`Error::KeyMisuse`] when promoting a CSFLE key document made by MongoDB's drivers
    /// (fieldcrypt keeps those in libmongocrypt's exact layout, which has no primary);
    /// [`Error::Mongo`].
    ///
    /// [`InMemoryKeyring::set_state`]: crate::InMemoryKeyring::set_state
    pub async fn set_state(&self, id: &KeyId, state: KeyState) -> Result<()> {
        let stored = self
            .find(doc! { ID: id.to_binary() })
            .await?
            .pop()
            .ok_or(Error::UnknownKey(*id))?;
        if stored.state == KeyState::Destroyed {
            self.cache.mark_destroyed(*id);
            return if state == KeyState::Destroyed {
                Ok(())
            } else {
                Err(Error::KeyDestroyed(*id))
            };
        }
        // Revived behind fieldcrypt's back (destroyed is irreversible): only destroy again.
        if state != KeyState::Destroyed && self.cache.known_destroyed(id) {
            return Err(Error::KeyDestroyed(*id));
        }
        let live = doc! { ID: id.to_binary(), KEY_MATERIAL: { "$exists": true } };
        let managed = stored.managed.is_some();
        match state {
            KeyState::Destroyed => {
                self.destroy_where(live, managed).await?;
                self.cache.mark_destroyed(*id);
            }
            KeyState::Primary if !managed => {
                return Err(Error::KeyMisuse {
                    id: *id,
                    reason: "a CSFLE key document without fieldcrypt's fields cannot be primary",
                })
            }
            KeyState::Primary => self.promote(&stored, live).await?,
            KeyState::Active | KeyState::Disabled => {
                let mut set = doc! { STATUS: status_of(state) };
                if managed {
                    set.insert(STATE, state.as_str());
                }
                let r = self
                    .coll
                    .update_one(
                        live,
                        doc! { "$set": set, "$currentDate": { UPDATE_DATE: true } },
                    )
                    .await?;
                if r.matched_count == 0 {
                    return Err(Error::KeyDestroyed(*id));
                }
            }
        }
        self.cache.invalidate_key(id);
        self.cache.invalidate_alias(&stored.alias);
        tracing::info!(key = %id, alias = %stored.alias, state = %state, "key state changed");
        Ok(())
    }

    /// Makes `stored` the primary of its alias with a new, highest generation.
    async fn promote(&self, stored: &StoredKey, live: Document) -> Result<()> {
        self.ensure_indexes().await?;
        for _ in 0..MAX_ATTEMPTS {
            let generation = next_generation(
                self.alias_keys(&stored.alias)
                    .await?
                    .iter()
                    .map(StoredKey::generation)
                    .max()
                    .unwrap_or(0),
                &stored.alias,
            )?;
            let r = self
                .coll
                .update_one(
                    live.clone(),
                    doc! {
                        "$set": {
                            STATE: KeyState::Primary.as_str(),
                            GENERATION: generation,
                            STATUS: status_of(KeyState::Primary),
                        },
                        "$currentDate": { UPDATE_DATE: true },
                    },
                )
                .await;
            match r {
                Ok(r) if r.matched_count == 0 => return Err(Error::KeyDestroyed(stored.id)),
                Ok(_) => return self.demote_below(&stored.alias, generation).await,
                Err(e) if is_duplicate_key(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::from(KeyVaultError::LostRaces {
            what: format!("promote key {}", stored.id),
            attempts: MAX_ATTEMPTS,
        }))
    }

    /// Destroys a key: removes `keyMaterial` from its document (status 1, state destroyed), so
    /// that the vault no longer holds any copy of the wrapped key and data under it is
    /// unreadable (crypto-shredding). Irreversible. This process drops its unwrapped copy at
    /// once; other processes within their cache TTL.
    ///
    /// Backups, the oplog and the storage engine may still hold the old document for a while;
    /// see `docs/KEY_VAULT.md`.
    ///
    /// # Errors
    /// [`Error::UnknownKey`], [`Error::Mongo`].
    pub async fn destroy(&self, id: &KeyId) -> Result<()> {
        self.set_state(id, KeyState::Destroyed).await
    }

    /// Destroys every key of `alias` (all versions), e.g. a tenant's key to shred that
    /// tenant's data. Returns how many keys were destroyed.
    ///
    /// # Errors
    /// [`Error::Mongo`].
    pub async fn destroy_alias(&self, alias: &str) -> Result<u64> {
        let keys = self.alias_keys(alias).await?;
        let mut n = self
            .destroy_where(
                doc! { ALIAS: alias, KEY_MATERIAL: { "$exists": true } },
                true,
            )
            .await?;
        let unmanaged: Vec<Bson> = keys
            .iter()
            .filter(|k| k.managed.is_none() && k.state != KeyState::Destroyed)
            .map(|k| Bson::Binary(k.id.to_binary()))
            .collect();
        if !unmanaged.is_empty() {
            n += self
                .destroy_where(
                    doc! {
                        ID: { "$in": unmanaged },
                        FIELDCRYPT: { "$exists": false },
                        KEY_MATERIAL: { "$exists": true },
                    },
                    false,
                )
                .await?;
        }
        for k in &keys {
            self.cache.invalidate_key(&k.id);
            self.cache.mark_destroyed(k.id);
        }
        self.cache.invalidate_alias(alias);
        tracing::info!(alias, keys = n, "destroyed every key of alias");
        Ok(n)
    }

    async fn destroy_where(&self, filter: Document, managed: bool) -> Result<u64> {
        let mut set = doc! { STATUS: status_of(KeyState::Destroyed) };
        if managed {
            set.insert(STATE, KeyState::Destroyed.as_str());
        }
        let r = self
            .coll
            .update_many(
                filter,
                doc! {
                    "$unset": { KEY_MATERIAL: "" },
                    "$set": set,
                    "$currentDate": { UPDATE_DATE: true },
                },
            )
            .await?;
        Ok(r.modified_count)
    }

    /// Every key's metadata (never material), by alias then version.
    ///
    /// # Errors
    /// [`Error::KeyFormat`] for a malformed key document, [`Error::Mongo`].
    pub async fn list(&self) -> Result<Vec<KeyInfo>> {
        let mut keys = self.find(doc! {}).await?;
        elect(&mut keys);
        let mut infos: Vec<KeyInfo> = keys.iter().map(|k| k.info(k.state)).collect();
        infos.sort_by(|a, b| {
            (&a.alias, a.version, a.created, a.id).cmp(&(&b.alias, b.version, b.created, b.id))
        });
        Ok(infos)
    }

    /// Re-wraps every data key under `new_kek` — MongoDB's `rewrapManyDataKey`: local → a
    /// KMS, one KMS key to another, one provider to another. Only `keyMaterial`, `masterKey`
    /// and `updateDate` of key documents change; the data keys, and so every data document,
    /// stay as they are. Returns what happened to each key, in `_id` order.
    ///
    /// Each document is updated only if its `keyMaterial` is still the one that was unwrapped,
    /// so a concurrent destroy is never undone. `new_kek` unwraps here from the start, so a
    /// failure half-way leaves every key readable; once every key has moved, this vault wraps
    /// new keys with it and keeps the previous KEK for unwrapping.
    ///
    /// **Resumable.** A key whose `masterKey` already is `new_kek`'s
    /// ([`KekProvider::wraps_under`]) is left alone without a KMS call, so running the same
    /// rewrap again after an interruption (a KMS outage, a killed process) continues where it
    /// stopped. Where the KMS can move a wrapped key itself ([`KekProvider::rewrap_in_kms`]:
    /// Vault Transit to its newest key version) the plaintext never leaves it.
    ///
    /// # Errors
    /// The first key that cannot be re-wrapped (no KEK of this vault unwraps it, the KMS
    /// refuses or is unreachable) stops the run: it is [`RewrapReport::failed`], with the keys
    /// before it in [`RewrapReport::keys`]; fix and run again. [`Error::Mongo`] when the key
    /// vault cannot be read.
    pub async fn rewrap(&self, new_kek: Arc<dyn KekProvider>) -> Result<RewrapReport> {
        // Keys already moved must stay readable here even if a later one fails.
        {
            let mut keks = self.keks.write().unwrap_or_else(|p| p.into_inner());
            if !keks.unwrap_also.iter().any(|k| Arc::ptr_eq(k, &new_kek)) {
                keks.unwrap_also.push(new_kek.clone());
            }
        }
        let mut report = RewrapReport::default();
        let mut after: Option<Binary> = None;
        'batches: loop {
            let mut filter = doc! { KEY_MATERIAL: { "$exists": true } };
            if let Some(last) = after.take() {
                filter.insert(ID, doc! { "$gt": last });
            }
            let batch: Vec<Document> = self
                .coll
                .find(filter)
                // What parsing and the associated data need (alias and kind of managed keys).
                .projection(
                    doc! { ID: 1, KEY_ALT_NAMES: 1, KEY_MATERIAL: 1, MASTER_KEY: 1, FIELDCRYPT: 1 },
                )
                .sort(doc! { ID: 1 })
                .limit(REWRAP_BATCH)
                .await?
                .try_collect()
                .await?;
            let Some(last) = batch.last().and_then(|d| d.get(ID)) else {
                break;
            };
            after = match last {
                Bson::Binary(b) => Some(b.clone()),
                _ => None,
            };
            for doc in &batch {
                let stored = StoredKey::parse(doc)?;
                match self.rewrap_one(&stored, &*new_kek).await {
                    Ok(Some(key)) => report.keys.push(key),
                    Ok(None) => {}
                    Err(error) => {
                        tracing::error!(key = %stored.id, error = %error, "rewrap stopped");
                        report.failed = Some(RewrapFailure {
                            id: stored.id,
                            alias: stored.alias.clone(),
                            error,
                        });
                        break 'batches;
                    }
                }
            }
        }
        if report.failed.is_none() {
            let mut keks = self.keks.write().unwrap_or_else(|p| p.into_inner());
            keks.unwrap_also.retain(|k| !Arc::ptr_eq(k, &new_kek));
            let old = std::mem::replace(&mut keks.wrap, new_kek);
            if !Arc::ptr_eq(&old, &keks.wrap) {
                keks.unwrap_also.insert(0, old);
            }
        }
        tracing::info!(
            keys = report.rewrapped(),
            unchanged = report.keys.len() - report.rewrapped(),
            complete = report.failed.is_none(),
            provider = %self.kek_provider(),
            "re-wrapped data keys"
        );
        Ok(report)
    }

    /// Re-wraps one key; `None` for a key without material.
    async fn rewrap_one(
        &self,
        stored: &StoredKey,
        new_kek: &dyn KekProvider,
    ) -> Result<Option<RewrappedKey>> {
        let Some(old) = stored.key_material.as_deref() else {
            return Ok(None);
        };
        let entry = |outcome, to: &Document| RewrappedKey {
            id: stored.id,
            alias: stored.alias.clone(),
            from: describe_master_key(&stored.master_key),
            to: describe_master_key(to),
            outcome,
        };
        if self.cache.known_destroyed(&stored.id) {
            // Revived behind fieldcrypt's back: do not carry it over to the new KEK.
            tracing::error!(key = %stored.id, "not re-wrapped: this process saw the key destroyed");
            return Ok(Some(entry(
                RewrapOutcome::SkippedDestroyed,
                &stored.master_key,
            )));
        }
        let ad = stored.wrap_ad()?;
        if new_kek.wraps_under() == Some(&stored.master_key) {
            return Ok(Some(entry(RewrapOutcome::AlreadyThere, &stored.master_key)));
        }
        let (outcome, (master_key, wrapped)) =
            match new_kek.rewrap_in_kms(&stored.master_key, old, &ad).await? {
                Some((mk, w)) => {
                    self.kek_calls.fetch_add(1, Ordering::Relaxed);
                    if mk == stored.master_key && w == old {
                        return Ok(Some(entry(RewrapOutcome::AlreadyThere, &mk)));
                    }
                    (RewrapOutcome::RewrappedInKms, (mk, w))
                }
                None => {
                    let material = self
                        .unwrap_material(stored.id, &stored.master_key, old, &ad)
                        .await?;
                    let wrapped = self.wrap_with(new_kek, &material, &ad).await?;
                    (RewrapOutcome::Rewrapped, wrapped)
                }
            };
        let r = self
            .coll
            .update_one(
                doc! { ID: stored.id.to_binary(), KEY_MATERIAL: generic(old) },
                doc! {
                    "$set": { KEY_MATERIAL: generic(&wrapped), MASTER_KEY: &master_key },
                    "$currentDate": { UPDATE_DATE: true },
                },
            )
            .await?;
        let outcome = if r.modified_count == 1 {
            outcome
        } else {
            RewrapOutcome::ChangedMeanwhile
        };
        Ok(Some(entry(outcome, &master_key)))
    }

    /// Creates a MongoDB CSFLE data key (96 bytes, [`KeyKind::Csfle`]) wrapped by this vault's
    /// KEK with no associated data, in libmongocrypt's exact layout (`_id`, `keyAltNames`,
    /// `keyMaterial`, `creationDate`, `updateDate`, `status`, `masterKey`), as a driver's
    /// `ClientEncryption.createDataKey` does: MongoDB's drivers use it as their own. Its alias
    /// is its first keyAltName (else its id).
    ///
    /// # Errors
    /// [`Error::KeyVault`] when a key with one of these keyAltNames exists; KEK errors;
    /// [`Error::Mongo`].
    pub async fn create_csfle_key(&self, key_alt_names: &[String]) -> Result<KeyId> {
        let kek = self.keks().wrap;
        let id = KeyId::random();
        let (master_key, key_material) = {
            let material = KeyMaterial::generate(CSFLE_KEY_LEN);
            self.wrap_with(&*kek, &material, &[]).await?
        };
        let now = bson::DateTime::now();
        let doc = CsfleKeyDocument {
            id,
            key_alt_names: key_alt_names.to_vec(),
            key_material,
            master_key,
            status: 0,
            creation_date: now,
            update_date: now,
        };
        self.ensure_indexes().await?;
        match self.coll.insert_one(doc.to_document()).await {
            Ok(_) => {
                tracing::info!(key = %id, "created CSFLE data key");
                Ok(id)
            }
            Err(e) if is_duplicate_key(&e) => Err(Error::from(KeyVaultError::AlreadyPresent(id))),
            Err(e) => Err(e.into()),
        }
    }

    /// Imports a CSFLE data key document made by MongoDB's drivers (libmongocrypt) — e.g. from
    /// another deployment's key vault — whose material `wrapped_by` unwraps. It is re-wrapped
    /// with this vault's KEK and stored in libmongocrypt's exact layout (same id, keyAltNames,
    /// status and creation date), so MongoDB's drivers keep reading it. Its alias is its first
    /// keyAltName (else its id).
    ///
    /// # Errors
    /// [`Error::KeyFormat`] when it does not unwrap or is not a 96-byte key; [`Error::KeyVault`]
    /// when a key with this id or keyAltName is already in the vault; [`Error::Mongo`].
    pub async fn import_csfle_key(
        &self,
        key: &CsfleKeyDocument,
        wrapped_by: &dyn KekProvider,
    ) -> Result<KeyId> {
        // MongoDB's format: no associated data.
        let material = wrapped_by
            .unwrap_with_ad(&key.master_key, &key.key_material, &[])
            .await
            .map_err(|e| match e {
                Error::Decrypt | Error::MalformedCiphertext(_) => Error::KeyFormat(format!(
                    "keyMaterial of key {} does not unwrap under the given KEK",
                    key.id
                )),
                other => other,
            })?;
        if material.len() != CSFLE_KEY_LEN {
            return Err(Error::KeyFormat(format!(
                "key {} is not a {CSFLE_KEY_LEN}-byte CSFLE data key",
                key.id
            )));
        }
        let kek = self.keks().wrap;
        let (master_key, wrapped) = self.wrap_with(&*kek, &material, &[]).await?;
        drop(material);
        let mut doc = key.clone();
        doc.key_material = wrapped;
        doc.master_key = master_key;
        doc.update_date = bson::DateTime::now();
        self.ensure_indexes().await?;
        match self.coll.insert_one(doc.to_document()).await {
            Ok(_) => {
                tracing::info!(key = %key.id, "imported CSFLE data key");
                Ok(key.id)
            }
            Err(e) if is_duplicate_key(&e) => {
                Err(Error::from(KeyVaultError::AlreadyPresent(key.id)))
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// `provider` or `provider master-key-id`, for reports.
fn describe_master_key(master_key: &Document) -> String {
    let provider = master_key.get_str("provider").unwrap_or("?");
    #[cfg(feature = "kms")]
    {
        let id = crate::kms::master_key_id(master_key);
        if id != provider {
            return format!("{provider} {id}");
        }
    }
    provider.to_owned()
}

/// What [`KeyVault::rewrap`] did.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct RewrapReport {
    /// Every key with material that was looked at, in `_id` order.
    pub keys: Vec<RewrappedKey>,
    /// The key the run stopped at, and why; `None` when every key was done.
    pub failed: Option<RewrapFailure>,
}

impl RewrapReport {
    /// How many keys were re-wrapped (in the KMS or here).
    #[must_use]
    pub fn rewrapped(&self) -> usize {
        self.keys
            .iter()
            .filter(|k| {
                matches!(
                    k.outcome,
                    RewrapOutcome::Rewrapped | RewrapOutcome::RewrappedInKms
                )
            })
            .count()
    }
}

/// One key of a [`RewrapReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RewrappedKey {
    /// The key's id.
    pub id: KeyId,
    /// Its alias.
    pub alias: String,
    /// The provider and master key it was wrapped under (`aws arn:aws:kms:…`, `local`).
    pub from: String,
    /// The provider and master key it is wrapped under now.
    pub to: String,
    /// What happened.
    pub outcome: RewrapOutcome,
}

/// What happened to one key in a rewrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RewrapOutcome {
    /// Unwrapped and wrapped under the new KEK.
    Rewrapped,
    /// Moved inside the KMS (Vault Transit `rewrap`): the plaintext never left it.
    RewrappedInKms,
    /// Already under the new master key (an earlier, interrupted run moved it): left alone.
    AlreadyThere,
    /// Not re-wrapped: this process saw the key destroyed, and its document has material again.
    SkippedDestroyed,
    /// Its `keyMaterial` changed while it was being re-wrapped (destroyed or re-wrapped by
    /// another process): left as the other writer made it.
    ChangedMeanwhile,
}

/// The key a rewrap stopped at.
#[derive(Debug)]
#[non_exhaustive]
pub struct RewrapFailure {
    /// The key's id.
    pub id: KeyId,
    /// Its alias.
    pub alias: String,
    /// Why (a KMS error, a key no KEK unwraps).
    pub error: Error,
}
