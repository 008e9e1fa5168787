//! A `serve` session driven by hand over its stdio, one JSON-RPC line at a time, each
//! answer parsed as JSON, as Claude Code does. rmcp's own client parses every line through
//! untagged enums and adds its own tasks between the pipe and the caller; for latency
//! figures that cost would be the harness's, not claude-peers'.

use std::process::Stdio;

use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::common::Home;

pub struct RawSession {
    pub child: tokio::process::Child,
    pub stdin: tokio::process::ChildStdin,
    pub stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    next_id: u64,
}

impl RawSession {
    /// Starts `serve` and completes the MCP handshake; with `channel`, the client declares
    /// `experimental["claude/channel"]`, so peer mail is pushed as notifications.
    pub async fn start(home: &Home, name: &str, channel: bool) -> Self {
        Self::spawn(crate::serve::command(home, name), channel).await
    }

    /// Starts `cmd`, a program that speaks MCP on its stdio (`serve`, or the floor's
    /// session), and completes the handshake.
    pub async fn spawn(mut cmd: tokio::process::Command, channel: bool) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut s = Self {
            child,
            stdin,
            stdout,
            next_id: 1,
        };
        let capabilities = if channel {
            json!({"experimental": {"claude/channel": {}}})
        } else {
            json!({})
        };
        let init = s
            .call(
                "initialize",
                json!({"protocolVersion": "2025-11-25", "capabilities": capabilities,
                    "clientInfo": {"name": "bench", "version": "1"}}),
            )
            .await;
        assert!(init.get("result").is_some(), "{init}");
        s.write(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        s
    }

    pub async fn write(&mut self, v: &Value) {
        let mut line = serde_json::to_vec(v).unwrap();
        line.push(b'\n');
        self.stdin.write_all(&line).await.unwrap();
    }

    /// Writes a request and returns its id.
    pub async fn request(&mut self, method: &str, params: Value) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.write(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await;
        id
    }

    async fn line(&mut self) -> String {
        self.stdout
            .next_line()
            .await
            .unwrap()
            .expect("serve writes until its stdin closes")
    }

    /// The next line from serve's stdout, parsed.
    pub async fn next(&mut self) -> Value {
        serde_json::from_str(&self.line().await).unwrap()
    }

    /// The answer to request `id`, skipping anything else.
    pub async fn answer(&mut self, id: u64) -> Value {
        loop {
            let v = self.next().await;
            if v["id"] == id {
                return v;
            }
        }
    }

    /// The answer to request `id` parsed straight into `T`, as a client with typed messages
    /// reads it (building a `serde_json::Value` tree of a large answer costs more than
    /// claude-peers' whole part in it); lines that are not that answer are skipped.
    pub async fn typed_answer<T: DeserializeOwned>(&mut self, id: u64) -> T {
        loop {
            let line = self.line().await;
            match serde_json::from_str::<T>(&line) {
                Ok(answer) => return answer,
                Err(e) => {
                    let v: Value = serde_json::from_str(&line).unwrap();
                    assert_ne!(v["id"], id, "answer of an unexpected shape ({e}): {v}");
                }
            }
        }
    }

    /// Sends a request and returns its answer.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.request(method, params).await;
        self.answer(id).await
    }

    /// Calls a tool and returns its answer, which must not be a tool error.
    pub async fn tool(&mut self, name: &str, arguments: Value) -> Value {
        let answer = self
            .call("tools/call", json!({"name": name, "arguments": arguments}))
            .await;
        assert_eq!(answer["result"]["isError"], false, "{answer}");
        answer
    }
}
