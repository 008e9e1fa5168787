//! What must hold for any bytes a client can send: shared by the fuzz target
//! (`fuzz_targets/frames.rs`) and the regression test that replays every saved input
//! (`tests/fuzz_regressions.rs`).
//!
//! The bytes are split into frames by the broker's own [`FrameReader`] (through a read
//! buffer whose size the input picks, so frame boundaries fall everywhere), and each frame
//! is decoded and validated as the broker does. Nothing may panic; every refusal must say
//! something; a frame that decodes must survive being written out and read back; and what
//! validates must be within the limits.

use claude_peers::broker::frame::{self, MAX_ID_BYTES, MAX_SUMMARY_BYTES};
use claude_peers::config::Limits;
use claude_peers::protocol::Request;
use claude_peers::wire::{FrameReader, ReadError};

/// The largest frame in this check: small, so the limit is reached often.
const MAX: usize = 4096;

pub fn check(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let capacity = usize::from(first % 64) + 1;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let reader = tokio::io::BufReader::with_capacity(capacity, rest);
        let mut frames = FrameReader::new(reader, MAX);
        let mut consumed = 0usize;
        loop {
            match frames.next().await {
                Ok(Some(bytes)) => {
                    assert!(bytes.len() <= MAX, "frame over the limit");
                    assert!(!bytes.contains(&b'\n'), "newline inside a frame");
                    consumed += bytes.len() + 1;
                    assert!(consumed <= rest.len() + 1, "frames longer than the input");
                    one_frame(bytes);
                }
                Ok(None) => break,
                Err(ReadError::TooLarge(max)) => {
                    assert_eq!(max, MAX);
                    break;
                }
                Err(ReadError::Busy) => unreachable!("no budget was set"),
                Err(ReadError::Io(e)) => panic!("reading from memory failed: {e}"),
            }
        }
    });
}

fn one_frame(bytes: &[u8]) {
    let limits = Limits::default();
    let frame = match frame::decode(bytes) {
        Ok(Some(f)) => f,
        Ok(None) => {
            assert!(
                bytes.iter().all(u8::is_ascii_whitespace),
                "non-blank frame ignored"
            );
            return;
        }
        Err(bad) => {
            assert!(!bad.error.message.is_empty(), "refusal without a message");
            return;
        }
    };
    // Written out and read back, a decoded frame means the same thing.
    let again = serde_json::to_vec(&frame).expect("a decoded frame serializes");
    let back = frame::decode(&again)
        .unwrap_or_else(|b| panic!("re-encoded frame refused: {:?}", b.error))
        .expect("re-encoded frame is not blank");
    assert_eq!(
        serde_json::to_value(&frame).unwrap(),
        serde_json::to_value(&back).unwrap(),
        "round trip changed the frame"
    );
    let verdict = frame::validate(&frame.request, &limits);
    assert_eq!(
        verdict.is_ok(),
        frame::validate(&back.request, &limits).is_ok(),
        "validation depends on the encoding"
    );
    if let Err(e) = verdict {
        assert!(!e.message.is_empty(), "refusal without a message");
        return;
    }
    match &frame.request {
        Request::Send(s) => {
            assert!(!s.to.is_empty() && s.to.len() <= limits.broadcast_limit);
            assert!(s.text.len() <= limits.max_message_bytes && !s.text.trim().is_empty());
            for to in &s.to {
                assert!(claude_peers::names::PeerName::new(to).is_ok());
            }
        }
        Request::Broadcast(b) => {
            assert!(b.text.len() <= limits.max_message_bytes && !b.text.trim().is_empty());
            assert!(
                b.in_reply_to
                    .as_ref()
                    .is_none_or(|r| r.len() <= MAX_ID_BYTES)
            );
        }
        Request::SetSummary(s) => assert!(s.summary.len() <= MAX_SUMMARY_BYTES),
        Request::Register(r) => {
            assert!(!r.context.cwd.is_empty());
            assert!(claude_peers::names::PeerName::new(&r.name).is_ok());
        }
        _ => {}
    }
}
