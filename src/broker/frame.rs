//! What a client frame says, before any state is consulted: [`decode`] turns bytes into a
//! request or an error that names what is wrong, and [`validate`] applies every check that
//! needs only the limits (sizes, names, required fields). Both are pure, so the fuzz target
//! (`fuzz/`) and the property tests drive exactly the code the broker runs. The core then
//! sees only requests that passed both, and checks only what needs its state: who is
//! registered, who exists, whose mailbox is full.

use serde::Deserialize;

use crate::config::Limits;
use crate::names::PeerName;
use crate::protocol::*;

/// Longest summary accepted, in bytes.
pub const MAX_SUMMARY_BYTES: usize = 4096;
/// Longest message id (`in_reply_to`, acked ids), in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Longest path (`cwd`, `git_root`, `git_common_dir`), in bytes.
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest short descriptive field (`branch`, `tty`, `host`, client name and version,
/// shutdown reason), in bytes.
pub const MAX_FIELD_BYTES: usize = 256;
/// Most message ids in one `ack`.
pub const MAX_ACK_IDS: usize = 10_000;

/// A frame that could not be decoded, with the id to answer when it could be read.
#[derive(Debug)]
pub struct BadFrame {
    pub id: Option<u64>,
    pub error: ErrorBody,
}

/// Decodes one frame (without its newline). `Ok(None)` for a blank line, which is
/// ignored.
pub fn decode(bytes: &[u8]) -> Result<Option<ClientFrame>, BadFrame> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    match serde_json::from_slice::<ClientFrame>(bytes) {
        Ok(frame) => Ok(Some(frame)),
        Err(e) => Err(explain(bytes, &e)),
    }
}

/// Just enough of a frame to answer it when the rest does not parse.
#[derive(Deserialize)]
struct FrameHead {
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    op: Option<serde_json::Value>,
}

/// Why a frame did not parse: bad UTF-8 or JSON, an unknown op, or a known op with bad
/// fields; with the frame's id when it can be read.
fn explain(bytes: &[u8], e: &serde_json::Error) -> BadFrame {
    let bad = |id, code, message: String| BadFrame {
        id,
        error: ErrorBody::new(code, message),
    };
    let Ok(text) = std::str::from_utf8(bytes) else {
        return bad(
            None,
            ErrorCode::BadFrame,
            "frame is not valid UTF-8; frames are JSON text".into(),
        );
    };
    let Ok(head) = serde_json::from_str::<FrameHead>(text) else {
        return bad(
            None,
            ErrorCode::BadFrame,
            format!("frame is not a JSON object: {e}"),
        );
    };
    let id = head.id.as_ref().and_then(serde_json::Value::as_u64);
    if head.id.is_some() && id.is_none() {
        return bad(
            None,
            ErrorCode::BadRequest,
            "id must be a non-negative integer".into(),
        );
    }
    match head.op {
        Some(serde_json::Value::String(op)) if !Request::OPS.contains(&op.as_str()) => bad(
            id,
            ErrorCode::UnknownOp,
            format!("unknown op {op:?}; known ops: {}", Request::OPS.join(", ")),
        ),
        None => bad(id, ErrorCode::BadRequest, "frame has no op".into()),
        Some(_) => bad(id, ErrorCode::BadRequest, format!("bad request: {e}")),
    }
}

fn bad_request(message: impl Into<String>) -> ErrorBody {
    ErrorBody::new(ErrorCode::BadRequest, message)
}

/// Refuses a string field longer than `max` bytes.
fn at_most(field: &str, value: Option<&str>, max: usize) -> Result<(), ErrorBody> {
    match value {
        Some(v) if v.len() > max => Err(bad_request(format!(
            "{field} is {} bytes; the limit is {max}",
            v.len()
        ))),
        _ => Ok(()),
    }
}

fn name(role: &str, value: &str) -> Result<(), ErrorBody> {
    PeerName::new(value)
        .map(drop)
        .map_err(|e| ErrorBody::new(ErrorCode::BadName, format!("{role}: {e}")))
}

