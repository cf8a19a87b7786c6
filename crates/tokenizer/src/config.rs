//! Reading the JSON files next to `tokenizer.json`: `tokenizer_config.json`, `config.json`,
//! `generation_config.json`, and the chat template (`chat_template.jinja` or the config's field).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::TokenizerError;

type Result<T> = std::result::Result<T, TokenizerError>;

/// Reads a file to a string; `Ok(None)` when it does not exist.
pub(crate) fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Read { path: path.to_owned(), source }),
    }
}

/// Reads and parses a JSON object file; `Ok(None)` when it does not exist.
fn read_json_object(path: &Path) -> Result<Option<serde_json::Map<String, Value>>> {
    let Some(text) = read_optional(path)? else {
        return Ok(None);
    };
    let value: Value =
        serde_json::from_str(&text).map_err(|source| TokenizerError::Json { path: path.to_owned(), source })?;
    match value {
        Value::Object(map) => Ok(Some(map)),
        other => Err(TokenizerError::InvalidField {
            path: path.to_owned(),
            field: "(top level)",
            problem: format!("must be a JSON object, found {}", json_kind(&other)),
        }),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn invalid(path: &Path, field: &'static str, problem: String) -> TokenizerError {
    TokenizerError::InvalidField { path: path.to_owned(), field, problem }
}

/// What this crate uses from `tokenizer_config.json` (and `chat_template.jinja`).
#[derive(Debug, Default)]
pub(crate) struct TokenizerConfig {
    /// Template source and the file it came from.
    pub chat_template: Option<(String, PathBuf)>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    pub add_bos_token: Option<bool>,
}

impl TokenizerConfig {
    /// Reads `tokenizer_config.json` (optional) and `chat_template.jinja` (optional; it takes
    /// precedence over the config's `chat_template`, as in Hugging Face transformers).
    pub(crate) fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        let mut config = TokenizerConfig::default();
        if let Some(map) = read_json_object(&path)? {
            config.bos_token = special_token(&map, &path, "bos_token")?;
            config.eos_token = special_token(&map, &path, "eos_token")?;
            config.pad_token = special_token(&map, &path, "pad_token")?;
            config.unk_token = special_token(&map, &path, "unk_token")?;
            config.add_bos_token = match map.get("add_bos_token") {
                None | Some(Value::Null) => None,
                Some(Value::Bool(b)) => Some(*b),
                Some(other) => {
                    let found = json_kind(other);
                    return Err(invalid(&path, "add_bos_token", format!("must be a boolean, found {found}")));
                }
            };
            if let Some(source) = chat_template_field(map.get("chat_template"), &path)? {
                config.chat_template = Some((source, path.clone()));
            }
        }
        let jinja = dir.join("chat_template.jinja");
        if let Some(source) = read_optional(&jinja)? {
            config.chat_template = Some((source, jinja));
        }
        Ok(config)
    }
}

/// A special token given as a string, as an AddedToken-style object `{"content": ...}`, or null.
fn special_token(map: &serde_json::Map<String, Value>, path: &Path, field: &'static str) -> Result<Option<String>> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(obj)) => match obj.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(invalid(path, field, "is an object without a string `content`".into())),
        },
        Some(other) => Err(invalid(
            path,
            field,
            format!("must be a string or an object with `content`, found {}", json_kind(other)),
        )),
    }
}

/// `chat_template` is a string, or a list of `{"name", "template"}` of which "default" is used.
fn chat_template_field(value: Option<&Value>, path: &Path) -> Result<Option<String>> {
    const FIELD: &str = "chat_template";
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(items)) => {
            let mut names = Vec::new();
            for item in items {
                let name = item.get("name").and_then(Value::as_str);
                let template = item.get("template").and_then(Value::as_str);
                let (Some(name), Some(template)) = (name, template) else {
                    let problem = "list entries must be objects with string `name` and `template`";
                    return Err(invalid(path, FIELD, problem.into()));
                };
                if name == "default" {
                    return Ok(Some(template.to_owned()));
                }
                names.push(name.to_owned());
            }
            Err(invalid(path, FIELD, format!("has no template named \"default\" (found {names:?})")))
        }
        Some(other) => Err(invalid(
            path,
            FIELD,
            format!("must be a string or a list of named templates, found {}", json_kind(other)),
        )),
    }
}

/// `eos_token_id` from `config.json` and `generation_config.json` (each optional): an integer,
/// a list of integers, or null. Returns the ids in file order.
pub(crate) fn eos_token_ids_from_model_configs(dir: &Path) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for name in ["config.json", "generation_config.json"] {
        let path = dir.join(name);
        if let Some(map) = read_json_object(&path)? {
            ids.extend(eos_ids(map.get("eos_token_id"), &path)?);
        }
    }
    Ok(ids)
}

fn eos_ids(value: Option<&Value>, path: &Path) -> Result<Vec<u32>> {
    const FIELD: &str = "eos_token_id";
    let as_id = |v: &Value| -> Result<u32> {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| invalid(path, FIELD, format!("must hold non-negative 32-bit integers, found {v}")))
    };
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(as_id).collect(),
        Some(v) => Ok(vec![as_id(v)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn eos_ids_accepts_int_list_and_null() {
        let p = Path::new("config.json");
        assert_eq!(eos_ids(Some(&json!(7)), p).unwrap(), vec![7]);
        assert_eq!(eos_ids(Some(&json!([1, 2])), p).unwrap(), vec![1, 2]);
        assert!(eos_ids(Some(&json!(null)), p).unwrap().is_empty());
        assert!(eos_ids(None, p).unwrap().is_empty());
        let err = eos_ids(Some(&json!("x")), p).unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("eos_token_id"), "{err}");
        assert!(eos_ids(Some(&json!([-1])), p).is_err());
    }

    #[test]
    fn special_token_accepts_string_and_object() {
        let p = Path::new("tokenizer_config.json");
        let map = json!({"a": "<s>", "b": {"content": "</s>", "lstrip": false}, "c": null, "d": 3});
        let map = map.as_object().unwrap();
        assert_eq!(special_token(map, p, "a").unwrap().as_deref(), Some("<s>"));
        assert_eq!(special_token(map, p, "b").unwrap().as_deref(), Some("</s>"));
        assert_eq!(special_token(map, p, "c").unwrap(), None);
        assert_eq!(special_token(map, p, "missing").unwrap(), None);
        let err = special_token(map, p, "d").unwrap_err().to_string();
        assert!(err.contains("`d`"), "{err}");
    }

    #[test]
    fn chat_template_list_form_picks_default() {
        let p = Path::new("tokenizer_config.json");
        let v = json!([{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]);
        assert_eq!(chat_template_field(Some(&v), p).unwrap().as_deref(), Some("D"));
        let v = json!([{"name": "tool_use", "template": "T"}]);
        let err = chat_template_field(Some(&v), p).unwrap_err().to_string();
        assert!(err.contains("default") && err.contains("tool_use"), "{err}");
        assert!(chat_template_field(Some(&json!(5)), p).is_err());
    }
}
