//! The frames the broker writes: an id beside one body ([`ServerFrame`], [`Body`]), and
//! the same read as what it means ([`ServerMessage`]).

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use super::{Delivery, ErrorBody, Lagged, LogEvent, PeerEvent};

/// Every frame the broker writes: on the wire `{"id":…,"<key>":…}`, the `id` first (when
/// the request had one that could be read) and then the one key of its [`Body`]. The
/// broker writes `ServerFrame<Reply>`; clients read `ServerFrame<Box<RawValue>>` and
/// decode the result by the type they asked for. A frame with no body, or two, is not
/// a frame: it fails to decode.
#[derive(Debug, Clone)]
pub struct ServerFrame<R> {
    pub id: Option<u64>,
    pub body: Body<R>,
}

/// What a frame carries, under the key named in each variant.
#[derive(Debug, Clone)]
pub enum Body<R> {
    /// `result`: the answer to request `id`.
    Result(R),
    /// `error`: the refusal of request `id`, or, without an id, of the connection.
    Error(ErrorBody),
    /// `deliver`: a message for this connection's peer.
    Deliver(Delivery),
    /// `event`: a log event, for a subscriber.
    Event(LogEvent),
    /// `lagged`: events this subscriber missed because it read too slowly.
    Lagged(Lagged),
    /// `peer`: a session came, went or changed, for a subscriber that asked.
    Peer(PeerEvent),
}

impl<R> ServerFrame<R> {
    pub fn result(id: Option<u64>, result: R) -> Self {
        Self {
            id,
            body: Body::Result(result),
        }
    }
    pub fn error(id: Option<u64>, error: ErrorBody) -> Self {
        Self {
            id,
            body: Body::Error(error),
        }
    }
    pub fn deliver(message: Delivery) -> Self {
        Self {
            id: None,
            body: Body::Deliver(message),
        }
    }
    pub fn event(event: LogEvent) -> Self {
        Self {
            id: None,
            body: Body::Event(event),
        }
    }
    pub fn peer(event: PeerEvent) -> Self {
        Self {
            id: None,
            body: Body::Peer(event),
        }
    }
    pub fn lagged(missed: u64) -> Self {
        Self {
            id: None,
            body: Body::Lagged(Lagged { missed }),
        }
    }

    /// Whether it answers a request (or refuses the connection), as opposed to a push.
    pub fn is_answer(&self) -> bool {
        matches!(self.body, Body::Result(_) | Body::Error(_))
    }

    /// The frame as one [`ServerMessage`], or why it is none.
    pub fn into_message(self) -> Result<ServerMessage<R>, String> {
        Ok(match (self.id, self.body) {
            (Some(id), Body::Result(r)) => ServerMessage::Answer { id, result: Ok(r) },
            (Some(id), Body::Error(e)) => ServerMessage::Answer { id, result: Err(e) },
            (None, Body::Error(e)) => ServerMessage::Refused(e),
            (None, Body::Result(_)) => return Err("a result without an id answers nothing".into()),
            (_, Body::Deliver(d)) => ServerMessage::Deliver(d),
            (_, Body::Event(e)) => ServerMessage::Event(e),
            (_, Body::Lagged(l)) => ServerMessage::Lagged(l),
            (_, Body::Peer(p)) => ServerMessage::Peer(p),
        })
    }
}

/// A server frame as what it is, for a client.
#[derive(Debug)]
pub enum ServerMessage<R> {
    /// The answer to request `id`.
    Answer {
        id: u64,
        result: Result<R, ErrorBody>,
    },
    /// An error about the connection itself, with no id: refused, frame too large, busy.
    Refused(ErrorBody),
    Deliver(Delivery),
    Event(LogEvent),
    Lagged(Lagged),
    Peer(PeerEvent),
}

impl<R: Serialize> Serialize for ServerFrame<R> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(1 + usize::from(self.id.is_some())))?;
        // The id first: clients route an answer by it without reading the rest.
        if let Some(id) = self.id {
            map.serialize_entry("id", &id)?;
        }
        match &self.body {
            Body::Result(r) => map.serialize_entry("result", r)?,
            Body::Error(e) => map.serialize_entry("error", e)?,
            Body::Deliver(d) => map.serialize_entry("deliver", d)?,
            Body::Event(e) => map.serialize_entry("event", e)?,
            Body::Lagged(l) => map.serialize_entry("lagged", l)?,
            Body::Peer(p) => map.serialize_entry("peer", p)?,
        }
        map.end()
    }
}

impl<'de, R: Deserialize<'de>> Deserialize<'de> for ServerFrame<R> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(FrameVisitor(std::marker::PhantomData))
    }
}

struct FrameVisitor<R>(std::marker::PhantomData<R>);

impl<'de, R: Deserialize<'de>> Visitor<'de> for FrameVisitor<R> {
    type Value = ServerFrame<R>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a frame: an optional id and one of result, error, deliver, event, lagged")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut id = None;
        let mut body = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let value = match key.as_ref() {
                "id" => {
                    id = map.next_value::<Option<u64>>()?;
                    continue;
                }
                "result" => Body::Result(map.next_value()?),
                "error" => Body::Error(map.next_value()?),
                "deliver" => Body::Deliver(map.next_value()?),
                "event" => Body::Event(map.next_value()?),
                "lagged" => Body::Lagged(map.next_value()?),
                "peer" => Body::Peer(map.next_value()?),
                // A key of a later protocol: not ours to read.
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            if body.replace(value).is_some() {
                return Err(de::Error::custom(
                    "a frame must hold one of result, error, deliver, event and lagged; this one holds two",
                ));
            }
        }
        let body = body.ok_or_else(|| {
            de::Error::custom(
                "a frame must hold one of result, error, deliver, event and lagged; this one holds none",
            )
        })?;
        Ok(ServerFrame { id, body })
    }
}
