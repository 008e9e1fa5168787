//! Interactive Claude Code sessions under tmux: started in their own tmux server, read
//! from the screen, answered through its dialogs, and ended.

use super::*;

// ---------------------------------------------------------------------------------------
// Interactive sessions under tmux
// ---------------------------------------------------------------------------------------

/// An interactive `claude` in a detached tmux session of its own (a private tmux server,
/// so tests run in parallel). The server, and with it `claude`, is killed when dropped.
pub struct Interactive {
    socket: PathBuf,
    pid: u32,
    debug_file: PathBuf,
    stub: Recorded,
    // Removed only after `claude` has exited: it writes there (MCP logs, `.claude.json`)
    // while it shuts down.
    _dir: Arc<tempfile::TempDir>,
}

impl Interactive {
    /// Starts `claude <args>` in a 200x50 pane and waits for its prompt (60 s), getting
    /// past any first-run dialog on the way.
    pub fn start(home: &ClaudeHome, args: &[&str]) -> Self {
        // A socket of its own per session: a second session from the same home must not
        // meet the first one's tmux server on its way out ("server exited unexpectedly").
        static SESSIONS: AtomicU64 = AtomicU64::new(0);
        let n = SESSIONS.fetch_add(1, Ordering::Relaxed);
        let socket = home.dir.path().join(format!("tmux-{n}.sock"));
        let conf = home.dir.path().join("tmux.conf");
        // remain-on-exit: a `claude` that exits leaves its last screen to capture.
        std::fs::write(
            &conf,
            "set -g remain-on-exit on\nset -g default-terminal xterm-256color\nset -g history-limit 10000\n",
        )
        .unwrap();
        let claude = claude_bin().expect("claude is installed");
        let mut vars = home.vars();
        if args.contains(&"--dangerously-skip-permissions") {
            // Otherwise refused when running as root.
            vars.insert("IS_SANDBOX".into(), "1".into());
        }
        let mut cmd = Command::new("tmux");
        // The tmux server is new, so the pane gets exactly this environment.
        cmd.env_clear()
            .envs(vars)
            .env("TERM", "xterm-256color")
            .arg("-S")
            .arg(&socket)
            .arg("-f")
            .arg(&conf)
            .args(["new-session", "-d", "-x", "200", "-y", "50", "-P", "-F"])
            .arg("#{pane_pid}")
            .arg("-c")
            .arg(&home.project)
            // Several arguments: tmux runs them without a shell, so the pane's pid is
            // claude's.
            .arg("--")
            .arg(claude)
            .arg("--debug-file")
            .arg(home.debug_file())
            .args(args)
            .stdin(Stdio::null());
        let out = cmd.output().expect("tmux runs");
        assert!(
            out.status.success(),
            "tmux new-session failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let s = Self {
            socket,
            pid,
            debug_file: home.debug_file().to_path_buf(),
            stub: home.stub(),
            _dir: home.dir.clone(),
        };
        s.get_to_prompt(Duration::from_secs(60));
        s
    }

