//! Aligned text tables and human-friendly times for the CLI.

use crate::protocol::Millis;
pub use crate::time::timestamp;

/// Renders rows under headers, each column as wide as its widest cell, the last column
/// left ragged.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, cell) in cells.enumerate() {
            if i + 1 < widths.len() {
                s.push_str(cell);
                s.extend(std::iter::repeat_n(
                    ' ',
                    widths[i] - cell.chars().count() + 2,
                ));
            } else {
                s.push_str(cell);
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// Cuts `s` to at most `max` characters on one line, marking the cut with `…`.
pub fn clip(s: &str, max: usize) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// "now", "42s ago", "5m ago", "3h ago", "2d ago".
pub fn ago(then: Millis, now: Millis) -> String {
    let secs = (now - then).max(0) / 1000;
    match secs {
        0..=1 => "now".to_string(),
        2..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86_399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// `path` with the home directory shown as `~`.
pub fn short_path(path: &str) -> String {
    match std::env::var("HOME") {
        Ok(home) if !home.is_empty() && home != "/" => match path.strip_prefix(&home) {
            Some("") => "~".to_string(),
            Some(rest) if rest.starts_with('/') => format!("~{rest}"),
            _ => path.to_string(),
        },
        _ => path.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns() {
        let t = render(
            &["NAME", "STATE"],
            &[
                vec!["a".into(), "online".into()],
                vec!["long-name".into(), "-".into()],
            ],
        );
        assert_eq!(t, "NAME       STATE\na          online\nlong-name  -\n");
    }

    #[test]
    fn clips_and_times() {
        assert_eq!(clip("abc\ndef", 10), "abc def");
        assert_eq!(clip("abcdef", 4), "abc…");
        assert_eq!(ago(0, 500), "now");
        assert_eq!(ago(0, 120_000), "2m ago");
        assert_eq!(ago(0, 3 * 86_400_000), "3d ago");
    }
}
