//! `fieldcrypt bench` records which AEAD library ran, fieldcrypt's and its bare baseline's
//! alike: RustCrypto, or aws-lc-rs for AES-256-GCM and ChaCha20-Poly1305 when the tool is built
//! with feature `aead-aws-lc`. Untimed: one document per trial, one trial.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

// Not `tests/support.rs`: Cargo would build that as a test binary of its own.
#[path = "support/process.rs"]
mod support;
use support::run;

const SUITES: [&str; 4] = [
    "AES-256-GCM",
    "ChaCha20-Poly1305",
    "XChaCha20-Poly1305",
    "AES-256-SIV-deterministic",
];

/// The library this build must report for `suite`.
fn expected(suite: &str) -> &'static str {
    let aws_lc =
        cfg!(feature = "aead-aws-lc") && matches!(suite, "AES-256-GCM" | "ChaCha20-Poly1305");
    if aws_lc {
        "aws-lc-rs (AWS-LC "
    } else {
        "RustCrypto"
    }
}

fn json(args: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let out = run(dir.path(), args, None, &[]);
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap()
}

const UNTIMED: [&str; 7] = [
    "--documents",
    "1",
    "--trials",
    "1",
    "--warmup",
    "0",
    "--json",
];

#[test]
fn w1_and_w2_reports_name_the_aead_backend_of_every_suite() {
    for suite in SUITES {
        let w1 = json(&[&["bench", "w1", "--suite", suite][..], &UNTIMED].concat());
        let backends = &w1["aead_backend"];
        for s in SUITES {
            let b = backends["suites"][s].as_str().unwrap();
            assert!(b.starts_with(expected(s)), "{s}: {b}");
        }
        assert_eq!(backends["csfle_qe"], "RustCrypto");
        // The baseline row says when it is not RustCrypto's.
        let baseline = w1["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["kind"] == "baseline")
            .unwrap();
        let what = baseline["what"].as_str().unwrap();
        assert_eq!(
            what.contains("(aws-lc-rs)"),
            expected(suite) != "RustCrypto",
            "{what}"
        );
    }

    // W2's baselines seal and open with the same library (a failed open would be an error).
    for suite in ["AES-256-GCM", "ChaCha20-Poly1305"] {
        let w2 = json(
            &[
                &[
                    "bench", "w2", "--suite", suite, "--docs", "20", "--path", "all",
                ][..],
                &UNTIMED,
            ]
            .concat(),
        );
        let b = w2["aead_backend"]["suites"][suite].as_str().unwrap();
        assert!(b.starts_with(expected(suite)), "{b}");
        assert!(w2["results"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "bare_aead_seal"));
    }
}

#[test]
fn the_printed_header_names_the_aead_backend() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        dir.path(),
        // The untimed flags without `--json`: the table and its header.
        &[&["bench", "w1"][..], &UNTIMED[..UNTIMED.len() - 1]].concat(),
        None,
        &[],
    );
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("AEAD backend"))
        .unwrap_or_else(|| panic!("no backend line in {}", out.stdout));
    assert!(line.contains("CSFLE and QE: RustCrypto"), "{line}");
    if cfg!(feature = "aead-aws-lc") {
        assert!(line.contains("aws-lc-rs (AWS-LC "), "{line}");
        assert!(
            line.contains("RustCrypto for XChaCha20-Poly1305, AES-256-SIV-deterministic"),
            "{line}"
        );
    } else {
        assert!(
            line.contains(
                "RustCrypto for AES-256-GCM, ChaCha20-Poly1305, XChaCha20-Poly1305, \
                 AES-256-SIV-deterministic"
            ),
            "{line}"
        );
        assert!(!line.contains("aws-lc"), "{line}");
    }
}
