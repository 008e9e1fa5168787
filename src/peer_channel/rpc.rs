//! peer-channel's wire: one JSON-RPC 2.0 request per connection, on one line, and one
//! response line; then the connection closes. Both ends are here: [`parse`] and the
//! answers for what we serve, [`call`] for what we ask of a peer-channel session.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;

/// The longest request or response line read, newline excluded: a message at the
/// broker's largest limit (128 KiB) with every byte escaped still fits.
pub const MAX_LINE: usize = 1 << 20;

/// What a peer-channel request asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Ping,
    Deliver(Deliver),
}

/// `deliver {from, text | message, in_reply_to?}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deliver {
    pub from: String,
    pub text: String,
    pub in_reply_to: Option<String>,
}

/// A JSON-RPC error: its code and a sentence that says what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes (a last line without its newline counts):
/// `None` when the peer closed before sending anything, an invalid-request error when
/// the line is longer.
pub async fn read_line<R: AsyncRead + Unpin>(
    r: R,
) -> std::io::Result<Option<Result<Vec<u8>, RpcError>>> {
    use tokio::io::AsyncReadExt;
    let mut line = Vec::new();
    let mut r = BufReader::new(r).take(MAX_LINE as u64 + 1);
    if r.read_until(b'\n', &mut line).await? == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > MAX_LINE {
        return Ok(Some(Err(RpcError::new(
            INVALID_REQUEST,
            format!("the request is longer than {MAX_LINE} bytes; send a shorter message"),
        ))));
    }
    Ok(Some(Ok(line)))
}

/// Parses one request line into the id to answer with and the call, or the error to
/// answer (parse error, invalid request, unknown method, invalid params).
pub fn parse(line: &[u8]) -> (Value, Result<Call, RpcError>) {
    let Ok(v) = serde_json::from_slice::<Value>(line) else {
        return (
            Value::Null,
            Err(RpcError::new(
                PARSE_ERROR,
                "the request is not JSON: send one JSON-RPC 2.0 object on one line",
            )),
        );
    };
    let Value::Object(mut req) = v else {
        return (
            Value::Null,
            Err(RpcError::new(
                INVALID_REQUEST,
                "the request must be one JSON-RPC 2.0 object",
            )),
        );
    };
    let id = match req.remove("id") {
        None => Value::Null,
        Some(id @ (Value::Null | Value::Number(_) | Value::String(_))) => id,
        Some(_) => {
            return (
                Value::Null,
                Err(RpcError::new(
                    INVALID_REQUEST,
                    "id must be a string, a number or null",
                )),
            );
        }
    };
    if req.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return (
            id,
            Err(RpcError::new(INVALID_REQUEST, "jsonrpc must be \"2.0\"")),
        );
    }
    let Some(method) = req.get("method").and_then(Value::as_str) else {
        return (
            id,
            Err(RpcError::new(INVALID_REQUEST, "method must be a string")),
        );
    };
    let params = match req.get("params") {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(p)) => p.clone(),
        Some(_) => {
            return (
                id,
                Err(RpcError::new(INVALID_PARAMS, "params must be an object")),
            );
        }
    };
    let call = match method {
        "ping" => Ok(Call::Ping),
        "deliver" => deliver_params(&params).map(Call::Deliver),
        other => Err(RpcError::new(
            METHOD_NOT_FOUND,
            format!(
                "no method {:?}: this session answers ping and deliver",
                other.chars().take(40).collect::<String>()
            ),
        )),
    };
    (id, call)
}

fn deliver_params(p: &serde_json::Map<String, Value>) -> Result<Deliver, RpcError> {
    let string = |k: &str| match p.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(RpcError::new(
            INVALID_PARAMS,
            format!("{k} must be a string"),
        )),
    };
    let from = string("from")?
        .filter(|f| !f.trim().is_empty())
        .ok_or_else(|| RpcError::new(INVALID_PARAMS, "from is required: the sender's name"))?;
    // Older versions call the text `text`, newer ones `message`.
    let text = match (string("text")?, string("message")?) {
        (Some(t), _) | (None, Some(t)) => t,
        (None, None) => {
            return Err(RpcError::new(
                INVALID_PARAMS,
                "text (or message) is required: the message to deliver",
            ));
        }
    };
    Ok(Deliver {
        from,
        text,
        in_reply_to: string("in_reply_to")?,
    })
}

/// A response line, newline included.
pub fn answer(id: &Value, result: Result<Value, RpcError>) -> Vec<u8> {
    let v = match result {
        Ok(result) => json!({ "jsonrpc": "2.0", "id": id, "result": result }),
        Err(e) => json!({
            "jsonrpc": "2.0",
            "id": id,
            "error": { "code": e.code, "message": e.message },
        }),
    };
    let mut line = serde_json::to_vec(&v).expect("a JSON value serializes");
    line.push(b'\n');
    line
}

