//! Fuzz target: see twill_ipam::fuzz_checks::lease_key.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| twill_ipam::fuzz_checks::lease_key(data));
