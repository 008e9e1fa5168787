//! `claude-peers top`: a live view of the sessions and the messages passing between them,
//! with keys to send, reply, change the scope and read a thread.
//!
//! Three parts: [`link`] keeps the broker connection (and follows it through restarts),
//! [`App`] holds what is shown and answers keys, [`view`] draws it. The loop waits on
//! the terminal and the link alone (no timer): nothing happening costs nothing.

mod link;
mod view;

use std::collections::HashMap;

use anyhow::{Context, Result, bail};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use tokio::sync::mpsc;

use crate::paths::Paths;
use crate::protocol::{DeliveryState, LogEntry, Millis, PeerInfo, Scope};
use link::{Ask, Update};

/// The most messages kept in view.
const KEEP: usize = 2000;

pub async fn run(paths: &Paths) -> Result<()> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        bail!(
            "top needs a terminal; for scripts use `claude-peers peers --json` and `claude-peers log -f --json`"
        );
    }
    let (ask_tx, ask_rx) = mpsc::unbounded_channel();
    let (update_tx, mut updates) = mpsc::unbounded_channel();
    tokio::spawn(link::run(paths.clone(), ask_rx, update_tx));
    // Keys come from a thread that blocks reading the terminal.
    let (key_tx, mut keys) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        while let Ok(ev) = event::read() {
            if key_tx.send(ev).is_err() {
                break;
            }
        }
    });
    let mut terminal = ratatui::try_init().context("cannot set up the terminal")?;
    let mut app = App::default();
    let outcome = async {
        loop {
            terminal.draw(|f| view::draw(f, &mut app))?;
            tokio::select! {
                Some(update) = updates.recv() => app.update(update),
                Some(ev) = keys.recv() => {
                    if let Event::Key(key) = ev
                        && key.kind != KeyEventKind::Release
                    {
                        match app.key(key) {
                            Some(Action::Quit) => return Ok::<(), anyhow::Error>(()),
                            Some(Action::Ask(ask)) => {
                                let _ = ask_tx.send(ask);
                            }
                            None => {}
                        }
                    }
                }
                else => return Ok(()),
            }
        }
    }
    .await;
    ratatui::try_restore().context("cannot restore the terminal")?;
    outcome
}

/// One message and what became of it for each recipient.
#[derive(Debug, Clone)]
pub struct Message {
    pub id: String,
    pub from: String,
    pub text: String,
    pub in_reply_to: Option<String>,
    pub sent_at: Millis,
    pub to: Vec<(String, DeliveryState)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Focus {
    #[default]
    Sessions,
    Messages,
}

/// A message being written: to whom, in answer to what, and the text so far.
#[derive(Debug, Clone, Default)]
pub struct Draft {
    pub to: String,
    pub in_reply_to: Option<String>,
    pub text: String,
}

/// Where the broker is.
#[derive(Debug, Clone, Default)]
pub enum Broker {
    #[default]
    Connecting,
    Up {
        pid: u32,
        version: String,
        network: bool,
    },
    Lost,
}

/// What is shown, and what the keys change.
#[derive(Debug, Default)]
pub struct App {
    pub broker: Broker,
    pub scope: Scope,
    pub peers: Vec<PeerInfo>,
    /// Oldest first.
    pub messages: Vec<Message>,
    index: HashMap<String, usize>,
    pub focus: Focus,
    pub peer_at: usize,
    pub message_at: usize,
    /// The root message id of the thread open in place of the message list.
    pub thread: Option<String>,
    pub draft: Option<Draft>,
    /// The last thing that happened, for the status line.
    pub said: String,
    pub help: bool,
}

pub enum Action {
    Quit,
    Ask(Ask),
}

impl App {
    fn update(&mut self, update: Update) {
        match update {
            Update::Connected {
                pid,
                version,
                network,
                started,
            } => {
                self.said = if started {
                    format!("started the broker (pid {pid})")
                } else {
                    format!("connected to the broker (pid {pid})")
                };
                self.broker = Broker::Up {
                    pid,
                    version,
                    network,
                };
            }
            Update::Lost => {
                self.broker = Broker::Lost;
                self.said = "the broker went away; waiting for it to be back".into();
            }
            Update::Peers(peers) => {
                self.peers = peers;
                self.peer_at = self.peer_at.min(self.peers.len().saturating_sub(1));
            }
            Update::History(entries) => {
                let follow = self.at_end();
                for e in entries {
                    self.entry(e);
                }
                self.keep(follow);
            }
            Update::Entry(e) => {
                let follow = self.at_end();
                self.entry(e);
                self.keep(follow);
            }
            Update::Said(s) | Update::Failed(s) => self.said = s,
        }
    }

    fn at_end(&self) -> bool {
        self.message_at + 1 >= self.messages.len()
    }

    /// Trims to [`KEEP`] messages; the selection follows new ones if it was on the last.
    fn keep(&mut self, follow: bool) {
        if self.messages.len() > KEEP {
            let drop = self.messages.len() - KEEP;
            self.messages.drain(..drop);
            self.message_at = self.message_at.saturating_sub(drop);
            self.reindex();
        }
        if follow {
            self.message_at = self.messages.len().saturating_sub(1);
        }
    }

    fn reindex(&mut self) {
        self.index = (self.messages.iter().enumerate())
            .map(|(i, m)| (m.id.clone(), i))
            .collect();
    }