/// Why a request to a peer-channel session got no result.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("nothing listens there (the session is not running)")]
    NotRunning,
    #[error(
        "its socket {0} is not a socket of yours (a symbolic link, another file, or another user's); not trusted"
    )]
    NotOurs(String),
    #[error("its socket is served by uid {0}, not by you; not trusted")]
    ForeignPeer(u32),
    #[error("it did not answer within {0:?}")]
    Timeout(Duration),
    #[error("it answered with error {code}: {message}")]
    Rpc { code: i64, message: String },
    #[error("its answer is not a JSON-RPC response: {0}")]
    BadAnswer(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// One request to the session listening on `socket`, on a connection of its own:
/// the socket must be ours (not a symlink, our uid) and so must the process serving it.
pub async fn call(
    socket: &Path,
    method: &str,
    params: Value,
    timeout: Duration,
) -> Result<Value, CallError> {
    tokio::time::timeout(timeout, call_inner(socket, method, params))
        .await
        .map_err(|_| CallError::Timeout(timeout))?
}

async fn call_inner(socket: &Path, method: &str, params: Value) -> Result<Value, CallError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = match std::fs::symlink_metadata(socket) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(CallError::NotRunning),
        Err(e) => return Err(e.into()),
    };
    if !meta.file_type().is_socket() || meta.uid() != crate::platform::current_uid() {
        return Err(CallError::NotOurs(socket.display().to_string()));
    }
    let mut stream = match UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            ) =>
        {
            return Err(CallError::NotRunning);
        }
        Err(e) => return Err(e.into()),
    };
    let uid = crate::platform::peer_uid(&stream)?;
    if uid != crate::platform::current_uid() {
        return Err(CallError::ForeignPeer(uid));
    }
    let id = uuid::Uuid::new_v4().to_string();
    let mut line = serde_json::to_vec(
        &json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }),
    )
    .expect("a JSON value serializes");
    line.push(b'\n');
    stream.write_all(&line).await?;
    let (read, _write) = stream.split();
    let line = match read_line(read).await? {
        None => return Err(CallError::BadAnswer("it closed without one".into())),
        Some(Ok(l)) => l,
        Some(Err(e)) => return Err(CallError::BadAnswer(e.message)),
    };
    let Ok(Value::Object(mut v)) = serde_json::from_slice::<Value>(&line) else {
        return Err(CallError::BadAnswer("not a JSON object".into()));
    };
    if let Some(e) = v.remove("error") {
        return Err(CallError::Rpc {
            code: e.get("code").and_then(Value::as_i64).unwrap_or(0),
            message: e
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("")
                .chars()
                .take(500)
                .collect(),
        });
    }
    v.remove("result")
        .ok_or_else(|| CallError::BadAnswer("neither result nor error".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(line: &str) -> i64 {
        parse(line.as_bytes()).1.unwrap_err().code
    }

    #[test]
    fn requests_are_parsed_and_refused_with_the_right_codes() {
        assert_eq!(code("{not json"), PARSE_ERROR);
        assert_eq!(code("[1,2]"), INVALID_REQUEST);
        assert_eq!(code(r#"{"id":1,"method":"ping"}"#), INVALID_REQUEST);
        assert_eq!(
            code(r#"{"jsonrpc":"2.0","id":{},"method":"ping"}"#),
            INVALID_REQUEST
        );
        assert_eq!(
            code(r#"{"jsonrpc":"2.0","id":1,"method":"shout"}"#),
            METHOD_NOT_FOUND
        );
        assert_eq!(
            code(r#"{"jsonrpc":"2.0","id":1,"method":"deliver","params":{"from":"a"}}"#),
            INVALID_PARAMS
        );
        assert_eq!(
            code(r#"{"jsonrpc":"2.0","id":1,"method":"deliver","params":{"from":1,"text":"x"}}"#),
            INVALID_PARAMS
        );
        let (id, call) = parse(br#"{"jsonrpc":"2.0","id":"a","method":"ping","params":{}}"#);
        assert_eq!((id, call), (json!("a"), Ok(Call::Ping)));
        for field in ["text", "message"] {
            let line = format!(
                r#"{{"jsonrpc":"2.0","id":7,"method":"deliver","params":{{"from":"bob","{field}":"hi","in_reply_to":null}}}}"#
            );
            let (id, call) = parse(line.as_bytes());
            assert_eq!(id, json!(7));
            assert_eq!(
                call,
                Ok(Call::Deliver(Deliver {
                    from: "bob".into(),
                    text: "hi".into(),
                    in_reply_to: None
                }))
            );
        }
    }
}
