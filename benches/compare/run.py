#!/usr/bin/env python3
"""fieldcrypt against its peers, on the same machine, in one run (docs/BENCHMARKS.md).

Workloads (as in fieldcrypt's own benchmarks):
  W1  MongoDB's bulk-decryption benchmark: one document of 1500 fields key0001.. holding
      encrypted strings "value 0001".., decrypted whole, repeatedly; documents/s, median of trials.
  W2  user-like documents (~250 bytes, 3 encrypted fields of ~32 bytes, one nested): encrypt and
      decrypt, raw BSON in and out; documents/s per core.

Peers:
  fieldcrypt               `fieldcrypt bench` (the CLI), else criterion's `cargo bench --bench transform`
  libmongocrypt            through PyPI's pymongocrypt, whole-document decryption with
                           mongocrypt_ctx_decrypt_init (MongoDB's benchmark, bindings form):
                           the wheel's own library (crypto through Python callbacks), and with
                           PYMONGOCRYPT_LIB=/path/to/libmongocrypt.so a native build as well,
                           each in its own process (pymongocrypt loads one library per process)
  Python AES-GCM / Fernet  pyca/cryptography (OpenSSL) per field, BSON decoded and re-encoded

Prints a table with ratios and writes benches/compare/results.json; plot.py draws it.

    python3 benches/compare/run.py            # sets up target/compare-venv on first use
    python3 benches/compare/run.py --quick    # a smoke run (short trials, fewer documents)
    PYMONGOCRYPT_LIB=/opt/libmongocrypt-1.18.2/libmongocrypt.so python3 benches/compare/run.py

W1 runs at MongoDB's thread counts, 1, 2, 8 and 64 (libmongocrypt's bindings/python/test/
performance/perf_test.py), for every format; W2 at 1 and 2 (--w2-threads).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SUITES = ("AES-256-GCM", "ChaCha20-Poly1305", "XChaCha20-Poly1305", "AES-256-SIV-deterministic")
W1_FIELDS = 1500
# W1's formats in `fieldcrypt bench w1`: MongoDB's two, then the fieldcrypt suites.
W1_FORMATS = ("csfle", "qe-unindexed", *SUITES)
# Measured on the earlier (Zen 1) machines with a native libmongocrypt 1.18.2 (OpenSSL crypto),
# one thread; quoted in the table only when this run has no native library (PYMONGOCRYPT_LIB).
NATIVE_LIBMONGOCRYPT_W1 = {"documents_per_second": 127.0, "version": "1.18.2", "threads": 1}


# ---------------------------------------------------------------------------------------------
# environment


def pinned() -> dict[str, str]:
    """The `name==version` pins of requirements.txt (each peer is pinned exactly; a line with any
    other specifier is refused rather than left unchecked)."""
    pins = {}
    for line in (HERE / "requirements.txt").read_text().splitlines():
        req = line.split("#")[0].strip()
        if not req:
            continue
        name, sep, version = req.partition("==")
        if not sep or any(c in req for c in "<>~!;[ ") or "=" in version:
            sys.exit(f"benches/compare/requirements.txt: pin every peer as name==version: {req!r}")
        pins[name.lower()] = version
    return pins


# Run by an interpreter to say whether it has every pinned distribution at its pinned version;
# prints what differs.
CHECK_PINS = """
import json, sys
from importlib.metadata import version, PackageNotFoundError
bad = []
for name, want in json.loads(sys.argv[1]).items():
    try:
        have = version(name)
    except PackageNotFoundError:
        have = None
    if have != want:
        bad.append(f"{name} {have or 'missing'} (pinned {want})")