    /// Adds an entry: a new message, a recipient of one, or a later state.
    fn entry(&mut self, e: LogEntry) {
        if let Some(&i) = self.index.get(&e.id) {
            let m = &mut self.messages[i];
            match m.to.iter_mut().find(|(to, _)| *to == e.to) {
                // History and live events may cross: keep the later state.
                Some((_, state)) => {
                    if e.state.progress() > state.progress() {
                        *state = e.state;
                    }
                }
                None => m.to.push((e.to, e.state)),
            }
            return;
        }
        let m = Message {
            id: e.id,
            from: e.from,
            text: e.text,
            in_reply_to: e.in_reply_to,
            sent_at: e.sent_at,
            to: vec![(e.to, e.state)],
        };
        // Ids grow with time: a new message goes last, unless history read late.
        let at = self.messages.partition_point(|x| x.id < m.id);
        self.messages.insert(at, m);
        if at + 1 == self.messages.len() {
            self.index.insert(self.messages[at].id.clone(), at);
        } else {
            if at <= self.message_at && !self.messages.is_empty() {
                self.message_at += 1;
            }
            self.reindex();
        }
    }

    /// The message `m` answers, if it is in view.
    pub fn parent(&self, m: &Message) -> Option<&Message> {
        let i = *self.index.get(m.in_reply_to.as_deref()?)?;
        Some(&self.messages[i])
    }

    /// The first message of `m`'s thread among those in view.
    pub fn root_of<'a>(&'a self, mut m: &'a Message) -> &'a Message {
        // At most one step per message: a loop in the replies ends.
        for _ in 0..self.messages.len() {
            match self.parent(m) {
                Some(parent) => m = parent,
                None => break,
            }
        }
        m
    }

    /// The messages shown: the open thread's, or all.
    pub fn shown(&self) -> Vec<&Message> {
        match &self.thread {
            Some(root) => (self.messages.iter())
                .filter(|m| self.root_of(m).id == *root)
                .collect(),
            None => self.messages.iter().collect(),
        }
    }

    fn key(&mut self, key: KeyEvent) -> Option<Action> {
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Some(Action::Quit);
        }
        if let Some(draft) = &mut self.draft {
            match key.code {
                KeyCode::Esc => self.draft = None,
                KeyCode::Enter => {
                    let d = self.draft.take()?;
                    if d.text.trim().is_empty() {
                        self.said = "nothing to send".into();
                        return None;
                    }
                    self.said = format!("sending to {}…", d.to);
                    return Some(Action::Ask(Ask::Send {
                        to: d.to,
                        text: d.text,
                        in_reply_to: d.in_reply_to,
                    }));
                }
                KeyCode::Backspace => {
                    draft.text.pop();
                }
                KeyCode::Char(c) => draft.text.push(c),
                _ => {}
            }
            return None;
        }
        self.help = false;
        let shown = self.shown().len();
        match key.code {
            KeyCode::Char('q') => return Some(Action::Quit),
            KeyCode::Esc if self.thread.is_some() => {
                self.thread = None;
                self.message_at = self.messages.len().saturating_sub(1);
            }
            KeyCode::Esc => return Some(Action::Quit),
            KeyCode::Char('?') | KeyCode::Char('h') => self.help = true,
            KeyCode::Tab | KeyCode::BackTab => {
                self.focus = match self.focus {
                    Focus::Sessions => Focus::Messages,
                    Focus::Messages => Focus::Sessions,
                }
            }
            KeyCode::Up | KeyCode::Char('k') => match self.focus {
                Focus::Sessions => self.peer_at = self.peer_at.saturating_sub(1),
                Focus::Messages => self.message_at = self.message_at.saturating_sub(1),
            },
            KeyCode::Down | KeyCode::Char('j') => match self.focus {
                Focus::Sessions => {
                    self.peer_at = (self.peer_at + 1).min(self.peers.len().saturating_sub(1))
                }
                Focus::Messages => {
                    self.message_at = (self.message_at + 1).min(shown.saturating_sub(1))
                }
            },
            KeyCode::Char('s') => {
                let network = matches!(self.broker, Broker::Up { network: true, .. });
                self.scope = match self.scope {
                    Scope::Machine => Scope::Directory,
                    Scope::Directory => Scope::Repo,
                    Scope::Repo if network => Scope::Network,
                    _ => Scope::Machine,
                };
                self.peer_at = 0;
                return Some(Action::Ask(Ask::Scope(self.scope)));
            }
            KeyCode::Char('m') => {
                let to = match self.focus {
                    Focus::Sessions => self.peers.get(self.peer_at).map(|p| p.name.clone()),
                    Focus::Messages => self.selected().map(|m| m.from.clone()),
                };
                match to {
                    Some(to) => {
                        self.draft = Some(Draft {
                            to,
                            ..Draft::default()
                        })
                    }
                    None => self.said = "no session to write to".into(),
                }
            }
            KeyCode::Char('r') => match self.selected() {
                Some(m) => {
                    self.draft = Some(Draft {
                        to: m.from.clone(),
                        in_reply_to: Some(m.id.clone()),
                        text: String::new(),
                    })
                }
                None => self.said = "no message to reply to".into(),
            },
            KeyCode::Enter => match self.selected() {
                Some(m) => {
                    let root = self.root_of(m).id.clone();
                    self.thread = Some(root);
                    self.message_at = 0;
                    self.focus = Focus::Messages;
                }
                None => self.said = "no message to open".into(),
            },
            _ => {}
        }
        None
    }

    /// The message under the cursor in the message list (or thread).
    pub fn selected(&self) -> Option<&Message> {
        self.shown().get(self.message_at).copied()
    }
}
