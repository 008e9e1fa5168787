//! Sends to sessions the broker does not know: Claude Code sessions without
//! claude-peers (`cc:<name>`, through their inbox) and peer-channel sessions
//! (`pc:<name>`, through their socket).

use super::*;

impl PeersServer {
    /// To a Claude Code session without claude-peers: through its inbox, not the broker.
    pub(super) async fn send_native(
        &self,
        to: String,
        message: String,
        in_reply_to: Option<String>,
    ) -> Result<Answer<SentOut>, String> {
        let client = self.session.client().await?;
        let pages = client
            .list_peers_pages(ListPeers::default())
            .await
            .map_err(|e| e.to_string())?;
        let listed = read_pages(&pages)?;
        let pids = listed.iter().filter(|p| p.online).map(|p| p.context.pid);
        let (id, state) = self
            .session
            .send_native(&to, message, in_reply_to, pids)
            .await?;
        Ok(Answer::new(SentOut {
            message_id: id,
            recipients: vec![RecipientOut {
                name: to,
                state: state.into(),
            }],
            notice: self.notice(),
        }))
    }

    /// To a peer-channel session: over its own socket, not the broker. Delivered when it
    /// answered with its message id; peer-channel keeps no mail, so there is no queue.
    pub(super) async fn send_pc(
        &self,
        to: String,
        message: String,
        in_reply_to: Option<String>,
    ) -> Result<Answer<SentOut>, String> {
        let id = self
            .session
            .send_pc(&to, &message, in_reply_to.as_deref())
            .await?;
        Ok(Answer::new(SentOut {
            message_id: id,
            recipients: vec![RecipientOut {
                name: to,
                state: "delivered".into(),
            }],
            notice: self.notice(),
        }))
    }
}