/// Every check on `request` that needs only the limits.
pub fn validate(request: &Request, limits: &Limits) -> Result<(), ErrorBody> {
    match request {
        Request::Hello(h) => {
            at_most("client", Some(&h.client), MAX_FIELD_BYTES)?;
            at_most("version", Some(&h.version), MAX_FIELD_BYTES)
        }
        Request::Register(r) => {
            PeerName::registrable(&r.name)
                .map_err(|e| ErrorBody::new(ErrorCode::BadName, e.to_string()))?;
            if r.context.cwd.is_empty() {
                return Err(bad_request("register needs the session's cwd"));
            }
            at_most("cwd", Some(&r.context.cwd), MAX_PATH_BYTES)?;
            at_most("git_root", r.context.git_root.as_deref(), MAX_PATH_BYTES)?;
            at_most(
                "git_common_dir",
                r.context.git_common_dir.as_deref(),
                MAX_PATH_BYTES,
            )?;
            for (field, value) in [
                ("branch", &r.context.branch),
                ("tty", &r.context.tty),
                ("host", &r.context.host),
                ("client_name", &r.context.client_name),
                ("client_version", &r.context.client_version),
            ] {
                at_most(field, value.as_deref(), MAX_FIELD_BYTES)?;
            }
            if let Some(s) = &r.session {
                if s.key.is_empty() {
                    return Err(bad_request("session.key must not be empty"));
                }
                at_most("session.key", Some(&s.key), MAX_FIELD_BYTES)?;
            }
            summary(r.summary.as_deref())
        }
        Request::Send(s) => {
            if s.to.is_empty() {
                return Err(bad_request("send needs at least one recipient in `to`"));
            }
            if s.to.len() > limits.broadcast_limit {
                return Err(bad_request(format!(
                    "{} recipients; one message goes to at most {}",
                    s.to.len(),
                    limits.broadcast_limit
                )));
            }
            for to in &s.to {
                // A session here (`name`) or on another machine (`name@host`).
                match to.rsplit_once('@') {
                    Some((n, host)) => {
                        name("recipient", n)?;
                        name("recipient's host", host)?;
                    }
                    None => name("recipient", to)?,
                }
            }
            key(s.key.as_deref())?;
            message(&s.text, s.in_reply_to.as_deref(), s.from.as_deref(), limits)
        }
        Request::Broadcast(b) => {
            place(b.cwd.as_deref(), b.git_common_dir.as_deref())?;
            key(b.key.as_deref())?;
            message(&b.text, b.in_reply_to.as_deref(), b.from.as_deref(), limits)
        }
        Request::Ack(a) => {
            if a.ids.len() > MAX_ACK_IDS {
                return Err(bad_request(format!(
                    "{} ids in one ack; the limit is {MAX_ACK_IDS}",
                    a.ids.len()
                )));
            }
            a.ids
                .iter()
                .try_for_each(|id| at_most("an acked id", Some(id), MAX_ID_BYTES))
        }
        Request::ListPeers(l) => {
            place(l.cwd.as_deref(), l.git_common_dir.as_deref())?;
            at_most("after", l.after.as_deref(), MAX_CURSOR_BYTES)
        }
        Request::SetSummary(s) => summary(Some(&s.summary)),
        Request::Log(q) => {
            at_most("before", q.before.as_deref(), MAX_CURSOR_BYTES)?;
            q.peer.as_deref().map_or(Ok(()), |p| name("peer", p))
        }
        Request::Shutdown(s) => at_most("reason", s.reason.as_deref(), MAX_FIELD_BYTES),
        Request::Whoami | Request::Status | Request::Subscribe(_) => Ok(()),
    }
}

fn key(key: Option<&str>) -> Result<(), ErrorBody> {
    match key {
        Some(k) if k.is_empty() || k.len() > MAX_ID_BYTES => Err(bad_request(format!(
            "key is {} bytes; it must be 1 to {MAX_ID_BYTES}",
            k.len()
        ))),
        _ => Ok(()),
    }
}

fn summary(summary: Option<&str>) -> Result<(), ErrorBody> {
    match summary {
        Some(s) if s.len() > MAX_SUMMARY_BYTES => Err(bad_request(format!(
            "summary is {} bytes; the limit is {MAX_SUMMARY_BYTES}. Shorten it",
            s.len()
        ))),
        _ => Ok(()),
    }
}

