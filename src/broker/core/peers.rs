//! Peers: names and registration, scopes, listings (with each record kept serialized
//! between them), `whoami`, summaries and `status`.

use serde_json::value::RawValue;

use super::{ConnId, Core, err};
use crate::names::PeerName;
use crate::protocol::*;
use crate::store::PeerRow;

/// Selects peers in a scope.
type PeerFilter = Box<dyn Fn(&PeerRow) -> bool>;

/// A listing's paging cursor: where the last peer of a page sorts (online ones first,
/// then by name).
fn peer_cursor(online: bool, name: &str) -> String {
    format!("{}:{name}", u8::from(online))
}

fn parse_peer_cursor(cursor: &str) -> Result<(bool, &str), ErrorBody> {
    match cursor.split_once(':') {
        Some(("1", name)) => Ok((true, name)),
        Some(("0", name)) => Ok((false, name)),
        _ => Err(err(
            ErrorCode::BadRequest,
            "after is not a cursor this broker gave; pass the `next` of the page before",
        )),
    }
}

/// A peer's record as a listing writes it, kept for the next listing: between two
/// listings most peers have not changed, and escaping their strings again was most of a
/// listing's cost. It is used only while everything it was written from still holds, so
/// no change to a peer has to remember to clear it.
pub(super) struct CachedRecord {
    row: PeerRow,
    online: bool,
    unread: u64,
    json: Box<RawValue>,
}

impl Core {
    pub(super) fn registered_name(&self, conn: ConnId) -> Option<&str> {
        self.conns.get(&conn).and_then(|c| c.name.as_deref())
    }

