//! Parameters, results and events of the worker protocol. Field names are the wire names.
use serde::{Deserialize, Serialize};

use crate::error::ErrorInfo;

/// Result of `handshake`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Handshake {
    pub protocol_version: String,
    /// The worker's name and version, and the MLX version: `mlx-serving-worker 0.1.0 (mlx 0.32.4)`.
    pub engine: String,
    /// `cpu` or `gpu`.
    pub device: String,
    pub pid: u32,
    /// What the worker can do beyond the required methods, e.g. `logprobs`, `chat`.
    pub capabilities: Vec<String>,
    pub limits: Limits,
}

/// The bounds the worker enforces.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Sequences decoded together at most.
    pub max_sequences: usize,
    /// Requests waiting for admission at most; beyond it `overloaded`.
    pub max_queue: usize,
    /// Bytes of KV cache the running sequences may reserve together.
    pub kv_cache_bytes: u64,
    /// Longest accepted input line, in bytes.
    pub max_line_bytes: usize,
    /// Prompt tokens per prefill chunk.
    pub prefill_chunk: usize,
    /// Bytes the prefix KV cache may hold (0: no prefix cache).
    #[serde(default)]
    pub prefix_cache_bytes: u64,
}

/// A loaded model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The name requests use.
    pub model: String,
    pub path: String,
    pub model_type: String,
    /// Bytes of weights in device memory.
    pub weight_bytes: u64,
    /// Bytes of KV cache its running sequences hold now.
    pub kv_cache_bytes: u64,
    pub context_length: usize,
    /// KV cache bytes per token of context.
    pub kv_bytes_per_token: u64,
}

/// Result of `unload_model`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Unloaded {
    pub model: String,
    /// Requests of the model that were running or queued, ended with finish_reason `cancelled`.
    pub cancelled_requests: usize,
}

/// What to generate from: plain text, token ids, or chat messages rendered with the model's
/// chat template (with the generation prompt added).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Prompt {
    Text(String),
    TokenIds(Vec<u32>),
    Messages(Vec<Message>),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Sampling settings; each absent field takes its default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Sampling {
    /// 0 is greedy.
    pub temperature: f32,
    /// In (0, 1]; 1 keeps every token.
    pub top_p: f32,
    /// 0 keeps every token.
    pub top_k: i32,
    /// In [0, 1]; 0 keeps every token.
    pub min_p: f32,
    /// 1 is no penalty.
    pub repetition_penalty: f32,
    /// How many of the latest tokens the penalty looks at.
    pub repetition_context_size: usize,
    /// Seed for reproducible sampling; random when absent.
    pub seed: Option<u64>,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repetition_context_size: 20,
            seed: None,
        }
    }
}

/// Parameters of `generate`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// Chosen by the caller, unique among the worker's running and queued requests; `cancel`
    /// names it.
    pub id: String,
    pub model: String,
    pub prompt: Prompt,
    /// At least 1; prompt plus max_tokens must fit the model's context.
    pub max_tokens: usize,
    #[serde(default)]
    pub sampling: Sampling,
    /// Generation ends before any of these strings, which are not returned.
    #[serde(default)]
    pub stop: Vec<String>,
    /// Generation ends at any of these token ids, besides the model's end-of-sequence ids.
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
    /// Keep going past end-of-sequence tokens.
    #[serde(default)]
    pub ignore_eos: bool,
    /// Include each token's log-probability in the token events.
    #[serde(default)]
    pub logprobs: bool,
    /// Also include this many of the most likely tokens at each step (0 to 20).
    #[serde(default)]
    pub top_logprobs: usize,
    /// Resuming a stream whose worker died: the tokens it already produced. They follow the
    /// prompt, count as generated (against `max_tokens` and in `usage`), advance the random
    /// stream as their draws did, and their text is not sent again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resume_tokens: Vec<u32>,
}

impl GenerateRequest {
    /// A request with every optional field at its default.
    pub fn new(id: impl Into<String>, model: impl Into<String>, prompt: Prompt, max_tokens: usize) -> GenerateRequest {
        GenerateRequest {
            id: id.into(),
            model: model.into(),
            prompt,
            max_tokens,
            sampling: Sampling::default(),
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: false,
            top_logprobs: 0,
            resume_tokens: Vec::new(),
        }
    }
}

