//! Drawing `top`: a header, the sessions, the messages (or one thread), and a footer with
//! the keys, what just happened, or the message being written.

use std::collections::HashMap;

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{
    Block, Borders, Cell, List, ListItem, ListState, Paragraph, Row, Table, TableState,
};

use super::{App, Broker, Focus, Message};
use crate::cli::table::{clip, short_path};
use crate::protocol::{DeliveryState, Millis, PeerInfo};
use crate::time::clock;

pub fn draw(f: &mut Frame, app: &mut App) {
    let sessions =
        (app.peers.len() as u16 + 3).clamp(4, f.area().height.saturating_sub(6).max(4) / 2 + 2);
    let [head, top, bottom, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(sessions),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(f.area());
    f.render_widget(Paragraph::new(header(app)), head);
    draw_sessions(f, app, top);
    draw_messages(f, app, bottom);
    f.render_widget(Paragraph::new(footer(app)), foot);
}

fn header(app: &App) -> Line<'static> {
    let online = app.peers.iter().filter(|p| p.online).count();
    let broker = match &app.broker {
        Broker::Connecting => "connecting to the broker…".to_string(),
        Broker::Up { pid, version, .. } => format!("broker pid {pid}, v{version}"),
        Broker::Lost => "broker not running: waiting for it".to_string(),
    };
    Line::from(vec![
        Span::styled("claude-peers top", Style::new().bold()),
        Span::raw(format!(
            "  {broker}  scope {}  {online} online, {} offline",
            scope_name(app.scope),
            app.peers.len() - online
        )),
    ])
}

fn scope_name(s: crate::protocol::Scope) -> &'static str {
    use crate::protocol::Scope::*;
    match s {
        Machine => "machine",
        Directory => "directory",
        Repo => "repo",
        Network => "network",
    }
}

fn draw_sessions(f: &mut Frame, app: &App, area: ratatui::layout::Rect) {
    // Each session's last message in view, from one pass over the messages.
    let mut last: HashMap<&str, Millis> = HashMap::new();
    for m in &app.messages {
        for name in std::iter::once(&m.from).chain(m.to.iter().map(|(to, _)| to)) {
            last.insert(name, m.sent_at);
        }
    }
    let rows: Vec<Row> = (app.peers.iter())
        .map(|p| session_row(p, last.get(p.name.as_str()).copied()))
        .collect();
    let table = Table::new(
        rows,
        [
            Constraint::Length(18),
            Constraint::Length(8),
            Constraint::Length(24),
            Constraint::Length(14),
            Constraint::Length(6),
            Constraint::Length(9),
            Constraint::Length(16),
            Constraint::Fill(1),
        ],
    )
    .header(
        Row::new([
            "NAME", "STATE", "WHERE", "BRANCH", "UNREAD", "ACTIVE", "DELIVERY", "SUMMARY",
        ])
        .style(Style::new().add_modifier(Modifier::BOLD)),
    )
    .block(block(" sessions ", app.focus == Focus::Sessions))
    .row_highlight_style(Style::new().reversed());
    let mut state = TableState::default();
    if app.focus == Focus::Sessions && !app.peers.is_empty() {
        state.select(Some(app.peer_at));
    }
    f.render_stateful_widget(table, area, &mut state);
}

fn session_row(p: &PeerInfo, last_message: Option<Millis>) -> Row<'_> {
    let state = match (p.online, p.unreachable) {
        (true, _) => Span::raw("online").green(),
        (false, true) => Span::raw("unreach").red(),
        (false, false) => Span::raw("offline").dim(),
    };
    // Last activity: its last message in view, else when it was last seen.
    let active = last_message.unwrap_or(p.last_seen);
    let delivery = match (&p.context.client_name, p.online) {
        (_, false) => "-".to_string(),
        (Some(c), true) => format!(
            "{} {}",
            if p.context.push { "push" } else { "poll" },
            short_client(c)
        ),
        (None, true) => if p.context.push { "push" } else { "poll" }.to_string(),
    };
    Row::new(vec![
        Cell::from(p.name.clone()),
        Cell::from(state),
        Cell::from(short_path(&p.context.cwd)),
        Cell::from(p.context.branch.clone().unwrap_or_else(|| "-".into())),
        Cell::from(p.unread.to_string()),
        Cell::from(clock(active)),
        Cell::from(delivery),
        Cell::from(clip(&p.summary, 80)),
    ])
}

