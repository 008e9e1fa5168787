//! What the homes of the agent CLIs share (Claude Code in `claude/`, Codex in `codex.rs`,
//! the Gemini CLI in `gemini.rs`): finding the program, a throwaway `HOME` beside a project
//! directory, an environment that inherits nothing else, and a run with a deadline whose
//! failure shows what the agent printed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::loopback::{Api, Reply, Request, Server, State};
use super::{Broker, Home};

/// The name of our MCP server in every agent's configuration.
pub const SERVER: &str = "claude-peers";

/// Skips the test (returns from it) when `$program` ("claude", "codex", "gemini", "tmux")
/// is not installed, saying so; `.ci/run` installs them all.
#[macro_export]
macro_rules! require {
    ($program:literal) => {
        if $crate::common::agent::missing($program) {
            return;
        }
    };
}

/// Whether `program` is not installed; if so, says the test is skipped.
pub fn missing(program: &str) -> bool {
    let found = match program {
        "claude" => super::claude::claude_bin(),
        _ => find_in_path(program),
    };
    if found.is_none() {
        eprintln!("skipped: {program} is not installed; .ci/run installs it");
    }
    found.is_none()
}

/// `name` found on `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A fresh claude-peers home, a stub of `A`, and the agent's home `make` makes to run
/// against both.
pub fn homes<A: Api, H>(make: impl FnOnce(&Home, &Server<A>) -> H) -> (Home, Server<A>, H) {
    let peers = Home::new();
    let api = Server::start();
    let agent = make(&peers, &api);
    (peers, api, agent)
}

/// [`homes`], and the claude-peers broker running.
pub fn homes_with_broker<A: Api, H>(
    make: impl FnOnce(&Home, &Server<A>) -> H,
) -> (Home, Broker, Server<A>, H) {
    let (peers, api, agent) = homes(make);
    let broker = peers.broker(&[]);
    (peers, broker, api, agent)
}

/// A throwaway `HOME` under /tmp for an agent whose model is the stub of `A`, beside the
/// directory the agent runs in; `C` is what is the agent's own (its configuration).
pub struct AgentHome<A: Api, C> {
    /// Shared with what runs from here (Claude Code's tmux sessions), so it outlives them.
    pub dir: Arc<tempfile::TempDir>,
    /// `HOME`.
    pub home: PathBuf,
    /// The directory the agent runs in.
    pub project: PathBuf,
    /// The stub's, where the agent sends its model calls.
    pub base_url: String,
    stub: Arc<State<A>>,
    /// Extra environment for the agent.
    env: BTreeMap<String, String>,
    /// What is the agent's own: its configuration, as the test changes it.
    pub(super) own: C,
}

impl<A: Api, C> AgentHome<A, C> {
    /// A fresh directory named `prefix…` for an agent that talks to `api`, with the
    /// configuration directory `config` made in its `HOME`; `own(root, home, project)`
    /// makes what is the agent's own (`root` is the directory's canonical path: agents key
    /// projects by it).
    pub fn create(
        prefix: &str,
        config: &str,
        api: &Server<A>,
        own: impl FnOnce(&Path, &Path, &Path) -> C,
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in("/tmp")
            .unwrap();
        let root = dir.path().canonicalize().unwrap();
        let (home, project) = (root.join("home"), root.join("project"));
        std::fs::create_dir_all(home.join(config)).unwrap();
        std::fs::create_dir_all(&project).unwrap();
        let own = own(&root, &home, &project);
        Self {
            dir: Arc::new(dir),
            home,
            project,
            base_url: api.base_url(),
            stub: api.state(),
            env: BTreeMap::new(),
            own,
        }
    }

    /// Sets a variable in the agent's own environment.
    pub fn env(&mut self, key: &str, value: &str) {
        self.env.insert(key.into(), value.into());
    }

    /// The whole environment the agent runs with: `PATH`, `LANG`, `LC_ALL` and `TMPDIR`
    /// from ours, `HOME`, then `own` (what points it at its stub), then what the test set
    /// with [`Self::env`]. Nothing else is inherited, so a test run from inside an agent,
    /// or with its variables set, behaves the same.
    pub fn vars_with<'a>(
        &self,
        own: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> BTreeMap<String, String> {
        let mut v = BTreeMap::new();
        let path = std::env::var("PATH").unwrap_or("/usr/bin:/bin".into());
        v.insert("PATH".into(), path);
        for k in ["LANG", "LC_ALL", "TMPDIR"] {
            if let Ok(x) = std::env::var(k) {
                v.insert(k.into(), x);
            }
        }
        v.insert("HOME".into(), self.home.display().to_string());
        v.extend(own.into_iter().map(|(k, x)| (k.to_string(), x.to_string())));
        v.extend(self.env.clone());
        v
    }

    /// `program` with exactly `vars`, in the project directory, stdin closed.
    pub fn command_with(&self, program: PathBuf, vars: BTreeMap<String, String>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_clear()
            .envs(vars)
            .current_dir(&self.project)
            .stdin(Stdio::null());
        cmd
    }

    /// `claude-peers` of `peers` as this home's user runs it: their `HOME`, and no
    /// configuration directory of the harness's.
    pub fn peers_cmd(&self, peers: &Home) -> Command {
        let mut cmd = peers.cmd();
        cmd.env("HOME", &self.home).env_remove("CLAUDE_CONFIG_DIR");
        cmd
    }

