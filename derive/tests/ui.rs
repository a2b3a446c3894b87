//! Compile-fail tests: each schema rule, and each serde option the derive cannot map, is a
//! compile error pointing at the field. The expected messages are in `ui/*.stderr`.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/fail_*.rs");
}