/// One event of a `generate` stream. Every stream ends with exactly one `final` event.
///
/// On the wire `{"type": "token", ...}` or `{"type": "final", ...}`. Reading one is on the path
/// of every token, so when `type` comes first (as this type writes it), the rest of the object
/// is read straight into the event; otherwise the object is buffered first.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GenerateEvent {
    Token(TokenEvent),
    Final(FinalEvent),
}

impl<'de> Deserialize<'de> for GenerateEvent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{Error, MapAccess, Visitor, value::MapAccessDeserializer};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = GenerateEvent;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a generate event object with a `type`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<GenerateEvent, A::Error> {
                let Some(key) = map.next_key::<Word>()? else {
                    return Err(A::Error::missing_field("type"));
                };
                if let Word::Type = key {
                    let kind: Word = map.next_value()?;
                    let rest = MapAccessDeserializer::new(map);
                    return match kind {
                        Word::Token => TokenEvent::deserialize(rest).map(GenerateEvent::Token),
                        Word::Final => FinalEvent::deserialize(rest).map(GenerateEvent::Final),
                        other => Err(A::Error::unknown_variant(&other.into_string(), &["token", "final"])),
                    };
                }
                let mut object = serde_json::Map::new();
                object.insert(key.into_string(), map.next_value()?);
                while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                    object.insert(k, v);
                }
                let kind = object.remove("type").ok_or_else(|| A::Error::missing_field("type"))?;
                let rest = serde_json::Value::Object(object);
                match kind.as_str() {
                    Some("token") => TokenEvent::deserialize(rest).map(GenerateEvent::Token).map_err(A::Error::custom),
                    Some("final") => FinalEvent::deserialize(rest).map(GenerateEvent::Final).map_err(A::Error::custom),
                    _ => Err(A::Error::custom(format!("unknown event type {kind}: expected `token` or `final`"))),
                }
            }
        }
        d.deserialize_map(V)
    }
}

/// A string read without keeping it when it is one of the words an event starts with.
enum Word {
    Type,
    Token,
    Final,
    Other(String),
}

impl Word {
    fn into_string(self) -> String {
        match self {
            Word::Type => "type".into(),
            Word::Token => "token".into(),
            Word::Final => "final".into(),
            Word::Other(s) => s,
        }
    }
}

impl<'de> Deserialize<'de> for Word {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Word;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Word, E> {
                Ok(match v {
                    "type" => Word::Type,
                    "token" => Word::Token,
                    "final" => Word::Final,
                    other => Word::Other(other.to_string()),
                })
            }
        }
        d.deserialize_str(V)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenEvent {
    /// The tokens this event reports (one today).
    pub token_ids: Vec<u32>,
    /// Text that became final with these tokens; may be empty while a multi-byte character or
    /// a possible stop string is incomplete.
    pub text: String,
    /// Log-probability of each token under the model, when requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<f32>>,
    /// For each token, the most likely tokens at its step, most likely first, when requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<Vec<Vec<TopLogprob>>>,
}

/// One of the most likely tokens at a step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token_id: u32,
    /// The token's text on its own (may be part of a multi-byte character).
    pub text: String,
    pub logprob: f32,
}

/// The most `top_logprobs` a request may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FinalEvent {
    pub finish_reason: FinishReason,
    /// Text held back until the end (an incomplete character, a partial stop string that did not
    /// complete); append it to the streamed text.
    pub text: String,
    pub usage: Usage,
    /// Milliseconds from arrival to the first token, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_first_token_ms: Option<f64>,
    /// Milliseconds from arrival to the end.
    pub total_ms: f64,
    /// Set when finish_reason is `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token, a stop token id or a stop string.
    Stop,
    /// max_tokens reached.
    Length,
    /// `cancel`, the caller unsubscribed, the model was unloaded, or shutdown's deadline passed.
    Cancelled,
    /// The engine failed; see `error`.
    Error,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the worker's prefix cache instead of a prefill.
    #[serde(default)]
    pub cached_tokens: usize,
}

/// Result of `shutdown`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShutdownAck {
    /// Requests running or queued when the shutdown began.
    pub in_flight: usize,
    pub deadline_ms: u64,
}