    /// `claude-peers setup <agent>` as this home's user, which must succeed; and, since
    /// the hooks it installs run with the agent's environment, `CLAUDE_PEERS_HOME` there.
    pub fn setup(&mut self, peers: &Home, agent: &str) {
        let out = self.peers_cmd(peers).args(["setup", agent]).output();
        let out = out.unwrap();
        assert!(out.status.success(), "{out:?}");
        self.env("CLAUDE_PEERS_HOME", &peers.root().display().to_string());
    }

    /// A new directory `name` beside `HOME`, for what a test records.
    pub fn mkdir(&self, name: &str) -> PathBuf {
        let dir = self.dir.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        dir
    }

    /// The stub's requests so far, one a line.
    pub fn requests(&self) -> String {
        self.stub.summary()
    }

    /// The stub's record of requests, for what outlives this home's borrow.
    pub fn stub(&self) -> Arc<State<A>> {
        self.stub.clone()
    }

    /// What to print when a test fails: what the agent printed, and the stub's requests.
    pub fn report(&self, out: &Output) -> String {
        output_text(out) + "--- stub requests\n" + &self.requests()
    }
}

/// Runs `cmd`, the agent `name` with `args`; kills it and fails the test after `timeout`,
/// showing `diagnostics` of what it had printed.
pub fn run(
    mut cmd: Command,
    name: &str,
    args: &[&str],
    timeout: Duration,
    diagnostics: impl Fn(&Output) -> String,
) -> Output {
    cmd.args(args);
    super::run_within(cmd, timeout).unwrap_or_else(|out| {
        panic!(
            "{name} {args:?} still running after {timeout:?}; killed\n{}",
            diagnostics(&out)
        )
    })
}

/// The test each agent's tests start with (the broker running): in one turn of the agent
/// `alice` (`turn` runs one with a prompt) the model lists the peers, sends bob `text` and
/// says "sent it"; bob gets `text` from alice, and the turn takes the three scripted
/// replies. Returns the turn's requests and what the agent printed.
pub async fn hello_bob<A: Api, C>(
    (peers, api, agent): (&Home, &Server<A>, &AgentHome<A, C>),
    text: &str,
    turn: impl FnOnce(&str) -> Output,
) -> (Vec<Request<A>>, Output) {
    let (mut bob, _) = peers.peer("bob", "/work/bob").await;
    api.push_all([
        Reply::of(A::call("list_peers", json!({}))),
        Reply::of(A::call(
            "send_message",
            json!({ "to": "bob", "message": text }),
        )),
        Reply::text("sent it"),
    ]);
    let out = tokio::task::block_in_place(|| turn("Say hello to bob."));
    let why = || agent.report(&out);
    let d = super::next_delivery(&mut bob).await;
    let got = (d.from.as_str(), d.text.as_str());
    assert_eq!(got, ("alice", text), "{}", why());
    let turns = api.turns();
    assert_eq!(turns.len(), 3, "{}", why());
    assert_eq!(api.pending(), 0, "{}", why());
    (turns, out)
}

/// Mail to the session of an agent set up by `claude-peers setup` reaches its model
/// exactly once (the broker running). A first turn (the model calls whoami, then says
/// "hello") makes the session known by its name, "project" after its directory (`whoami`
/// gives what a request showed the model of whoami's answer); bob writes to it; in the
/// next turn (whoami, "done", and "read it" for a turn a hook made go on) the mail is shown
/// to the model once, and is delivered. Returns that turn's requests and what the agent
/// printed.
pub async fn mail_shown_once<A: Api, C>(
    (peers, api, agent): (&Home, &Server<A>, &AgentHome<A, C>),
    turn: impl Fn(&str) -> Output,
    whoami: impl Fn(&Request<A>) -> Option<String>,
) -> (Vec<Request<A>>, Output) {
    let (bob, _) = peers.peer("bob", "/work/bob").await;
    let who_are_you = || Reply::of(A::call("whoami", json!({})));
    api.push_all([who_are_you(), Reply::text("hello")]);
    let out = tokio::task::block_in_place(|| turn("Who are you?"));
    let me = whoami(&api.turns()[1]);
    let me = me.unwrap_or_else(|| panic!("no whoami\n{}", agent.report(&out)));
    assert!(me.contains("You are project, in "), "{me}");
    let ping = super::send("project", "ping from bob");
    bob.call(ping).await.unwrap();

    // The session registers at its first tool call and gets the mail.
    let seen = api.turns().len();
    let replies = [who_are_you(), Reply::text("done"), Reply::text("read it")];
    api.push_all(replies);
    let out = tokio::task::block_in_place(|| turn("Anything new?"));
    let why = || agent.report(&out);
    let turns = api.turns().split_off(seen);
    // The last request holds the whole conversation.
    let last = turns.last().map(|r| r.body.to_string()).unwrap_or_default();
    assert_eq!(last.matches("ping from bob").count(), 1, "{}", why());
    let log = super::history(&bob, "project", 10).await;
    let ping = log.messages.iter().find(|m| m.text == "ping from bob");
    let state = ping.map(|m| m.state);
    let delivered = claude_peers::protocol::DeliveryState::Delivered;
    assert_eq!(state, Some(delivered), "{}", why());
    (turns, out)
}

/// What an agent printed, for a failure message: its status, stdout and stderr.
pub fn output_text(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout\n{}\n--- stderr\n{}\n",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    )
}

/// Writes an executable script (a hook, a wrapper) to `path`.
pub fn write_script(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Writes `v` to `path` as pretty JSON.
pub fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}
