//! Claude Code sessions without claude-peers: listed as `cc:<name>` and written to
//! directly, through their own inbox.

use std::collections::HashSet;
use std::time::Duration;

use super::*;
use crate::protocol::Delivery;

/// The live Claude Code sessions that do not run claude-peers, except the hosts in
/// `hosts` (for `doctor`).
pub fn native_sessions(hosts: impl Iterator<Item = u32>) -> Vec<Native> {
    native::list(|| hosts.collect())
}

/// A message between us and a Claude Code session without claude-peers, which the
/// broker never sees: a fresh id, sent now.
pub(super) fn local_delivery(
    from: String,
    to: String,
    text: String,
    in_reply_to: Option<String>,
) -> Delivery {
    Delivery {
        id: uuid::Uuid::now_v7().to_string(),
        from,
        to,
        text,
        in_reply_to,
        sent_at: crate::protocol::now_millis(),
        from_cwd: None,
        from_repo: None,
        from_branch: None,
        from_summary: None,
    }
}

/// The hosts not to list as native sessions: ours, and those of these `serve` pids.
fn native_skip(peer_pids: impl Iterator<Item = u32>) -> HashSet<u32> {
    let mut skip: HashSet<u32> = peer_pids.filter_map(platform::parent_of).collect();
    skip.insert(platform::parent_pid());
    skip
}

/// How long a send to a native Claude Code session waits for a `held` receipt.
const NATIVE_HOLD_WAIT: Duration = Duration::from_millis(150);

impl Session {
    /// The live Claude Code sessions that do not run claude-peers: all but our own host
    /// and the hosts of `peer_pids` (our peers' `serve` processes).
    pub fn natives(&self, peer_pids: impl Iterator<Item = u32>) -> Vec<Native> {
        native::list(|| native_skip(peer_pids))
    }

    /// Sends to a Claude Code session that does not run claude-peers (`cc:<name>`),
    /// straight into its inbox; `skip` are the hosts of our own peers. Answers the
    /// message id and `delivered` (the session took it) or `held` (its user must approve
    /// it, as for any session of another permission mode).
    pub async fn send_native(
        &self,
        address: &str,
        text: String,
        in_reply_to: Option<String>,
        peer_pids: impl Iterator<Item = u32>,
    ) -> Result<(String, &'static str), String> {
        let target =
            native::find(address, native::list(|| native_skip(peer_pids))).ok_or_else(|| {
                format!(
                    "no live Claude Code session is {address}; list_peers shows those there are"
                )
            })?;
        let dir = target
            .socket
            .parent()
            .ok_or_else(|| format!("{address} has no inbox"))?;
        let me = self.name_or_wanted();
        let d = local_delivery(me, address.to_string(), text, in_reply_to);
        // Its replies come back to this socket, as from `address`.
        let reply = self
            .replies
            .socket(dir, address, &self.inbound)
            .map_err(|e| format!("cannot listen for {address}'s answers: {e}"))?;
        let host_argv = platform::command_line(platform::parent_pid()).unwrap_or_default();
        let mode = if bypasses_permissions(&host_argv) {
            "bypass"
        } else {
            "prompting"
        };
        let line = inbox::message_line(&d, &target.session_id, &reply, Some(mode));
        inbox::write_line(&target.socket, &line)
            .await
            .map_err(|e| format!("{address} did not take the message: {e}"))?;
        {
            let mut st = self.state();
            st.last_from.insert(address.to_string(), d.id.clone());
            st.native_sockets
                .insert(address.to_string(), target.socket.clone());
        }
        // A session that holds it says so at once, on another connection.
        tokio::time::sleep(NATIVE_HOLD_WAIT).await;
        let held = self.state().held.remove(&d.id);
        Ok((d.id, if held { "held" } else { "delivered" }))
    }
}
