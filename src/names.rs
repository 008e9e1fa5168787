//! Peer names: the address of a session.
//!
//! A name is 1–64 characters from `[A-Za-z0-9._-]`. It is used as a lookup key and shown
//! to people and models, never as a path, so nothing else is allowed: no `/`, no spaces,
//! no control characters. `.` and `..` alone are refused too, to keep them unambiguous.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest name accepted, in bytes (all accepted characters are one byte).
pub const MAX_NAME_LEN: usize = 64;

/// A validated peer name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct PeerName(String);

/// Why a string is not a valid name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("a peer name cannot be empty")]
    Empty,
    #[error("peer name is {0} bytes long; the limit is {MAX_NAME_LEN}")]
    TooLong(usize),
    #[error(
        "peer name {0:?} has the character {1:?}; names use only letters, digits, '.', '_' and '-'"
    )]
    BadChar(String, char),
    #[error(
        "peer name {0:?} is reserved: a session may not pose as the user, the model or the command line; choose another name"
    )]
    Reserved(String),
}

/// Names nobody may sign a message with, in any case: a model reading a message from
/// `user` or `system` could take it for more than a peer's words.
pub const RESERVED_SENDERS: &[&str] = &[
    "user",
    "system",
    "assistant",
    "claude",
    "human",
    "developer",
    "anthropic",
];

/// Whether `s` is one of the [`RESERVED_SENDERS`], in any case.
pub fn is_reserved_sender(s: &str) -> bool {
    RESERVED_SENDERS.iter().any(|r| r.eq_ignore_ascii_case(s))
}

/// Whether no session may take the name `s`: a reserved sender, or `cli`, the default
/// signature of the command line's own sends.
pub fn is_reserved(s: &str) -> bool {
    is_reserved_sender(s) || s.eq_ignore_ascii_case("cli")
}

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

impl PeerName {
    /// Checks `s` and wraps it. Nothing is changed: use [`PeerName::sanitize`] to derive a
    /// name from arbitrary text.
    pub fn new(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if let Some(c) = s.chars().find(|&c| !allowed(c)) {
            return Err(NameError::BadChar(s.escape_debug().to_string(), c));
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong(s.len()));
        }
        if s == "." || s == ".." {
            return Err(NameError::Reserved(s.to_string()));
        }
        Ok(Self(s.to_string()))
    }

    /// Turns arbitrary text (a directory name, say) into a valid name a person still
    /// recognises: letters of other scripts are transliterated (`日本語` → `Ri-Ben-Yu`,
    /// `café` → `cafe`), runs of other characters become one `-`, the result is trimmed of
    /// `-` and `.` at the ends and cut to the length limit. Falls back to `session` when
    /// nothing usable is left.
    pub fn sanitize(s: &str) -> Self {
        let s = &deunicode::deunicode(s);
        let mut out = String::with_capacity(s.len().min(MAX_NAME_LEN));
        let mut pending_dash = false;
        for c in s.chars() {
            if allowed(c) {
                if pending_dash && !out.is_empty() {
                    out.push('-');
                }
                pending_dash = false;
                out.push(c);
            } else {
                pending_dash = true;
            }
        }
        let trimmed = out.trim_matches(|c| c == '-' || c == '.');
        let cut = &trimmed[..trimmed.len().min(MAX_NAME_LEN)];
        let cut = cut.trim_end_matches(['-', '.']);
        if cut.is_empty() {
            Self("session".to_string())
        } else if is_reserved(cut) {
            // A directory named `user` gives `user-session`, never `user`.
            Self(format!("{cut}-session"))
        } else {
            Self(cut.to_string())
        }
    }

    /// Checks that a session may take this name: valid and not reserved ([`is_reserved`]).
    pub fn registrable(s: &str) -> Result<Self, NameError> {
        let name = Self::new(s)?;
        if is_reserved(s) {
            return Err(NameError::Reserved(s.to_string()));
        }
        Ok(name)
    }

    /// The name with a numeric suffix (`name-2`), shortened so the result stays within the
    /// length limit.
    pub fn with_suffix(&self, n: u32) -> Self {
        let suffix = format!("-{n}");
        let keep = self.0.len().min(MAX_NAME_LEN - suffix.len());
        Self(format!("{}{suffix}", &self.0[..keep]))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for PeerName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for PeerName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for PeerName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PeerName::new(&s).map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for PeerName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        PeerName::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_refuses() {
        assert!(PeerName::new("api-server_2.v1").is_ok());
        assert_eq!(PeerName::new(""), Err(NameError::Empty));
        assert!(matches!(
            PeerName::new("a/b"),
            Err(NameError::BadChar(_, '/'))
        ));
        assert!(matches!(
            PeerName::new("a\nb"),
            Err(NameError::BadChar(_, '\n'))
        ));
        assert!(matches!(
            PeerName::new("é"),
            Err(NameError::BadChar(_, 'é'))
        ));
        assert!(matches!(PeerName::new(".."), Err(NameError::Reserved(_))));
        assert_eq!(PeerName::new(&"a".repeat(65)), Err(NameError::TooLong(65)));
        assert!(PeerName::new(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn sanitize_makes_valid_names() {
        assert_eq!(
            PeerName::sanitize("my repo (copy)").as_str(),
            "my-repo-copy"
        );
        assert_eq!(PeerName::sanitize("..").as_str(), "session");
        assert_eq!(PeerName::sanitize("").as_str(), "session");
        assert_eq!(PeerName::sanitize(".hidden").as_str(), "hidden");
        // Other scripts are transliterated, not dropped (a newcomer's run of issue 15:
        // `日本語` gave `session`).
        assert_eq!(PeerName::sanitize("日本語").as_str(), "Ri-Ben-Yu");
        assert_eq!(PeerName::sanitize("café-app").as_str(), "cafe-app");
        assert_eq!(PeerName::sanitize("\u{200b}").as_str(), "session");
        let long = PeerName::sanitize(&"x".repeat(200));
        assert_eq!(long.as_str().len(), MAX_NAME_LEN);
        for s in ["a b", "-x-", "a..b", "ü-ber", "\u{0}x"] {
            let n = PeerName::sanitize(s);
            assert_eq!(PeerName::new(n.as_str()).as_ref(), Ok(&n), "{s:?}");
        }
    }

    #[test]
    fn suffix_stays_within_limit() {
        let n = PeerName::new(&"a".repeat(64)).unwrap();
        let s = n.with_suffix(12);
        assert_eq!(s.as_str().len(), 64);
        assert!(s.as_str().ends_with("-12"));
        assert_eq!(
            PeerName::new("web").unwrap().with_suffix(2).as_str(),
            "web-2"
        );
    }

    #[test]
    fn reserved_names_in_any_case_are_not_registrable_and_never_derived() {
        for r in ["user", "User", "SYSTEM", "Claude", "cli"] {
            assert!(
                matches!(PeerName::registrable(r), Err(NameError::Reserved(_))),
                "{r}"
            );
            assert!(
                PeerName::new(r).is_ok(),
                "still a valid name to send from or to: {r}"
            );
        }
        assert!(PeerName::registrable("user-api").is_ok());
        assert_eq!(PeerName::sanitize("user").as_str(), "user-session");
        assert_eq!(PeerName::sanitize("Claude").as_str(), "Claude-session");
        assert_eq!(PeerName::sanitize("users").as_str(), "users");
    }
}
