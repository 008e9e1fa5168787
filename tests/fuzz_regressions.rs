//! Replays saved inputs through the fuzz target's own check (`fuzz/check.rs`), on stable
//! Rust, in every CI run: the fuzzer's seeds (`fuzz/seeds/frames/`), and adversarial
//! inputs kept as regressions (`fuzz/regressions/frames/`: deep nesting, bad UTF-8, lone
//! surrogates, huge numbers, duplicate fields, control characters, frames over the limit).
//! A crasher that `cargo fuzz` finds is minimized (`cargo fuzz tmin`) and added there.

#[path = "../fuzz/check.rs"]
mod check;

use std::path::Path;

fn replay(dir: &str) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| check::check(&data));
        assert!(outcome.is_ok(), "{} breaks the frame check", path.display());
        n += 1;
    }
    n
}

#[test]
fn seeds_pass_the_frame_check() {
    assert!(replay("fuzz/seeds/frames") >= 3);
}

#[test]
fn saved_adversarial_inputs_pass_the_frame_check() {
    assert!(replay("fuzz/regressions/frames") >= 12);
}