print("; ".join(bad))
sys.exit(1 if bad else 0)
"""

# Set when this script re-runs itself in a virtualenv it has just set up: if the peers are
# still not the pinned versions there, it stops instead of setting up again.
SET_UP = "FIELDCRYPT_COMPARE_VENV_SET_UP"


def pins_differ(python: str, pins: str) -> str | None:
    """None when `python` has every pin; otherwise what differs."""
    check = subprocess.run([python, "-c", CHECK_PINS, pins], capture_output=True, text=True)
    if check.returncode == 0:
        return None
    return check.stdout.strip() or check.stderr.strip() or f"exit status {check.returncode}"


def ensure_peers(args) -> None:
    """Re-runs this script inside a virtualenv whose peers are the versions requirements.txt
    pins: a peer of another version (the dev server's environment installs cryptography
    unpinned) would be measured as if it were the pinned one (cryptography 51's Fernet is
    2.6-6x its 50's). With --venv, that environment only, set up or updated if it differs;
    otherwise this interpreter, target/compare-venv or the dev server's environment, and
    target/compare-venv set up or updated if none has the pins."""
    pins = json.dumps(pinned())
    differs = pins_differ(sys.executable, pins)
    here = not args.venv or Path(sys.prefix).resolve() == Path(args.venv).resolve()
    if differs is None and here:
        return
    if os.environ.get(SET_UP):
        sys.exit(f"{sys.executable}: the peers are still not the pinned versions after "
                 f"pip install -r benches/compare/requirements.txt: {differs}")
    if args.venv:
        candidates = [Path(args.venv)]
    else:
        print(f"not using {sys.executable}: {differs}", file=sys.stderr)
        candidates = [REPO / "target/compare-venv", REPO / "target/fieldcrypt-devserver/venv"]
    for venv in candidates:
        py = venv / "bin/python"
        if py.exists():
            differs = pins_differ(str(py), pins)
            if differs is None:
                os.execv(str(py), [str(py), *sys.argv])
            print(f"not using {venv}: {differs}", file=sys.stderr)
    venv = candidates[0]
    py = venv / "bin/python"
    print(f"setting up {venv} (pip install -r benches/compare/requirements.txt)", file=sys.stderr)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    if subprocess.run([str(py), "-m", "pip", "--version"], capture_output=True).returncode != 0:
        sys.exit(f"{venv} has no pip: remove it, or give another --venv")
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "-r", str(HERE / "requirements.txt")], check=True
    )
    os.environ[SET_UP] = "1"
    os.execv(str(py), [str(py), *sys.argv])


# The CPU features the AEAD code paths are chosen by, recorded with every run.
CPU_FLAGS = ("aes", "pclmulqdq", "avx2", "avx512f", "vaes", "vpclmulqdq", "sha_ni", "bmi2")


def machine() -> dict:
    fields = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    flags = fields.get("Flags", "").split()
    return {
        "cpu_model": fields.get("Model name"),
        "lscpu": {k: fields.get(k) for k in ("Vendor ID", "Model name", "CPU family", "Model",
                                             "Stepping", "CPU(s)", "Thread(s) per core",
                                             "L2 cache", "L3 cache", "Hypervisor vendor")},
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def git_commit() -> str | None:
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True)
    return r.stdout.strip() or None


# ---------------------------------------------------------------------------------------------
# measuring Python peers: the same method as `fieldcrypt bench`


def timed_loop(step, seconds: float) -> float:
    """Calls step() (which returns documents done) for `seconds`; returns documents/s."""
    start = time.perf_counter()
    done = 0
    while True:
        done += step()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def measure(make_step, *, threads: int, seconds: float, trials: int, warmup: float) -> dict:
    """Median documents/s across trials; each thread runs its own loop (make_step() per thread)."""
    steps = [make_step() for _ in range(threads)]
    if warmup > 0:
        timed_loop(steps[0], warmup)
    totals, per_thread = [], []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(trials):
            barrier = threading.Barrier(threads)

            def run(step):
                barrier.wait()
                return timed_loop(step, seconds)

            rates = list(pool.map(run, steps))
            totals.append(sum(rates))
            per_thread.extend(rates)
    return {
        "threads": threads,
        "documents_per_second": summary(totals),
        "per_thread_documents_per_second": summary(per_thread),
        "trials": [round(x, 1) for x in totals],
    }


def summary(xs) -> dict:
    return {"median": round(statistics.median(xs), 1), "min": round(min(xs), 1),
            "max": round(max(xs), 1)}


# ---------------------------------------------------------------------------------------------
# W1 and W2 data for the Python peers


def w1_plain():
    return {f"key{i:04}": f"value {i:04}" for i in range(1, W1_FIELDS + 1)}


def w2_user(i: int) -> dict:
    """workloads::w2_user(i) in testkit/src/workloads.rs, field for field."""
    import datetime

    import bson

    return {
        "_id": bson.Int64(i),
        "username": f"user{i:08}",
        "created": datetime.datetime.fromtimestamp((1_700_000_000_000 + i) / 1000, datetime.UTC),
        "plan": "pro",
        "logins": bson.Int64(i),
        "email": f"user{i:08}@example-mail.com......",
        "ssn": f"{i % 1000:03}-{i % 100:02}-{i % 10000:04}-padding-to-32-bytes",
        "profile": {"country": "NL", "phone": f"+31 6 {i:08} ext. 000000000", "lang": "nl"},
    }


W2_FIELDS = (("email",), ("ssn",), ("profile", "phone"))


class FieldCipher:
    """One value in, one BSON Binary out: how applications encrypt fields with pyca/cryptography.
    AES-GCM binds the field path as associated data, as fieldcrypt does; Fernet cannot."""

    def __init__(self, kind: str):
        from cryptography.fernet import Fernet
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.kind = kind
        if kind == "fernet":
            self.f = Fernet(Fernet.generate_key())
        else:
            self.g = AESGCM(AESGCM.generate_key(bit_length=256))

    def encrypt(self, path: bytes, value: str) -> bytes:
        data = value.encode()
        if self.kind == "fernet":
            return self.f.encrypt(data)
        nonce = os.urandom(12)
        return nonce + self.g.encrypt(nonce, data, path)

    def decrypt(self, path: bytes, blob: bytes) -> str:
        if self.kind == "fernet":
            return self.f.decrypt(blob).decode()
        return self.g.decrypt(blob[:12], blob[12:], path).decode()


def python_w1(kind: str, opts) -> list[dict]:
    import bson

    c = FieldCipher(kind)
    enc = bson.encode({k: c.encrypt(k.encode(), v) for k, v in w1_plain().items()})
    # Self-check.
    out = bson.decode(enc)
    assert c.decrypt(b"key0001", out["key0001"]) == "value 0001"

    def make_step():
        doc = bytes(enc)  # each thread its own copy

        def step():
            d = bson.decode(doc)
            bson.encode({k: c.decrypt(k.encode(), v) for k, v in d.items()})
            return 1

        return step

    return [measure(make_step, threads=t, seconds=opts.seconds, trials=opts.trials,
                    warmup=opts.warmup) for t in opts.threads]


def python_w2(kind: str, opts) -> dict:
    import bson

    c = FieldCipher(kind)
    plain = [bson.encode(w2_user(i)) for i in range(opts.w2_docs)]

    def each_field(raw: bytes, op) -> bytes:
        """`op(path, value)` applied to every W2 field of the document."""
        d = bson.decode(raw)
        for path in W2_FIELDS:
            parent = d
            for p in path[:-1]:
                parent = parent[p]
            parent[path[-1]] = op(".".join(path).encode(), parent[path[-1]])
        return bson.encode(d)

    def encrypt_doc(raw: bytes) -> bytes:
        return each_field(raw, c.encrypt)

    def decrypt_doc(raw: bytes) -> bytes:
        return each_field(raw, c.decrypt)

    enc = [encrypt_doc(d) for d in plain]
    assert decrypt_doc(enc[0]) == plain[0], "W2 round trip"

    def cycling(docs, fn):
        def make_step():
            mine, at = list(docs), [0]

            def step():
                i = at[0]
                chunk = mine[i:i + 64]
                for d in chunk:
                    fn(d)
                at[0] = 0 if i + 64 >= len(mine) else i + 64
                return len(chunk)

            return step

        return make_step

    kw = dict(threads=1, seconds=opts.seconds, trials=opts.trials, warmup=opts.warmup)
    return {"encrypt": measure(cycling(plain, encrypt_doc), **kw),
            "decrypt": measure(cycling(enc, decrypt_doc), **kw)}


# ---------------------------------------------------------------------------------------------
# libmongocrypt through pymongocrypt


class KeyVaultServer:
    """SecantusDB on a free loopback port, stopped on exit."""

    def __init__(self):
        exe = shutil.which("secantusd-py", path=str(Path(sys.executable).parent))
        for alt in (REPO / "target/fieldcrypt-devserver/venv/bin/secantusd-py",):
            exe = exe or (str(alt) if alt.exists() else None)
        if not exe:
            raise RuntimeError("secantusd-py not found: pip install SecantusDB==0.7.0b3")
        self.proc = subprocess.Popen(
            [exe, "--host", "127.0.0.1", "--port", "0", "--storage-path", ":memory:"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        self.port = None
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                break
            if "listening on 127.0.0.1:" in line:
                self.port = int(line.rsplit(":", 1)[1].split()[0])
                break
        if self.port is None:
            self.stop()
            raise RuntimeError("the key vault server did not start")
        # Keep draining its log so it never blocks on a full pipe.
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def loaded_library(fragment: str) -> str | None:
    """The path of the first shared object mapped into this process whose name holds `fragment`."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split(None, 5)[-1].strip() if len(line.split(None, 5)) == 6 else ""
                if fragment in Path(path).name:
                    return path
    except OSError:
        pass
    return None


def library_info(lib, native: bool) -> dict:
    """Which libmongocrypt this process runs, and whose crypto it uses."""
    from pymongocrypt.binding import libmongocrypt_version

    path = loaded_library("libmongocrypt")
    info = {
        "pymongocrypt_lib_env": os.environ.get("PYMONGOCRYPT_LIB"),
        "path": path and str(Path(path).resolve()),
        "mongocrypt_version": libmongocrypt_version(),
        "native_crypto": native,
    }
    if native:
        crypto = loaded_library("libcrypto")
        openssl = None
        if crypto:
            try:
                import ctypes

                c = ctypes.CDLL(crypto)
                c.OpenSSL_version.restype = ctypes.c_char_p
                c.OpenSSL_version.argtypes = [ctypes.c_int]
                openssl = c.OpenSSL_version(0).decode()
            except (OSError, AttributeError):
                pass
        info["crypto_backend"] = (f"native, in libmongocrypt: {openssl or 'libcrypto'} "
                                  "(the libcrypto mapped into the process)")
        info["libcrypto"] = crypto
    else:
        import cryptography

        info["crypto_backend"] = ("pymongocrypt's Python crypto callbacks "
                                  f"(pyca/cryptography {cryptography.__version__})")
    return info


def libmongocrypt_w1(opts) -> dict:
    import bson
    import pymongocrypt
    from bson.binary import STANDARD
    from bson.codec_options import CodecOptions
    from pymongo import MongoClient
    from pymongo.encryption import Algorithm, ClientEncryption
    from pymongocrypt.binding import lib, libmongocrypt_version
    from pymongocrypt.mongocrypt import MongoCrypt, MongoCryptOptions
    from pymongocrypt.synchronous.state_machine import run_state_machine

    server = KeyVaultServer()
    try:
        client = MongoClient(f"mongodb://127.0.0.1:{server.port}/?directConnection=true",
                             uuidRepresentation="standard")
        master = os.urandom(96)
        kms = {"local": {"key": master}}
        ce = ClientEncryption(kms, "encryption.__keyVault", client,
                              CodecOptions(uuid_representation=STANDARD))
        key_id = ce.create_data_key("local")
        det = Algorithm.AEAD_AES_256_CBC_HMAC_SHA_512_Deterministic
        doc = {k: ce.encrypt(v, det, key_id=key_id) for k, v in w1_plain().items()}
        encoded = bson.encode(doc)

        # MongoDB's benchmark in its preferred form: one mongocrypt_t handle shared by all
        # threads, mongocrypt_ctx_decrypt_init on the whole document. The data key comes from the
        # key vault on the first decryption and is cached by libmongocrypt after that.
        callback = ce._io_callbacks  # pymongo's MongoCryptCallback over the key vault
        handle = MongoCrypt(MongoCryptOptions(kms), callback)
        crypto_native = bool(lib.mongocrypt_is_crypto_available())
        library = library_info(lib, crypto_native)
        print(f"  libmongocrypt {library['mongocrypt_version']} from {library['path']}, "
              f"crypto: {library['crypto_backend']}", file=sys.stderr)

        def decrypt_whole(raw: bytes) -> bytes:
            with handle.decryption_context(raw) as ctx:
                return run_state_machine(ctx, callback)

        out = bson.decode(decrypt_whole(encoded))
        assert out["key0001"] == "value 0001" and len(out) == W1_FIELDS, "libmongocrypt self-check"

        def make_step():
            mine = bytes(encoded)

            def step():
                decrypt_whole(mine)
                return 1

            return step

        runs = []
        for t in opts.threads:
            print(f"  libmongocrypt W1, {t} thread(s)", file=sys.stderr)
            runs.append(measure(make_step, threads=t, seconds=opts.seconds, trials=opts.trials,
                                warmup=opts.warmup))

        # Also what an application calling ClientEncryption.decrypt per value gets.
        values = list(doc.values())

        def make_explicit_step():
            at = [0]

            def step():
                # 100 values = 1/15 of a document per call.
                for v in values[at[0]:at[0] + 100]:
                    ce.decrypt(v)
                at[0] = (at[0] + 100) % W1_FIELDS
                return 100 / W1_FIELDS

            return step

        explicit = measure(make_explicit_step, threads=1, seconds=opts.seconds,
                           trials=max(3, opts.trials // 2), warmup=min(opts.warmup, 0.5))
        ce.close()
        client.close()
        return {
            "method": "MongoCrypt.decryption_context (mongocrypt_ctx_decrypt_init) on the whole "
                      "document, one handle shared by the threads; key cached after the first",
            "pymongocrypt": pymongocrypt.__version__,
            "libmongocrypt": libmongocrypt_version(),
            "native_crypto": crypto_native,
            "library": library,
            "runs": runs,
            "explicit_decrypt_per_value": explicit,
        }
    finally:
        server.stop()


def libmongocrypt_in_subprocess(opts, env_lib: str | None) -> dict:
    """libmongocrypt_w1 in a child process with PYMONGOCRYPT_LIB set to `env_lib` (or unset: the
    wheel's library), since pymongocrypt loads its library once per process."""
    env = dict(os.environ)
    env.pop("PYMONGOCRYPT_LIB", None)
    if env_lib:
        env["PYMONGOCRYPT_LIB"] = env_lib
    import tempfile

    fd, name = tempfile.mkstemp(prefix="fieldcrypt-compare-", suffix=".json")
    os.close(fd)
    out = Path(name)
    argv = [sys.executable, str(Path(__file__).resolve()), "--libmongocrypt-only",
            "--seconds", str(opts.seconds), "--trials", str(opts.trials),
            "--warmup", str(opts.warmup), "--threads", ",".join(map(str, opts.threads)),
            "--out", str(out)]
    subprocess.run(argv, env=env, check=True)
    try:
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# fieldcrypt


def find_cli(args) -> str | None:
    """A `fieldcrypt` binary with the `bench` subcommand, building it if needed."""
    cands = [args.fieldcrypt_bin or os.environ.get("FIELDCRYPT_BIN")]
    if not cands[0] and not args.no_build and shutil.which("cargo"):
        r = subprocess.run(["cargo", "build", "--release", "--bin", "fieldcrypt"], cwd=REPO)
        if r.returncode != 0:
            print("warning: cargo build --release --bin fieldcrypt failed", file=sys.stderr)
    cands.append(str(REPO / "target/release/fieldcrypt"))
    for c in cands:
        if c and Path(c).exists() and subprocess.run(
                [c, "bench", "w1", "--help"], capture_output=True).returncode == 0:
            return c
    return None


def cli_json(cli: str, *argv: str) -> dict:
    out = subprocess.run([cli, "bench", *argv, "--json"], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out)


def row(report: dict, name: str) -> dict:
    return next(r for r in report["results"] if r["name"] == name)


def fieldcrypt_cli(cli: str, opts) -> dict:
    common = ["--seconds", str(opts.seconds), "--trials", str(opts.trials),
              "--warmup", str(opts.warmup)]
    w1 = {}
    for fmt in W1_FORMATS:
        fargs = ["--format", fmt] if fmt in ("csfle", "qe-unindexed") else ["--suite", fmt]
        w1[fmt] = []
        for t in opts.threads:
            print(f"  fieldcrypt W1 {fmt}, {t} thread(s)", file=sys.stderr)
            rep = cli_json(cli, "w1", *fargs, "--threads", str(t), *common)
            r = row(rep, "decrypt_raw")
            w1[fmt].append({
                "threads": t,
                "documents_per_second": r["documents_per_second"],
                "per_thread_documents_per_second": r["per_thread_documents_per_second"],
                "trials": r["trials"],
                "bare_aead_documents_per_second": row(rep, "bare_aead_open")["documents_per_second"],
                "over_bare_aead": rep["ratios"].get("decrypt_raw_over_bare_aead"),
                "bare_aead": row(rep, "bare_aead_open")["what"],
            })
    w2 = {}
    for t in opts.w2_threads:
        print(f"  fieldcrypt W2 AES-256-GCM, {t} thread(s)", file=sys.stderr)
        rep = cli_json(cli, "w2", "--docs", str(opts.w2_docs), "--threads", str(t), *common)
        w2[str(t)] = {name: {k: row(rep, name)[k] for k in
                             ("documents_per_second", "per_thread_documents_per_second", "trials")}
                      for name in ("encrypt_raw", "decrypt_raw", "bare_aead_seal", "bare_aead_open")}
    return {"source": f"{cli} bench (--json)", "w1": w1, "w2": w2}


def fieldcrypt_w4(cli: str, opts) -> dict:
    """W4 (rotation against a plain copy and a plain rewrite) on a dev server the CLI starts."""
    print(f"  fieldcrypt W4, {opts.w4_docs} documents", file=sys.stderr)
    split = ["--partitions", opts.w4_partitions] if opts.w4_partitions else []
    return cli_json(cli, "w4", "--documents", opts.w4_docs, "--trials", str(opts.w4_trials),
                    *split)


def fieldcrypt_criterion(opts) -> dict:
    """Fallback: criterion's benches, read from their estimates.json files (per iteration)."""
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    cmd = ["cargo", "bench", "--no-default-features", "--bench", "transform", "--",
           "--warm-up-time", str(max(opts.warmup, 0.5)),
           "--measurement-time", str(max(opts.seconds * opts.trials, 2)),
           "W1_bulk_decrypt|W2_user_documents/(encrypt|decrypt)_raw"]
    print("  " + " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    found = {}
    for path in glob.glob(str(target / "criterion/**/new/benchmark.json"), recursive=True):
        meta = json.loads(Path(path).read_text())
        est = json.loads((Path(path).parent / "estimates.json").read_text())
        per_iter = (meta.get("throughput") or {}).get("Elements", 1)
        ns = est["median"]["point_estimate"]
        lo, hi = est["median"]["confidence_interval"]["lower_bound"], \
            est["median"]["confidence_interval"]["upper_bound"]
        found[(meta["group_id"], meta["function_id"])] = {
            "median": round(per_iter * 1e9 / ns, 1),
            "min": round(per_iter * 1e9 / hi, 1), "max": round(per_iter * 1e9 / lo, 1)}
    w1 = {}
    for fmt, fid in [("csfle", "csfle_deterministic"), *[(s, s) for s in SUITES]]:
        if ("W1_bulk_decrypt", fid) in found:
            d = found[("W1_bulk_decrypt", fid)]
            w1[fmt] = [{"threads": 1, "documents_per_second": d,
                        "per_thread_documents_per_second": d}]
    w2 = {"1": {name: {"documents_per_second": found[("W2_user_documents", name)],
                       "per_thread_documents_per_second": found[("W2_user_documents", name)]}
                for name in ("encrypt_raw", "decrypt_raw")
                if ("W2_user_documents", name) in found}}
    return {"source": "cargo bench --bench transform (criterion median, 95% CI as min/max; "
                      "no same-run bare-AEAD baseline, one thread)", "w1": w1, "w2": w2}


# ---------------------------------------------------------------------------------------------
# report


def med(m: dict) -> float:
    return m["documents_per_second"]["median"]


def print_table(res: dict) -> None:
    fc = res["fieldcrypt"]
    lines = []

    def line(workload, impl, threads, dps, ref, note=""):
        ratio = f"{ref / dps:9.1f}×" if ref and dps else " " * 10
        lines.append(f"{workload:<4} {impl:<46} {threads:>3} {dps:>12,.0f} {ratio}  {note}")

    print(f"\n{'':4} {'implementation':<46} {'thr':>3} {'docs/s':>12} {'fc ÷ it':>10}")
    for t in res["params"]["threads"]:
        csfle = next((r for r in fc["w1"].get("csfle", []) if r["threads"] == t), None)
        gcm = next((r for r in fc["w1"].get("AES-256-GCM", []) if r["threads"] == t), None)
        ref = med(csfle) if csfle else None
        for fmt, runs in fc["w1"].items():
            for r in runs:
                if r["threads"] == t:
                    name = "fieldcrypt CSFLE (deterministic)" if fmt == "csfle" else f"fieldcrypt {fmt}"
                    line("W1", name, t, med(r), ref if fmt == "csfle" else None)
        native_run = False
        for key in ("libmongocrypt", "libmongocrypt_wheel"):
            lm = res.get(key)
            if not lm:
                continue
            native = lm.get("native_crypto")
            native_run = native_run or native
            label = (f"libmongocrypt {lm['libmongocrypt']} native ({'OpenSSL' if native else '?'})"
                     if native else f"libmongocrypt {lm['libmongocrypt']} (wheel, Python crypto)")
            for r in lm["runs"]:
                if r["threads"] == t:
                    line("W1", label, t, med(r), ref, "vs fieldcrypt CSFLE")
            if t == 1:
                line("W1", f"libmongocrypt {'native' if native else 'wheel'}: "
                       "ClientEncryption.decrypt per value", 1,
                     med(lm["explicit_decrypt_per_value"]), ref, "vs fieldcrypt CSFLE")
        if t == 1 and not native_run:
            line("W1", "libmongocrypt native 1.18.2 (quoted, not this run)", 1,
                 NATIVE_LIBMONGOCRYPT_W1["documents_per_second"], ref, "vs fieldcrypt CSFLE")
        for kind in ("aesgcm", "fernet"):
            py = res.get("python", {}).get(kind)
            if py:
                for r in py["w1"]:
                    if r["threads"] == t:
                        line("W1", f"Python {'AES-GCM' if kind == 'aesgcm' else 'Fernet'} per field",
                             t, med(r), med(gcm) if gcm else None, "vs fieldcrypt AES-256-GCM")
    for op in ("encrypt", "decrypt"):
        fr = fc["w2"].get("1", {}).get(f"{op}_raw")
        ref = med(fr) if fr else None
        if fr:
            line("W2", f"fieldcrypt AES-256-GCM {op}_raw", 1, ref, None)
        for t, runs in fc["w2"].items():
            if t != "1" and f"{op}_raw" in runs:
                r = runs[f"{op}_raw"]
                line("W2", f"fieldcrypt AES-256-GCM {op}_raw (per thread {r['per_thread_documents_per_second']['median']:,.0f})",
                     int(t), med(r), None)
        for kind in ("aesgcm", "fernet"):
            py = res.get("python", {}).get(kind)
            if py:
                line("W2", f"Python {'AES-GCM' if kind == 'aesgcm' else 'Fernet'} per field, {op}", 1,
                     med(py["w2"][op]), ref, "vs fieldcrypt")
    for size in fc.get("w4", {}).get("results", []):
        n = size["documents"]
        for name, what in (("copy", "plain copy (read + insert_many)"),
                           ("rewrite", "plain rewrite (CAS writes, no crypto)"),
                           ("rotate", "fieldcrypt rotation")):
            p = size["passes"][name]
            line("W4", f"{what}, {n:,} docs, peak {p['peak_rss_kib'] / 1024:.1f} MiB", 1,
                 p["documents_per_second"]["median"], None)
        for p in size.get("partitioned", []):
            lines.append(f"W4   {p['workers']} hash partitions at once, {n:,} docs: "
                         f"{p['seconds']['median']:.3f} s, "
                         f"{p['speedup_over_one_worker']['median']:.2f}× one worker's speed; "
                         f"documents per partition {p['median_trial_documents_per_partition']}")
        r = size["ratios"]
        lines.append(f"W4   rotation time ÷ copy {r['rotate_over_copy']['median']:.2f}×, "
                     f"÷ rewrite {r['rotate_over_rewrite']['median']:.2f}× ({n:,} docs)")
    print("\n".join(lines))
    print("\n'fc ÷ it': fieldcrypt's documents/s ÷ this row's, same workload and thread count "
          "(CSFLE rows against fieldcrypt's CSFLE decryption).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="seconds per trial (default 1)")
    ap.add_argument("--trials", type=int, default=5, help="trials; medians reported (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per case")
    ap.add_argument("--threads", default="1,2,8,64",
                    help="thread counts for W1, every format (default MongoDB's: 1,2,8,64)")
    ap.add_argument("--w2-threads", default="1,2", help="thread counts for W2 (default 1,2)")
    ap.add_argument("--w2-docs", type=int, default=100_000, help="W2 distinct documents")
    ap.add_argument("--fieldcrypt-bin", help="a fieldcrypt binary with `bench` (or FIELDCRYPT_BIN)")
    ap.add_argument("--no-build", action="store_true", help="don't run cargo build first")
    ap.add_argument("--criterion", action="store_true", help="use criterion even if the CLI exists")
    ap.add_argument("--w4-docs", default="2000,8000", help="W4 collection sizes (default 2000,8000)")
    ap.add_argument("--w4-trials", type=int, default=3, help="W4 trials (default 3)")
    ap.add_argument("--w4-partitions", default="",
                    help="W4: also N hash-partitioned workers at once, e.g. 2,4 (default none)")
    ap.add_argument("--skip", default="",
                    help="comma list of: libmongocrypt,wheel,fernet,aesgcm,fieldcrypt,w4 "
                         "(wheel: the wheel's library when PYMONGOCRYPT_LIB is given)")
    ap.add_argument("--venv", help="virtualenv to use or create (default target/compare-venv)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 0.3 s × 3 trials, 5,000 W2 docs")
    ap.add_argument("--libmongocrypt-only", action="store_true",
                    help="measure only libmongocrypt (the library pymongocrypt loads: "
                         "PYMONGOCRYPT_LIB, else the wheel's) and write its JSON to --out")
    ap.add_argument("--out", default=str(HERE / "results.json"))
    opts = ap.parse_args()
    if opts.quick:
        opts.seconds, opts.trials, opts.warmup, opts.w2_docs = 0.3, 3, 0.2, 5_000
        opts.w4_docs, opts.w4_trials = "200,800", 1
    opts.threads = [int(t) for t in opts.threads.split(",") if t]
    opts.w2_threads = [int(t) for t in opts.w2_threads.split(",") if t]
    skip = set(filter(None, opts.skip.split(",")))
    native_lib = os.environ.get("PYMONGOCRYPT_LIB")
    if native_lib and not Path(native_lib).exists():
        sys.exit(f"PYMONGOCRYPT_LIB={native_lib}: no such file")
    ensure_peers(opts)
    if opts.libmongocrypt_only:
        Path(opts.out).write_text(json.dumps(libmongocrypt_w1(opts), indent=2) + "\n")
        return

    res = {
        "params": {"seconds": opts.seconds, "trials": opts.trials, "warmup": opts.warmup,
                   "threads": opts.threads, "w2_threads": opts.w2_threads,
                   "w2_documents": opts.w2_docs},
        "machine": machine(),
        "load_average_1m": {"start": load_average()},
        "fieldcrypt_commit": git_commit(),
        "native_libmongocrypt_reference": NATIVE_LIBMONGOCRYPT_W1,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if "fieldcrypt" not in skip:
        print("fieldcrypt …", file=sys.stderr)
        cli = None if opts.criterion else find_cli(opts)
        res["fieldcrypt"] = fieldcrypt_cli(cli, opts) if cli else fieldcrypt_criterion(opts)
        if cli and "w4" not in skip:
            res["fieldcrypt"]["w4"] = fieldcrypt_w4(cli, opts)
        res["load_average_1m"]["after_fieldcrypt"] = load_average()
    if "libmongocrypt" not in skip:
        # The library pymongocrypt loaded here (PYMONGOCRYPT_LIB, else the wheel's); with a
        # native one, the wheel's too, in a child process, so that both are in this run.
        print("libmongocrypt (pymongocrypt) …", file=sys.stderr)
        res["libmongocrypt"] = libmongocrypt_w1(opts)
        res["load_average_1m"]["after_libmongocrypt"] = load_average()
        if native_lib and "wheel" not in skip:
            print("libmongocrypt (the pymongocrypt wheel's own library) …", file=sys.stderr)
            res["libmongocrypt_wheel"] = libmongocrypt_in_subprocess(opts, None)
            res["load_average_1m"]["after_libmongocrypt_wheel"] = load_average()
    import cryptography

    res["python"] = {"cryptography": cryptography.__version__}
    for kind in ("aesgcm", "fernet"):
        if kind not in skip:
            print(f"Python {kind} per field …", file=sys.stderr)
            res["python"][kind] = {"w1": python_w1(kind, opts), "w2": python_w2(kind, opts)}
            res["load_average_1m"][f"after_{kind}"] = load_average()
    res["load_average_1m"]["end"] = load_average()
    Path(opts.out).write_text(json.dumps(res, indent=2) + "\n")
    if "fieldcrypt" in res:
        print_table(res)
    print(f"\nload average (1 min): {res['load_average_1m']['start']} at start, "
          f"{res['load_average_1m']['end']} at end, on {res['machine']['cpus']} CPUs; "
          f"wrote {opts.out}")


if __name__ == "__main__":
    main()
