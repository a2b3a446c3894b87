//! Arbitrary bytes as a KMIP server's TTLV response to each operation the `kmip` provider
//! sends (`cargo fuzz run kmip_response --features kmip`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fieldcrypt::kms::__fuzz_kmip_response(data);
});