/// `claude-code` → `claude`, `codex-mcp-client` → `codex`.
fn short_client(c: &str) -> &str {
    c.split(['-', ' ']).next().unwrap_or(c)
}

fn draw_messages(f: &mut Frame, app: &App, area: ratatui::layout::Rect) {
    let shown = app.shown();
    let title = match &app.thread {
        Some(_) => format!(" thread ({} messages; Esc: all messages) ", shown.len()),
        None => format!(" messages ({}) ", shown.len()),
    };
    let items: Vec<ListItem> = shown
        .iter()
        .map(|m| ListItem::new(message_line(app, m)))
        .collect();
    let list = List::new(items)
        .block(block(&title, app.focus == Focus::Messages))
        .highlight_style(Style::new().reversed());
    let mut state = ListState::default();
    if !shown.is_empty() {
        state.select(Some(app.message_at.min(shown.len() - 1)));
    }
    f.render_stateful_widget(list, area, &mut state);
}

fn message_line(app: &App, m: &Message) -> Line<'static> {
    // A reply to a message in view is set in under it.
    let depth = std::iter::successors(app.parent(m), |p| app.parent(p))
        .take(4)
        .count();
    let mut spans = vec![
        Span::raw(clock(m.sent_at)).dim(),
        Span::raw(format!("  {}", "  ".repeat(depth))),
        Span::raw(if depth > 0 { "↳ " } else { "" }),
        Span::styled(m.from.clone(), Style::new().bold()),
        Span::raw(" → "),
    ];
    for (i, (to, state)) in m.to.iter().enumerate() {
        if i > 0 {
            spans.push(Span::raw(", "));
        }
        spans.push(Span::raw(to.clone()));
        spans.push(mark(*state));
    }
    spans.push(Span::raw(format!("  {}", clip(&m.text, 200))));
    Line::from(spans)
}

/// A recipient's state in one character: · queued, → pushed, ✓ delivered, …
fn mark(s: DeliveryState) -> Span<'static> {
    match s {
        DeliveryState::Queued => Span::raw(" ·").yellow(),
        DeliveryState::Pushed => Span::raw(" →").cyan(),
        DeliveryState::Delivered => Span::raw(" ✓").green(),
        DeliveryState::Held => Span::raw(" ⏸").yellow(),
        DeliveryState::Denied | DeliveryState::Undeliverable => Span::raw(" ✗").red(),
        DeliveryState::Damaged => Span::raw(" !").red(),
        DeliveryState::Relaying => Span::raw(" ⇢").cyan(),
    }
}

fn footer(app: &App) -> Line<'static> {
    if let Some(d) = &app.draft {
        let what = if d.in_reply_to.is_some() {
            "reply to"
        } else {
            "to"
        };
        return Line::from(vec![
            Span::styled(format!("{what} {}: ", d.to), Style::new().bold()),
            Span::raw(d.text.clone()),
            Span::raw("▏"),
            Span::raw("   (Enter sends, Esc cancels)").dim(),
        ]);
    }
    if app.help {
        return Line::from(
            "Tab: sessions/messages  ↑↓ jk: move  m: write to the session (or sender)  r: reply  Enter: open thread  Esc: back  s: scope  q: quit",
        );
    }
    Line::from(vec![
        Span::raw("q quit  Tab switch  m write  r reply  Enter thread  s scope  ? keys").dim(),
        Span::raw(format!("   {}", app.said)),
    ])
}

fn block(title: &str, focused: bool) -> Block<'static> {
    let b = Block::new().borders(Borders::ALL).title(title.to_string());
    if focused {
        b.border_style(Style::new().cyan())
    } else {
        b
    }
}
