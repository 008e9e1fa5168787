//! Fuzzes what the broker does with a client's bytes: framing, decoding, validation.
//! Run: `cargo +nightly fuzz run frames fuzz/seeds/frames -- -dict=fuzz/frames.dict`
//! (from the repository root). See `check.rs` for what must hold.

#![no_main]

#[path = "../check.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::check(data));
