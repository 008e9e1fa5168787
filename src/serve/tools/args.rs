//! What the tools take: their arguments, with the schemas the model is shown.

use rmcp::model::JsonObject;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;

use crate::protocol::Scope;

#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ScopeArg {
    /// Every session on this machine.
    #[default]
    Machine,
    /// Sessions in the same working directory.
    Directory,
    /// Sessions in the same git repository, worktrees included.
    Repo,
    /// Every online session of every machine this one is bridged to, as name@host.
    Network,
}

impl From<ScopeArg> for Scope {
    fn from(s: ScopeArg) -> Scope {
        match s {
            ScopeArg::Machine => Scope::Machine,
            ScopeArg::Directory => Scope::Directory,
            ScopeArg::Repo => Scope::Repo,
            ScopeArg::Network => Scope::Network,
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ListPeersArgs {
    /// Which sessions: machine (default), directory, repo or network.
    #[serde(default)]
    pub scope: ScopeArg,
    /// Also list sessions that are offline (their mail waits for them).
    #[serde(default)]
    pub include_offline: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct SendArgs {
    /// The recipient's peer name (from list_peers).
    #[serde(default)]
    pub to: Option<String>,
    /// Same as `to` (the spelling of the older claude-peers).
    #[serde(default)]
    pub to_id: Option<String>,
    /// The message text.
    pub message: String,
    /// The message_id this answers, to thread a reply.
    #[serde(default)]
    pub in_reply_to: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct BroadcastArgs {
    /// The message text.
    pub message: String,
    /// Who gets it: every online session in this scope (machine, directory, repo, or
    /// network: every machine this one is bridged to).
    pub scope: ScopeArg,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct SummaryArgs {
    /// One or two lines on what this session is doing, shown to other sessions.
    pub summary: String,
}

/// Checks a tool call's arguments against the tool's input schema, so that a wrong one is
/// named with what it must be (`scope must be machine, directory, repo or network, not
/// "galaxy"`) rather than in serde's words, which do not say which argument was wrong.
/// Arguments the schema does not know are left alone, as the tools ignore them.
pub fn check(args: Option<&JsonObject>, schema: &JsonObject) -> Result<(), String> {
    let no_args = JsonObject::new();
    let args = args.unwrap_or(&no_args);
    let required = schema.get("required").and_then(Value::as_array);
    for name in required.into_iter().flatten().filter_map(Value::as_str) {
        if args.get(name).is_none_or(Value::is_null) {
            return Err(format!("{name} is required"));
        }
    }
    let properties = schema.get("properties").and_then(Value::as_object);
    for (name, value) in args {
        let Some(property) = properties.and_then(|p| p.get(name)) else {
            continue;
        };
        let property = resolve(property, schema);
        let choices = choices(property);
        if !choices.is_empty() {
            if !value.as_str().is_some_and(|v| choices.contains(&v)) {
                return Err(format!(
                    "{name} must be {}, not {}",
                    one_of(&choices),
                    shown(value)
                ));
            }
            continue;
        }
        let types: Vec<&str> = match property.get("type") {
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
            _ => continue,
        };
        let fits = |t: &str| match t {
            "string" => value.is_string(),
            "boolean" => value.is_boolean(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "array" => value.is_array(),
            "object" => value.is_object(),
            "null" => value.is_null(),
            _ => true,
        };
        if !types.iter().any(|t| fits(t)) {
            let wanted: Vec<&str> = types
                .iter()
                .filter(|t| **t != "null")
                .map(|t| match *t {
                    "string" => "text",
                    "boolean" => "true or false",
                    "integer" | "number" => "a number",
                    "array" => "a list",
                    _ => "an object",
                })
                .collect();
            return Err(format!(
                "{name} must be {}, not {}",
                one_of(&wanted),
                shown(value)
            ));
        }
    }
    Ok(())
}

/// A property's schema, following a `$ref` into the schema's `$defs`.
fn resolve<'a>(property: &'a Value, schema: &'a JsonObject) -> &'a Value {
    property
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/$defs/"))
        .and_then(|name| schema.get("$defs")?.get(name))
        .unwrap_or(property)
}

/// The values an enumerated property takes (`enum`, or `oneOf` of `const`s).
fn choices(property: &Value) -> Vec<&str> {
    if let Some(values) = property.get("enum").and_then(Value::as_array) {
        return values.iter().filter_map(Value::as_str).collect();
    }
    let one_of = property.get("oneOf").and_then(Value::as_array);
    one_of
        .into_iter()
        .flatten()
        .filter_map(|v| v.get("const")?.as_str())
        .collect()
}

/// "a", "a or b", "a, b or c".
fn one_of(words: &[&str]) -> String {
    match words {
        [] => "something else".to_string(),
        [one] => one.to_string(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

/// A value as the error shows it, cut short.
fn shown(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 40 {
        format!("{}…", text.chars().take(39).collect::<String>())
    } else {
        text
    }
}
