//! Fuzz target: see twill_ipam::fuzz_checks::subnet_env.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| twill_ipam::fuzz_checks::subnet_env(data));
