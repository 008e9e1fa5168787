//! Input schemas as every agent reads them: flat. schemars writes an enum as a `$ref` to
//! `$defs` and an optional string as `"type": ["string", "null"]`; some clients (Gemini
//! CLI's function declarations, Codex's) take neither well. Both are rewritten here, once,
//! when the server is built.

use rmcp::model::JsonObject;
use serde_json::Value;

/// `schema` with every `$ref` to its `$defs` replaced by the definition itself, the
/// `$defs` dropped, and `"type": [T, "null"]` written as `"type": T` (an optional field is
/// already one that is not `required`).
pub fn flat(schema: &JsonObject) -> JsonObject {
    let defs = schema.get("$defs").cloned().unwrap_or(Value::Null);
    let mut out = Value::Object(schema.clone());
    if let Value::Object(o) = &mut out {
        o.remove("$defs");
    }
    rewrite(&mut out, &defs);
    match out {
        Value::Object(o) => o,
        _ => unreachable!("an object stays an object"),
    }
}

fn rewrite(v: &mut Value, defs: &Value) {
    match v {
        Value::Object(o) => {
            if let Some(Value::String(r)) = o.get("$ref")
                && let Some(def) = r.strip_prefix("#/$defs/").and_then(|name| defs.get(name))
            {
                let mut def = def.clone();
                o.remove("$ref");
                // What sat beside the reference (a description, a default) stays.
                if let Value::Object(d) = &mut def {
                    for (k, v) in std::mem::take(o) {
                        d.insert(k, v);
                    }
                }
                *v = def;
                rewrite(v, defs);
                return;
            }
            // An enum written as one `const` per variant (schemars does so when variants
            // have doc comments) becomes a plain `enum` of strings.
            if let Some(Value::Array(variants)) = o.get("oneOf")
                && let Some(values) = variants
                    .iter()
                    .map(|v| v.get("const").cloned())
                    .collect::<Option<Vec<Value>>>()
            {
                o.remove("oneOf");
                o.insert("type".into(), "string".into());
                o.insert("enum".into(), Value::Array(values));
            }
            if o.get("default") == Some(&Value::Null) {
                o.remove("default");
            }
            if let Some(Value::Array(types)) = o.get("type") {
                let kept: Vec<&Value> = types.iter().filter(|t| *t != "null").collect();
                if let [one] = kept[..] {
                    let one = one.clone();
                    o.insert("type".into(), one);
                }
            }
            for child in o.values_mut() {
                rewrite(child, defs);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|c| rewrite(c, defs)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_are_inlined_and_null_types_dropped() {
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "scope": {"$ref": "#/$defs/Scope", "description": "which", "default": "machine"},
                "to": {"type": ["string", "null"], "default": null},
            },
            "$defs": {"Scope": {"oneOf": [
                {"type": "string", "const": "machine", "description": "here"},
                {"type": "string", "const": "repo", "description": "this repository"},
            ]}},
        });
        let flat = flat(schema.as_object().unwrap());
        assert_eq!(
            Value::Object(flat),
            serde_json::json!({
                "type": "object",
                "properties": {
                    "scope": {"type": "string", "enum": ["machine", "repo"], "description": "which", "default": "machine"},
                    "to": {"type": "string"},
                },
            })
        );
    }
}