    /// `claude`'s pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn tmux(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("tmux runs")
    }

    /// Sends tmux key names (`"Enter"`, `"Escape"`, `"C-c"`, `"Down"`), each as one key.
    pub fn send_keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "0"];
        args.extend_from_slice(keys);
        let out = self.tmux(&args);
        assert!(out.status.success(), "send-keys: {out:?}");
    }

    /// Types `text` literally.
    pub fn type_text(&self, text: &str) {
        let out = self.tmux(&["send-keys", "-t", "0", "-l", text]);
        assert!(out.status.success(), "send-keys -l: {out:?}");
    }

    /// Types `text` and, once it shows in the prompt, presses Enter.
    pub fn submit(&self, text: &str) {
        self.type_text(text);
        // Enter sent with the text could land before the input box has taken the text
        // (as a paste), and be swallowed.
        let probe: String = text.chars().take(40).collect();
        self.wait_until(|s| s.contains(&probe), Duration::from_secs(15))
            .unwrap_or_else(|| panic!("typed text not shown\n{}", self.diagnostics()));
        self.send_keys(&["Enter"]);
    }

    /// The visible screen, as text.
    pub fn capture(&self) -> String {
        String::from_utf8_lossy(&self.tmux(&["capture-pane", "-p", "-t", "0"]).stdout).into()
    }

    /// Whether `claude` has exited (the pane is kept: remain-on-exit).
    pub fn exited(&self) -> bool {
        let out = self.tmux(&["display-message", "-p", "-t", "0", "#{pane_dead}"]);
        String::from_utf8_lossy(&out.stdout).trim() != "0"
    }

    /// Polls the screen until `cond` accepts it; returns that screen, or `None` after
    /// `timeout` (or as soon as `claude` has exited and the screen does not match).
    pub fn wait_until(&self, cond: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.capture();
            if cond(&screen) {
                return Some(screen);
            }
            if Instant::now() >= deadline || self.exited() {
                return None;
            }
            // tmux gives no "screen changed" event to wait on without a control client.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for an idle prompt (input box drawn, no turn running); panics with
    /// diagnostics after `timeout`.
    pub fn wait_idle(&self, timeout: Duration) -> String {
        self.wait_until(is_idle, timeout)
            .unwrap_or_else(|| panic!("claude not idle after {timeout:?}\n{}", self.diagnostics()))
    }

    /// Waits for `needle` on screen; panics with diagnostics after `timeout`.
    pub fn wait_for_text(&self, needle: &str, timeout: Duration) -> String {
        self.wait_until(|s| s.contains(needle), timeout)
            .unwrap_or_else(|| {
                panic!(
                    "{needle:?} not on screen after {timeout:?}\n{}",
                    self.diagnostics()
                )
            })
    }

    /// Gets from start-up to the first prompt, answering the first-run dialogs that
    /// `.claude.json` did not already settle.
    fn get_to_prompt(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.capture();
            if is_idle(&screen) {
                return;
            }
            if let Some(keys) = dialog_answer(&screen) {
                // One key at a time, each after the last has shown (Ink may read keys
                // that arrive together as one input).
                let mut before = screen;
                for key in keys {
                    self.send_keys(&[key]);
                    before = self
                        .wait_until(|s| s != before, Duration::from_secs(10))
                        .unwrap_or_else(|| panic!("dialog ignored {key}\n{}", self.diagnostics()));
                }
                continue;
            }
            assert!(
                Instant::now() < deadline && !self.exited(),
                "claude did not reach its prompt within {timeout:?}\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The socket on which this `claude` takes injected messages (its "uds-messaging"
    /// inbox: `/tmp/cc-socks/<pid>.sock`, or under `$XDG_RUNTIME_DIR/cc-socks`), once it
    /// listens. Read from the debug log's "[uds-messaging] Listening: <path>" line, else
    /// looked for where Claude Code puts it.
    pub fn inbox_socket(&self) -> Option<PathBuf> {
        let name = format!("{}.sock", self.pid);
        let log = std::fs::read_to_string(&self.debug_file).unwrap_or_default();
        let logged = log
            .lines()
            .filter_map(|l| l.split("[uds-messaging] Listening: ").nth(1))
            .map(|p| PathBuf::from(p.trim()))
            .find(|p| p.ends_with(&name));
        if logged.is_some() {
            return logged;
        }
        let uid = rustix::process::getuid().as_raw();
        let mut dirs = vec![
            PathBuf::from("/tmp/cc-socks"),
            PathBuf::from(format!("/tmp/cc-socks-{uid}")),
            PathBuf::from(format!("/run/user/{uid}/cc-socks")),
        ];
        if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
            dirs.push(PathBuf::from(x).join("cc-socks"));
        }
        dirs.into_iter().map(|d| d.join(&name)).find(|p| p.exists())
    }

    /// Waits for [`Self::inbox_socket`]; panics with diagnostics after `timeout`.
    pub fn wait_inbox_socket(&self, timeout: Duration) -> PathBuf {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.inbox_socket() {
                return p;
            }
            assert!(
                Instant::now() < deadline && !self.exited(),
                "no inbox socket after {timeout:?}\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What to print when a test fails: the screen, the stub's requests and the debug
    /// log's tail.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- screen (claude pid {}, exited: {}) ---\n{}\n--- stub requests ---\n{}{}",
            self.pid,
            self.exited(),
            squeeze_blank_lines(&self.capture()),
            self.stub.summary(),
            debug_tail(&self.debug_file, 60)
        )
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        // SIGTERM, and wait for the exit: claude stops its MCP servers and writes its
        // last files on the way out, and the home is removed right after.
        kill(self.pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.exited() {
            if Instant::now() >= deadline {
                kill(self.pid, rustix::process::Signal::KILL);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.tmux(&["kill-server"]);
    }
}

/// Idle: the input box is drawn (a line starting with `❯` right under a rule; a dialog's
/// `❯` cursor is indented) and no turn is running.
pub fn is_idle(screen: &str) -> bool {
    let lines: Vec<&str> = screen.lines().collect();
    let input_box = lines
        .windows(2)
        .any(|w| w[0].starts_with('─') && w[1].starts_with('❯'));
    input_box && !screen.contains("esc to interrupt")
}

/// First-run dialogs: text that identifies one, and the option to choose. All are
/// selection lists (`❯` marks the current line, Enter confirms).
const DIALOGS: &[(&str, &str)] = &[
    // Folder trust, "Accessing workspace: ... Quick safety check: Is this a project you
    // created or one you trust?". The cursor starts on "No, exit". Settled by
    // `projects.<dir>.hasTrustDialogAccepted`.
    ("Quick safety check", "Yes, I trust this folder"),
    // "Detected a custom API key in your environment ... Do you want to use this API
    // key?"; the cursor starts on "No (recommended)". Settled by
    // `customApiKeyResponses.approved`.
    ("Do you want to use this API key?", "Yes"),
    // `--dangerously-skip-permissions`: "WARNING: Claude Code running in Bypass
    // Permissions mode"; the cursor starts on "No, exit".
    ("Bypass Permissions mode", "Yes, I accept"),
];
// Not a dialog we can answer: without `hasCompletedOnboarding` the first run checks its
// connection to api.anthropic.com and stops at "Unable to connect to Anthropic services".

/// The keys that choose the right option of the first-run dialog on `screen`, if one is
/// shown: Up or Down from the cursor to the option's line, then Enter.
fn dialog_answer(screen: &str) -> Option<Vec<&'static str>> {
    let (_, option) = DIALOGS.iter().find(|(text, _)| screen.contains(text))?;
    let lines: Vec<&str> = screen.lines().map(str::trim).collect();
    let cursor = lines.iter().position(|l| l.starts_with('❯'))?;
    let target = lines
        .iter()
        .position(|l| l.trim_start_matches('❯').trim() == *option)?;
    let step = if target > cursor { "Down" } else { "Up" };
    let mut keys = vec![step; target.abs_diff(cursor)];
    keys.push("Enter");
    Some(keys)
}
