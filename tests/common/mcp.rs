//! An MCP client as Claude Code is one, for driving real `serve` processes with rmcp.

use std::collections::BTreeMap;
use std::time::Instant;

use rmcp::ClientHandler;
use rmcp::model::{
    ClientCapabilities, ClientConfig, CustomNotification, Implementation, JsonObject,
    ProtocolVersion,
};
use rmcp::service::{NotificationContext, RoleClient};
use serde_json::Value;
use tokio::sync::mpsc;

/// A test MCP client: declares the channel capability (or not) and collects channel
/// events, each with the moment it arrived.
pub struct TestClient {
    pub channel: bool,
    pub events: mpsc::UnboundedSender<(Instant, Value)>,
}

impl ClientHandler for TestClient {
    fn get_info(&self) -> ClientConfig {
        let mut caps = ClientCapabilities::default();
        if self.channel {
            let mut exp = BTreeMap::new();
            exp.insert("claude/channel".to_string(), JsonObject::new());
            caps = ClientCapabilities::builder()
                .enable_experimental_with(exp)
                .build();
        }
        ClientConfig::new(caps, Implementation::new("test-claude", "1.0"))
            .with_protocol_version(ProtocolVersion::V_2025_11_25)
    }

    async fn on_custom_notification(
        &self,
        n: CustomNotification,
        _c: NotificationContext<RoleClient>,
    ) {
        if n.method == "notifications/claude/channel" {
            let _ = self
                .events
                .send((Instant::now(), n.params.unwrap_or(Value::Null)));
        }
    }
}