    pub(super) fn register(&mut self, conn: ConnId, r: Register) -> Result<Registered, ErrorBody> {
        if let Some(name) = self.registered_name(conn) {
            return Err(err(
                ErrorCode::BadRequest,
                format!("this connection is already registered as {name}"),
            ));
        }
        let wanted = PeerName::new(&r.name).map_err(|e| err(ErrorCode::BadName, e.to_string()))?;
        // The wanted name, or the first free or reclaimable `name-N`.
        let mut n = 1;
        let (name, reclaimed) = loop {
            let candidate = if n == 1 {
                wanted.clone()
            } else {
                wanted.with_suffix(n)
            };
            let key = candidate.as_str();
            if self.replace_older(key, r.session.as_ref()) {
                break (candidate, true);
            }
            if !self.online.contains_key(key) {
                match self.peers.get(key) {
                    None => break (candidate, false),
                    Some(p) if (r.explicit && n == 1) || p.context.cwd == r.context.cwd => {
                        break (candidate, true);
                    }
                    Some(_) => {}
                }
            }
            n += 1;
        };
        let now = now_millis();
        let name = name.to_string();
        let previous = self.peers.get(&name);
        let push = r.context.push;
        let row = PeerRow {
            name: name.clone(),
            context: r.context,
            summary: r
                .summary
                .or_else(|| previous.map(|p| p.summary.clone()))
                .unwrap_or_default(),
            first_seen: previous.map_or(now, |p| p.first_seen),
            last_seen: now,
        };
        self.store
            .upsert_peer(&row)
            .map_err(|e| self.failed_write(e))?;
        self.peers.insert(name.clone(), row);
        self.online.insert(name.clone(), conn);
        self.registered_in_batch.push(conn);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.name = Some(name.clone());
            c.session = r.session;
            c.push = push;
        }
        let queued = self.unread(&name);
        tracing::info!(peer = %name, reclaimed, queued, "online");
        self.peer_event(&name, PeerChange::Online);
        Ok(Registered {
            name,
            reclaimed,
            queued,
        })
    }

    /// When the online peer `name` is served by an earlier process of the agent session
    /// `session`, closes that connection (`replaced`) and says the name is free: a
    /// restarted or second `serve` of one session keeps its name, and the earlier one,
    /// started first, can never take it back.
    fn replace_older(&mut self, name: &str, session: Option<&SessionKey>) -> bool {
        let (Some(session), Some(&holder)) = (session, self.online.get(name)) else {
            return false;
        };
        let older = self
            .conns
            .get(&holder)
            .and_then(|c| c.session.as_ref())
            .is_some_and(|s| s.key == session.key && s.started < session.started);
        if !older {
            return false;
        }
        tracing::info!(peer = %name, "a newer process of the same session takes the name");
        // Told at once, not after the batch: the connection closes now.
        let frame: ServerFrame<Reply> = ServerFrame::error(
            None,
            err(
                ErrorCode::Replaced,
                format!("a newer process of this agent session registered as {name}"),
            ),
        );
        let mut bytes = Vec::new();
        crate::wire::encode(&frame, &mut bytes);
        if let Some(c) = self.conns.get(&holder) {
            c.outq.send_now(crate::broker::outq::Outbound::Push(bytes));
        }
        self.disconnected(holder);
        true
    }

    /// The sender name of a send from `conn`: its registered name, else the `from` it
    /// gave, else `cli`.
    pub(super) fn sender_name(
        &self,
        conn: ConnId,
        from: Option<String>,
    ) -> Result<String, ErrorBody> {
        if let Some(name) = self.registered_name(conn) {
            return Ok(name.to_string());
        }
        let name = from.unwrap_or_else(|| "cli".to_string());
        // A session's name is its own: sending as it would borrow its identity and context.
        if self.peers.contains_key(&name) {
            return Err(err(
                ErrorCode::BadName,
                format!("{name} is the name of a session; send as another name (--from)"),
            ));
        }
        Ok(name)
    }

    /// An unknown-peer refusal naming the closest known names.
    pub(super) fn unknown_peer(&self, name: &str) -> ErrorBody {
        let mut scored: Vec<(f64, &String)> = self
            .peers
            .keys()
            .map(|k| (strsim::jaro_winkler(name, k), k))
            .filter(|(s, _)| *s > 0.7)
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
        let candidates: Vec<String> = scored.into_iter().take(3).map(|(_, k)| k.clone()).collect();
        let hint = if candidates.is_empty() {
            "run `claude-peers peers --all` (or list_peers) to see who exists".to_string()
        } else {
            format!("did you mean {}?", candidates.join(", "))
        };
        ErrorBody {
            code: ErrorCode::UnknownPeer,
            message: format!("no peer is named {name:?}; {hint}"),
            candidates,
        }
    }

    /// A predicate for peers in `scope` as seen from `conn` (or from the `cwd` and
    /// `git_common_dir` it gave, for a connection that did not register).
    pub(super) fn scope_filter(
        &self,
        conn: ConnId,
        scope: Scope,
        cwd: Option<&String>,
        git_common_dir: Option<&String>,
    ) -> Result<PeerFilter, ErrorBody> {
        let me = self.registered_name(conn).and_then(|n| self.peers.get(n));
        match scope {
            // Network listings and broadcasts add the other machines' peers to these.
            Scope::Machine | Scope::Network => Ok(Box::new(|_| true)),
            Scope::Directory => {
                let cwd = me
                    .map(|p| p.context.cwd.clone())
                    .or_else(|| cwd.cloned())
                    .ok_or_else(|| err(ErrorCode::BadRequest, "scope directory needs a cwd"))?;
                Ok(Box::new(move |p| p.context.cwd == cwd))
            }
            Scope::Repo => {
                let common = me
                    .map(|p| p.context.git_common_dir.clone())
                    .unwrap_or_else(|| git_common_dir.cloned())
                    .ok_or_else(|| {
                        err(
                            ErrorCode::BadRequest,
                            "scope repo needs a git repository, and this session is not in one; use scope directory or machine",
                        )
                    })?;
                Ok(Box::new(move |p| {
                    p.context.git_common_dir.as_deref() == Some(common.as_str())
                }))
            }
        }
    }

    /// Messages for `name` not acked yet.
    pub(super) fn unread(&self, name: &str) -> u64 {
        self.queued.get(name).copied().unwrap_or(0)
    }

    pub(super) fn peer_ref<'a>(&self, p: &'a PeerRow, online: bool) -> PeerInfoRef<'a> {
        PeerInfoRef {
            name: &p.name,
            online,
            context: &p.context,
            summary: &p.summary,
            first_seen: p.first_seen,
            last_seen: p.last_seen,
            unread: self.unread(&p.name),
        }
    }

    /// The peers in scope, online ones first, then by name; each peer's record is written
    /// from the cache ([`CachedRecord`]), and serialized again only if it changed.
    pub(super) fn list_peers(
        &self,
        conn: ConnId,
        l: &ListPeers,
    ) -> Result<Box<RawValue>, ErrorBody> {
        let filter = self.scope_filter(conn, l.scope, l.cwd.as_ref(), l.git_common_dir.as_ref())?;
        let me = self.registered_name(conn);
        let mut rows: Vec<(bool, &PeerRow)> = self
            .peers
            .values()
            .filter(|p| Some(p.name.as_str()) != me)
            .map(|p| (self.online.contains_key(&p.name), p))
            .filter(|&(online, p)| (l.include_offline || online) && filter(p))
            .collect();
        rows.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.name.cmp(&b.1.name)));
        if let Some(after) = &l.after {
            let (online, name) = parse_peer_cursor(after)?;
            rows.retain(|&(o, p)| (!o, p.name.as_str()) > (!online, name));
        }
        let mut cache = self.records.borrow_mut();
        // One page: the records that fit MAX_PAGE_BYTES (at least one; a record is far
        // smaller), and where the next page starts.
        let mut bytes = 0;
        let mut cut = None;
        let mut next = None;
        for (i, &(online, p)) in rows.iter().enumerate() {
            let unread = self.unread(&p.name);
            let fresh = cache
                .get(&p.name)
                .is_some_and(|c| c.online == online && c.unread == unread && c.row == *p);
            if !fresh {
                // Our own records always serialize (string keys only).
                let json = serde_json::value::to_raw_value(&self.peer_ref(p, online))
                    .expect("a peer record serializes");
                let record = CachedRecord {
                    row: p.clone(),
                    online,
                    unread,
                    json,
                };
                cache.insert(p.name.clone(), record);
            }
            bytes += cache[&p.name].json.get().len() + 1;
            if bytes > MAX_PAGE_BYTES && i > 0 {
                cut = Some(i);
                break;
            }
        }
        if let Some(i) = cut {
            let (online, last) = rows[i - 1];
            next = Some(peer_cursor(online, &last.name));
            rows.truncate(i);
        }
        let list = PeerListRef {
            peers: rows
                .iter()
                .map(|(_, p)| &*cache[&p.name].json)
                .collect::<Vec<&RawValue>>(),
            next,
        };
        let answer = serde_json::value::to_raw_value(&list).expect("a peer list serializes");
        // Peers forgotten since (retention) leave the cache too.
        if cache.len() > self.peers.len() {
            cache.retain(|name, _| self.peers.contains_key(name));
        }
        Ok(answer)
    }

    pub(super) fn whoami(&self, conn: ConnId) -> Result<PeerInfo, ErrorBody> {
        self.registered_name(conn)
            .and_then(|n| self.peers.get(n))
            .map(|p| {
                self.peer_ref(p, self.online.contains_key(&p.name))
                    .to_owned()
            })
            .ok_or_else(|| {
                err(
                    ErrorCode::NotRegistered,
                    "this connection has not registered a name",
                )
            })
    }

    pub(super) fn set_summary(&mut self, conn: ConnId, s: SetSummary) -> Result<(), ErrorBody> {
        let Some(name) = self.registered_name(conn).map(str::to_string) else {
            return Err(err(
                ErrorCode::NotRegistered,
                "only a registered peer has a summary; send register first",
            ));
        };
        self.store
            .set_summary(&name, &s.summary)
            .map_err(|e| self.failed_write(e))?;
        if let Some(p) = self.peers.get_mut(&name) {
            p.summary = s.summary;
        }
        self.peer_event(&name, PeerChange::Summary);
        Ok(())
    }

    pub(super) fn status(&self) -> Status {
        let online = self.online.len() as u64;
        Status {
            pid: self.info.pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            protocol: self.info.protocol,
            started_at: self.info.started_at,
            uptime_ms: self.info.started.elapsed().as_millis() as u64,
            socket: self.info.socket.clone(),
            database: self.info.database.clone(),
            peers_online: online,
            peers_offline: (self.peers.len() as u64).saturating_sub(online),
            queued: self.queued.values().sum(),
            // Besides the one asking.
            connections: (self.conns.len() as u64).saturating_sub(1),
            quarantined: self.quarantined,
            network: self.network_status(),
        }
    }
}