/// Memory figures in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    /// MLX: memory held by live arrays.
    pub active: u64,
    /// MLX: the most `active` has been.
    pub peak: u64,
    /// MLX: freed memory kept for reuse.
    pub cache: u64,
    /// Resident set size of the worker process.
    pub rss: u64,
}

/// Counters that only grow; a supervisor compares two heartbeats to see progress.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub prefilled_tokens: u64,
    pub decoded_tokens: u64,
    /// Engine loop iterations: moves whenever the engine does anything.
    pub steps: u64,
}

/// The worker's prefix KV cache, over all models: counters only grow, `entries` and `bytes` are
/// what it holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefixCacheStats {
    /// Requests that reused cached keys and values for at least one prompt token.
    pub hits: u64,
    /// Requests that found nothing to reuse.
    pub misses: u64,
    /// Prompt tokens whose prefill was skipped.
    pub cached_tokens: u64,
    pub evictions: u64,
    pub entries: usize,
    pub bytes: u64,
}

/// The `heartbeat` notification, sent every interval from a thread that never waits on MLX.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Counts heartbeats from 0.
    pub seq: u64,
    pub uptime_ms: u64,
    pub progress: Progress,
    pub queue_depth: usize,
    pub active_sequences: usize,
    pub models: Vec<String>,
    pub memory: Memory,
    /// Set once `shutdown` was called.
    pub draining: bool,
    #[serde(default)]
    pub prefix_cache: PrefixCacheStats,
}

/// Result of `stats`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub uptime_ms: u64,
    pub progress: Progress,
    pub queue_depth: usize,
    pub active_sequences: usize,
    pub requests: RequestCounts,
    pub models: Vec<ModelInfo>,
    pub memory: Memory,
    /// KV cache bytes reserved by running sequences, out of `limits.kv_cache_bytes`.
    pub kv_reserved_bytes: u64,
    #[serde(default)]
    pub prefix_cache: PrefixCacheStats,
    pub limits: Limits,
    pub draining: bool,
}

/// Requests by outcome since the worker started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    pub accepted: u64,
    pub rejected: u64,
    pub stopped: u64,
    pub length: u64,
    pub cancelled: u64,
    pub failed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_read_with_the_type_anywhere_and_bad_ones_say_why() {
        let token = GenerateEvent::Token(TokenEvent {
            token_ids: vec![5, 6],
            text: " Hi".into(),
            logprobs: Some(vec![-0.5, -1.0]),
            top_logprobs: None,
        });
        let line = serde_json::to_string(&token).unwrap();
        assert!(line.starts_with(r#"{"type":"token""#), "{line}");
        assert_eq!(serde_json::from_str::<GenerateEvent>(&line).unwrap(), token);
        // The type last: buffered, same event.
        let moved = json!({"token_ids": [5, 6], "text": " Hi", "logprobs": [-0.5, -1.0], "type": "token"});
        assert_eq!(serde_json::from_value::<GenerateEvent>(moved.clone()).unwrap(), token);
        assert_eq!(serde_json::from_str::<GenerateEvent>(&moved.to_string()).unwrap(), token);
        let last = json!({"type": "final", "finish_reason": "stop", "text": "!", "usage": {"prompt_tokens": 2, "completion_tokens": 1}, "total_ms": 3.5});
        assert!(
            matches!(serde_json::from_value::<GenerateEvent>(last).unwrap(), GenerateEvent::Final(f) if f.text == "!" && f.usage.cached_tokens == 0)
        );
        let unknown = serde_json::from_str::<GenerateEvent>(r#"{"type": "tokens", "token_ids": [], "text": ""}"#)
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("tokens") && unknown.contains("token"), "{unknown}");
        let untyped =
            serde_json::from_str::<GenerateEvent>(r#"{"token_ids": [], "text": ""}"#).unwrap_err().to_string();
        assert!(untyped.contains("type"), "{untyped}");
        let incomplete =
            serde_json::from_str::<GenerateEvent>(r#"{"type": "token", "text": ""}"#).unwrap_err().to_string();
        assert!(incomplete.contains("token_ids"), "{incomplete}");
    }
}