fn place(cwd: Option<&str>, git_common_dir: Option<&str>) -> Result<(), ErrorBody> {
    at_most("cwd", cwd, MAX_PATH_BYTES)?;
    at_most("git_common_dir", git_common_dir, MAX_PATH_BYTES)
}

/// The checks shared by `send` and `broadcast`.
fn message(
    text: &str,
    in_reply_to: Option<&str>,
    from: Option<&str>,
    limits: &Limits,
) -> Result<(), ErrorBody> {
    if text.trim().is_empty() {
        return Err(ErrorBody::new(
            ErrorCode::EmptyMessage,
            "the message is empty; write something to send",
        ));
    }
    if text.len() > limits.max_message_bytes {
        return Err(ErrorBody::new(
            ErrorCode::MessageTooLarge,
            format!(
                "the message is {} bytes; the limit is {}. Send a shorter message, or put the content in a file and send its path",
                text.len(),
                limits.max_message_bytes
            ),
        ));
    }
    if let Some(r) = in_reply_to
        && !crate::protocol::is_message_id(r)
    {
        return Err(bad_request(format!(
            "in_reply_to {:?} is not a message id: ids are UUIDs like 019ad3c4-5e6f-7a8b-9c0d-1e2f3a4b5c6d; pass the message_id of the message this answers",
            r.chars().take(40).collect::<String>()
        )));
    }
    match from {
        Some(f) if crate::names::is_reserved_sender(f) => Err(ErrorBody::new(
            ErrorCode::BadName,
            format!(
                "sender: {f:?} is reserved, so no message can pose as coming from the user or the model; sign with another name"
            ),
        )),
        // `pc:<name>`: a peer-channel session, its mail carried in by the `serve` it wrote to.
        Some(f) => name(
            "sender",
            f.strip_prefix(crate::peer_channel::PREFIX).unwrap_or(f),
        ),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(frame: &str) -> ErrorCode {
        let limits = Limits::default();
        match decode(frame.as_bytes()) {
            Ok(Some(f)) => validate(&f.request, &limits).unwrap_err().code,
            Ok(None) => panic!("blank: {frame}"),
            Err(bad) => bad.error.code,
        }
    }

    #[test]
    fn unknown_fields_are_refused_except_where_versions_meet() {
        assert_eq!(
            code(r#"{"op":"send","to":["a"],"text":"x","reply_to":"m"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"id":1,"op":"list_peers","scope":"repo","cwdd":"/"}"#),
            ErrorCode::BadRequest
        );
        let err = decode(br#"{"id":4,"op":"ack","ids":[],"extra":1}"#).unwrap_err();
        assert_eq!(err.id, Some(4));
        assert!(err.error.message.contains("extra"), "{}", err.error.message);
        // hello and shutdown must parse across protocol versions.
        for ok in [
            r#"{"op":"hello","protocol":9,"client":"c","version":"1","future":true}"#,
            r#"{"op":"shutdown","reason":"r","future":true}"#,
            r#"{"op":"list_peers","scope":"repo","cwd":"/a","git_common_dir":"/a/.git"}"#,
        ] {
            let f = decode(ok.as_bytes()).unwrap().unwrap();
            validate(&f.request, &Limits::default()).unwrap();
        }
    }

    #[test]
    fn each_field_is_bounded() {
        let long = "x".repeat(MAX_PATH_BYTES + 1);
        assert_eq!(
            code(&format!(
                r#"{{"op":"register","name":"a","context":{{"cwd":"{long}"}}}}"#
            )),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"op":"register","name":"a/b","context":{"cwd":"/"}}"#),
            ErrorCode::BadName
        );
        assert_eq!(
            code(r#"{"op":"send","to":["ok","../x"],"text":"t"}"#),
            ErrorCode::BadName
        );
        assert_eq!(
            code(r#"{"op":"send","to":["a"],"text":" \n"}"#),
            ErrorCode::EmptyMessage
        );
        let big = "y".repeat(64 * 1024 + 1);
        assert_eq!(
            code(&format!(
                r#"{{"op":"broadcast","scope":"machine","text":"{big}"}}"#
            )),
            ErrorCode::MessageTooLarge
        );
        assert_eq!(code(r#"{"op":"log","peer":"a b"}"#), ErrorCode::BadName);
        assert!(decode(b"  \t").unwrap().is_none());
    }
}
