//! Routing answers by their id without reading their result.

use super::conn::split_answer;
use super::*;

fn frame<R: serde::Serialize>(f: &ServerFrame<R>) -> Vec<u8> {
    let mut buf = Vec::new();
    wire::encode(f, &mut buf);
    buf.pop(); // the newline, as FrameReader hands frames out
    buf
}

#[test]
fn answers_are_found_without_reading_their_result() {
    let list = PeerList {
        next: None,
        peers: Vec::new(),
    };
    let bytes = frame(&ServerFrame::result(
        Some(18_446_744_073_709_551_615),
        &list,
    ));
    let (id, at) = split_answer(&bytes).expect("a broker answer");
    assert_eq!(id, u64::MAX);
    let back: PeerList = Encoded { bytes, at }.read().unwrap();
    assert!(back.peers.is_empty());

    // Anything else goes the general way.
    let refused = ErrorBody::new(ErrorCode::UnknownPeer, "no such peer");
    assert_eq!(
        split_answer(&frame(&ServerFrame::<()>::error(Some(3), refused))),
        None
    );
    assert_eq!(split_answer(br#"{"id":,"result":{}}"#), None);
    assert_eq!(split_answer(br#"{"id":1,"result":"#), None);
    assert_eq!(
        split_answer(br#"{"id":123456789012345678901,"result":{}}"#),
        None
    );
    assert_eq!(split_answer(br#"{"deliver":{"id":"x"}}"#), None);

    // A frame with more after its result is found, and then fails to decode.
    let bytes = br#"{"id":4,"result":{"peers":[]},"error":{}}"#.to_vec();
    let (id, at) = split_answer(&bytes).unwrap();
    assert_eq!(id, 4);
    assert!(Encoded { bytes, at }.read::<PeerList>().is_err());
}
