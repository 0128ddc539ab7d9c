//! Fuzz target: see twill_cni::fuzz_checks::conflist.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| twill_cni::fuzz_checks::conflist(data));
