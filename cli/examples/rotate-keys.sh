#!/bin/sh
# Rotate a key alias and move every document to the new key, with the fieldcrypt CLI.
#
#   cli/examples/rotate-keys.sh ALIAS SCHEMA DB.COLL [DB.COLL ...]
#
# e.g.  MONGODB_URI=mongodb://db.example:27017 FIELDCRYPT_MASTER_KEY_FILE=/secrets/master.key \
#       cli/examples/rotate-keys.sh pii schema.toml app.users app.orders
#
# The procedure (docs/ROTATION.md explains each step):
#   1. create a new primary key for the alias (the old primary stays readable, as "active");
#   2. wait until every application has picked up the new primary (their key caches expire);
#   3. re-encrypt every document still under an older key (online, resumable, safe against
#      concurrent application writes);
#   4. audit: check that no document references the old key any more;
#   5. disable the old key (refused by fieldcrypt while any document still references it).
#   Later, once backups made before the rotation have expired, destroy the old key:
#      fieldcrypt keys destroy <old key id>
#
# If the script is interrupted (Ctrl-C, a crash, a killed job), run it again with RESUME=1 and
# the same arguments: it does not create another key, and re-encryption continues from its
# checkpoint (every document is rewritten at most once; documents are never lost).
#
# Environment:
#   MONGODB_URI                  the data cluster (and key vault, unless FIELDCRYPT_KEY_VAULT_URI)
#   FIELDCRYPT_MASTER_KEY        the local master key, base64 (or FIELDCRYPT_MASTER_KEY_FILE)
#   FIELDCRYPT_MASTER_KEY_FILE   a file holding the local master key
#   FIELDCRYPT_KEY_VAULT_URI     the key vault's cluster, if not the data cluster
#   FIELDCRYPT_KEY_VAULT_NS      the key vault collection (default keyvault.datakeys)
#   FIELDCRYPT_WAIT              seconds to wait in step 2 (default 90: the key cache TTL, 60 s,
#                                plus margin)
#   FIELDCRYPT_RATE              documents per second for step 3 (default: no limit)
#   FIELDCRYPT                   the fieldcrypt binary (default: fieldcrypt on PATH)
#   RESUME=1                     continue an interrupted rotation (skip step 1 and 2)
#
# Exit status: 0 done; 1 an error (see the message); 2 bad arguments; 4 some documents could
# not be re-encrypted (listed; fix them and run again with RESUME=1); 130 interrupted.

set -eu

if [ "$#" -lt 3 ]; then
    sed -n '2,4p' "$0" >&2
    exit 2
fi
alias_name=$1
schema=$2
shift 2

fc=${FIELDCRYPT:-fieldcrypt}
# Key and server options, passed to every command (the namespaces stay in "$@").
keyopts=""
if [ -n "${FIELDCRYPT_MASTER_KEY_FILE:-}" ]; then
    keyopts="$keyopts --master-key-file $FIELDCRYPT_MASTER_KEY_FILE"
fi
if [ -n "${FIELDCRYPT_KEY_VAULT_URI:-}" ]; then
    keyopts="$keyopts --key-vault-uri $FIELDCRYPT_KEY_VAULT_URI"
fi
if [ -n "${FIELDCRYPT_KEY_VAULT_NS:-}" ]; then
    keyopts="$keyopts --key-vault-namespace $FIELDCRYPT_KEY_VAULT_NS"
fi
nsopts=""
for ns in "$@"; do
    nsopts="$nsopts --namespace $ns"
done

say() { echo "rotate-keys: $*" >&2; }

interrupted() {
    say "interrupted. Nothing is lost: run again with RESUME=1 and the same arguments to finish."
    exit 130
}
trap interrupted INT TERM

# The key(s) to retire: every readable key of the alias except the new primary.
if [ "${RESUME:-0}" = "1" ]; then
    say "resuming: keeping the current primary of '$alias_name'"
    # shellcheck disable=SC2086
    new=$($fc keys list --alias "$alias_name" --state primary --ids $keyopts)
else
    # 1. A new primary key.
    # shellcheck disable=SC2086
    new=$($fc keys rotate "$alias_name" --quiet $keyopts)
    say "new primary key of '$alias_name': $new"

    # 2. Applications cache keys (60 s by default): wait until all of them encrypt with the
    #    new primary, so that nothing new is written under the old key after step 3 passes.
    wait_s=${FIELDCRYPT_WAIT:-90}
    if [ "$wait_s" -gt 0 ]; then
        say "waiting ${wait_s}s for applications to pick up the new key"
        sleep "$wait_s"
    fi
fi
if [ -z "$new" ]; then
    say "alias '$alias_name' has no primary key"
    exit 1
fi
# shellcheck disable=SC2086
old=$($fc keys list --alias "$alias_name" --state active --ids $keyopts)

# 3. Re-encrypt, resumably (--resume continues a checkpoint of this job if there is one; a
#    completed job is not redone).
rate=""
if [ -n "${FIELDCRYPT_RATE:-}" ]; then
    rate="--rate $FIELDCRYPT_RATE"
fi
say "re-encrypting $*"
set +e
# shellcheck disable=SC2086
$fc reencrypt --schema "$schema" $nsopts --resume $rate $keyopts
status=$?
set -e
case $status in
    0) ;;
    130) interrupted ;;
    4) say "some documents could not be re-encrypted (listed above); fix them, then run again with RESUME=1"
       exit 4 ;;
    *) say "re-encryption failed (exit $status); run again with RESUME=1 to continue"
       exit "$status" ;;
esac

# 4 and 5. For each retired key: audit that no document references it, then disable it.
for key in $old; do
    say "auditing references to the old key $key"
    # shellcheck disable=SC2086
    if ! $fc audit --schema "$schema" $nsopts --key "$key" $keyopts; then
        say "documents still reference $key (written under it after step 2?): run again with RESUME=1"
        exit 1
    fi
    # shellcheck disable=SC2086
    $fc keys disable "$key" $nsopts $keyopts
    say "disabled $key; destroy it once older backups have expired: $fc keys destroy $key"
done
say "done: every document of $* is under $new"
