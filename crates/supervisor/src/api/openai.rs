//! OpenAI request bodies, parsed once into a [`ValidRequest`] whose errors name the field and
//! the limit, and the response bodies built from worker events.
use mlx_serving_protocol::{
    GenerateRequest, MAX_TOP_LOGPROBS, Message, Prompt, Sampling, TokenEvent, TopLogprob, Usage,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiError;

/// Stop strings per request at most (the worker's bound).
pub const MAX_STOP: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Chat,
    Completions,
}

impl Route {
    pub fn name(self) -> &'static str {
        match self {
            Route::Chat => "/v1/chat/completions",
            Route::Completions => "/v1/completions",
        }
    }

    /// The id of a response (`chatcmpl-…`, `cmpl-…`) to the request `id`.
    pub fn response_id(self, id: &str) -> String {
        match self {
            Route::Chat => format!("chatcmpl-{id}"),
            Route::Completions => format!("cmpl-{id}"),
        }
    }

    /// The `object` of a streamed chunk.
    pub fn chunk_object(self) -> &'static str {
        match self {
            Route::Chat => "chat.completion.chunk",
            Route::Completions => "text_completion",
        }
    }

    pub fn prompt_param(self) -> &'static str {
        match self {
            Route::Chat => "messages",
            Route::Completions => "prompt",
        }
    }
}

/// Every field either route accepts; anything else is refused by name, as OpenAI does.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Body {
    model: String,
    messages: Option<Vec<MessageIn>>,
    prompt: Option<Value>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    min_p: Option<f64>,
    repetition_penalty: Option<f64>,
    n: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    stop: Option<Value>,
    seed: Option<u64>,
    logprobs: Option<Value>,
    top_logprobs: Option<i64>,
    response_format: Option<Value>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<Value>,
    user: Option<String>,
    ignore_eos: Option<bool>,
    return_token_ids: Option<bool>,
    echo: Option<bool>,
    suffix: Option<String>,
    best_of: Option<i64>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct MessageIn {
    role: String,
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    name: Option<String>,
}

/// A request that passed every check.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub route: Route,
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: bool,
    /// Extension: add each choice's generated token ids (`token_ids`).
    pub return_token_ids: bool,
    pub generate: GenerateRequest,
}

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(Some(param.to_string()), message)
}

/// Parses and checks a body; the error names the field and the limit.
/// Bounds on `max_tokens` (from `http.default_max_tokens` and `http.max_tokens`).
pub struct TokenLimits {
    pub default_max_tokens: usize,
    /// 0: no bound here (the context bounds it).
    pub max_tokens: usize,
}

pub fn parse(route: Route, body: &[u8], limits: &TokenLimits, request_id: &str) -> Result<ValidRequest, ApiError> {
    let default_max_tokens = limits.default_max_tokens;
    // A body that reads is read once, without tracking the path; one that does not is read again
    // with the path tracked, to name where it went wrong.
    let b: Result<Body, serde_path_to_error::Error<serde_json::Error>> = serde_json::from_slice(body).or_else(|_| {
        let de = &mut serde_json::Deserializer::from_slice(body);
        serde_path_to_error::deserialize(de)
    });
    let b: Body = b.map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let text = inner.to_string();
        // "missing field `x`" and "unknown field `x`" name the field themselves.
        let param =
            if path == "." || path.is_empty() { text.split('`').nth(1).map(str::to_string) } else { Some(path) };
        if inner.is_syntax() || inner.is_eof() {
            ApiError::invalid(None, format!("the body is not valid JSON: {text}"))
        } else {
            ApiError::invalid(param, format!("invalid request body: {text}"))
        }
    })?;
    if b.model.is_empty() {
        return Err(invalid("model", "`model` must not be empty"));
    }
    let prompt = match route {
        Route::Chat => {
            if b.prompt.is_some() {
                return Err(invalid("prompt", "`prompt` belongs to /v1/completions; chat takes `messages`"));
            }
            Prompt::Messages(messages(b.messages.ok_or_else(|| invalid("messages", "`messages` is required"))?)?)
        }
        Route::Completions => {
            if b.messages.is_some() {
                return Err(invalid(
                    "messages",
                    "`messages` belongs to /v1/chat/completions; completions take `prompt`",
                ));
            }
            completion_prompt(b.prompt.ok_or_else(|| invalid("prompt", "`prompt` is required"))?)?
        }
    };
    if let Some(n) = b.n
        && n != 1
    {
        return Err(invalid("n", format!("`n` must be 1, got {n}")));
    }
    if b.best_of.is_some_and(|n| n != 1) {
        return Err(invalid("best_of", "`best_of` must be 1"));
    }
    if b.echo == Some(true) {
        return Err(invalid("echo", "`echo` is not supported"));
    }
    if b.suffix.is_some() {
        return Err(invalid("suffix", "`suffix` is not supported"));
    }
    if b.tools.as_ref().is_some_and(|t| !t.is_empty()) || b.tool_choice.as_ref().is_some_and(|t| t != "none") {
        return Err(invalid("tools", "tool calls are not supported"));
    }
    let _ = b.parallel_tool_calls;
    let _ = b.user;
    for (param, v) in [("presence_penalty", b.presence_penalty), ("frequency_penalty", b.frequency_penalty)] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(invalid(param, format!("`{param}` is not supported; use `repetition_penalty`")));
        }
    }
    if b.logit_bias.as_ref().is_some_and(|v| v.as_object().is_some_and(|o| !o.is_empty())) {
        return Err(invalid("logit_bias", "`logit_bias` is not supported"));
    }
    if let Some(rf) = &b.response_format {
        match rf.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some(t) => {
                return Err(invalid(
                    "response_format",
                    format!("`response_format` type `{t}` is not supported by this model; only `text`"),
                ));
            }
            None => return Err(invalid("response_format", "`response_format` needs a `type`")),
        }
    }
    let max_tokens = match (b.max_completion_tokens, b.max_tokens) {
        (Some(v), _) => ("max_completion_tokens", v),
        (None, Some(v)) => ("max_tokens", v),
        (None, None) => ("max_tokens", default_max_tokens as i64),
    };
    if max_tokens.1 < 1 {
        return Err(invalid(max_tokens.0, format!("`{}` must be at least 1, got {}", max_tokens.0, max_tokens.1)));
    }
    if limits.max_tokens > 0 && max_tokens.1 > limits.max_tokens as i64 {
        return Err(invalid(
            max_tokens.0,
            format!("`{}` is {}, above this server's limit of {}", max_tokens.0, max_tokens.1, limits.max_tokens),
        ));
    }
    let temperature = b.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(invalid("temperature", format!("`temperature` must be in [0, 2], got {temperature}")));
    }
    let top_p = b.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(invalid("top_p", format!("`top_p` must be in (0, 1], got {top_p}")));
    }
    let top_k = b.top_k.unwrap_or(0);
    if top_k < 0 {
        return Err(invalid("top_k", format!("`top_k` must be >= 0, got {top_k}")));
    }
    let min_p = b.min_p.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(invalid("min_p", format!("`min_p` must be in [0, 1], got {min_p}")));
    }
    let repetition_penalty = b.repetition_penalty.unwrap_or(1.0);
    if repetition_penalty <= 0.0 {
        return Err(invalid(
            "repetition_penalty",
            format!("`repetition_penalty` must be > 0, got {repetition_penalty}"),
        ));
    }
    let stop = stops(b.stop)?;
    // Chat: `logprobs: true` and `top_logprobs` in [0, 20]. Completions: `logprobs: N` in [0, 5]
    // asks for the sampled token and the N most likely.
    let (logprobs, top_logprobs) = match (route, &b.logprobs) {
        (_, None) | (_, Some(Value::Null)) => (false, 0),
        (Route::Chat, Some(Value::Bool(v))) => (*v, 0),
        (Route::Completions, Some(Value::Number(n))) => match n.as_i64() {
            Some(k @ 0..=5) => (true, k as usize),
            _ => return Err(invalid("logprobs", format!("`logprobs` must be an integer in [0, 5], got {n}"))),
        },
        (Route::Chat, Some(_)) => return Err(invalid("logprobs", "`logprobs` must be a boolean")),
        (Route::Completions, Some(_)) => return Err(invalid("logprobs", "`logprobs` must be an integer")),
    };
    let top_logprobs = match (route, b.top_logprobs) {
        (Route::Chat, Some(k)) if !(0..=MAX_TOP_LOGPROBS as i64).contains(&k) => {
            return Err(invalid("top_logprobs", format!("`top_logprobs` must be in [0, {MAX_TOP_LOGPROBS}], got {k}")));
        }
        (Route::Chat, Some(k)) if k > 0 && !logprobs => {
            return Err(invalid("top_logprobs", "`top_logprobs` needs `logprobs: true`"));
        }
        (Route::Chat, Some(k)) => k as usize,
        (Route::Completions, Some(_)) => return Err(invalid("top_logprobs", "completions take `logprobs: N` instead")),
        (_, None) => top_logprobs,
    };
    let stream = b.stream.unwrap_or(false);
    if b.stream_options.is_some() && !stream {
        return Err(invalid("stream_options", "`stream_options` is only allowed with `stream: true`"));
    }
    let include_usage = b.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
    let generate = GenerateRequest {
        id: request_id.to_string(),
        model: b.model.clone(),
        prompt,
        max_tokens: max_tokens.1 as usize,
        sampling: Sampling {
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k: top_k.min(i32::MAX as i64) as i32,
            min_p: min_p as f32,
            repetition_penalty: repetition_penalty as f32,
            seed: b.seed,
            ..Sampling::default()
        },
        stop,
        stop_token_ids: Vec::new(),
        ignore_eos: b.ignore_eos.unwrap_or(false),
        logprobs,
        top_logprobs,
        resume_tokens: Vec::new(),
    };
    let return_token_ids = b.return_token_ids.unwrap_or(false);
    Ok(ValidRequest { route, model: b.model, stream, include_usage, logprobs, return_token_ids, generate })
}

fn messages(list: Vec<MessageIn>) -> Result<Vec<Message>, ApiError> {
    if list.is_empty() {
        return Err(invalid("messages", "`messages` must not be empty"));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.into_iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant" | "tool") {
            return Err(invalid(&format!("messages[{i}].role"), format!("unknown role `{}`", m.role)));
        }
        let content = match m.content {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s,
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(invalid(
                                &format!("messages[{i}].content[{j}]"),
                                "only text content parts are supported",
                            ));
                        }
                    }
                }
                text
            }
            Some(_) => {
                return Err(invalid(
                    &format!("messages[{i}].content"),
                    "`content` must be a string or an array of text parts",
                ));
            }
        };
        let role = if m.role == "developer" { "system".to_string() } else { m.role };
        out.push(Message { role, content });
    }
    Ok(out)
}

fn completion_prompt(v: Value) -> Result<Prompt, ApiError> {
    let ids = |a: &[Value]| -> Option<Vec<u32>> {
        a.iter().map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok())).collect()
    };
    match &v {
        Value::String(s) => Ok(Prompt::Text(s.clone())),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            Ok(Prompt::Text(a[0].as_str().unwrap_or("").to_string()))
        }
        Value::Array(a) if a.len() == 1 && a[0].is_array() => ids(a[0].as_array().map_or(&[], Vec::as_slice))
            .map(Prompt::TokenIds)
            .ok_or_else(|| invalid("prompt", "token ids must be non-negative integers")),
        Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_number) => {
            ids(a).map(Prompt::TokenIds).ok_or_else(|| invalid("prompt", "token ids must be non-negative integers"))
        }
        Value::Array(a) if a.len() > 1 => {
            Err(invalid("prompt", format!("one prompt per request is supported, got {}", a.len())))
        }
        _ => Err(invalid("prompt", "`prompt` must be a string, an array of one string, or an array of token ids")),
    }
}

fn stops(v: Option<Value>) -> Result<Vec<String>, ApiError> {
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) => a
            .into_iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| invalid("stop", "`stop` must be a string or an array of strings"))?,
        Some(_) => return Err(invalid("stop", "`stop` must be a string or an array of strings")),
    };
    if list.len() > MAX_STOP {
        return Err(invalid("stop", format!("at most {MAX_STOP} stop strings, got {}", list.len())));
    }
    if list.iter().any(String::is_empty) {
        return Err(invalid("stop", "stop strings must not be empty"));
    }
    Ok(list)
}

pub fn finish_reason(r: mlx_serving_protocol::FinishReason) -> &'static str {
    match r {
        mlx_serving_protocol::FinishReason::Stop => "stop",
        mlx_serving_protocol::FinishReason::Length => "length",
        mlx_serving_protocol::FinishReason::Cancelled => "cancelled",
        mlx_serving_protocol::FinishReason::Error => "error",
    }
}

pub fn usage(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

/// Each reported token of `tokens` with its log-probability and its step's most likely tokens.
fn entries(tokens: &[TokenEvent]) -> impl Iterator<Item = (&TokenEvent, f32, &[TopLogprob])> {
    tokens.iter().flat_map(|t| {
        let lps = t.logprobs.as_deref().unwrap_or(&[]);
        lps.iter().enumerate().map(move |(i, lp)| {
            let top = t.top_logprobs.as_ref().and_then(|v| v.get(i)).map_or(&[][..], Vec::as_slice);
            (t, *lp, top)
        })
    })
}

/// Log-probabilities of streamed tokens, in the route's format. The token string is the text
/// the token completed (empty inside a multi-byte character).
pub fn logprobs(route: Route, tokens: &[TokenEvent]) -> Value {
    match route {
        Route::Chat => {
            let content: Vec<Value> = entries(tokens)
                .map(|(t, lp, top)| {
                    let top: Vec<Value> = top
                        .iter()
                        .map(|a| json!({"token": a.text, "logprob": a.logprob, "bytes": a.text.as_bytes()}))
                        .collect();
                    json!({"token": t.text, "logprob": lp, "bytes": t.text.as_bytes(), "top_logprobs": top})
                })
                .collect();
            json!({ "content": content })
        }
        Route::Completions => {
            let mut offset = 0;
            let (mut toks, mut lps, mut tops, mut offsets) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut any_top = false;
            for (t, lp, top) in entries(tokens) {
                toks.push(t.text.clone());
                lps.push(lp);
                offsets.push(offset);
                offset += t.text.len();
                any_top |= !top.is_empty();
                let map: serde_json::Map<String, Value> =
                    top.iter().map(|a| (a.text.clone(), json!(a.logprob))).collect();
                tops.push(Value::Object(map));
            }
            let tops = if any_top { json!(tops) } else { Value::Null };
            json!({"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(route: Route, body: &str) -> ApiError {
        parse(route, body.as_bytes(), &TokenLimits { default_max_tokens: 16, max_tokens: 1000 }, "r").unwrap_err()
    }

    #[test]
    fn each_violation_names_its_field() {
        let cases: &[(Route, &str, &str)] = &[
            (
                Route::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":"hot"}"#,
                "temperature",
            ),
            (
                Route::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":3}"#,
                "temperature",
            ),
            (Route::Chat, r#"{"messages":[{"role":"user","content":"hi"}]}"#, "model"),
            (Route::Chat, r#"{"model":"m"}"#, "messages"),
            (Route::Chat, r#"{"model":"m","messages":[]}"#, "messages"),
            (Route::Chat, r#"{"model":"m","messages":[{"role":"wizard","content":"hi"}]}"#, "messages[0].role"),
            (Route::Chat, r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"n":2}"#, "n"),
            (Route::Chat, r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":0}"#, "max_tokens"),
            (
                Route::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":-5}"#,
                "max_completion_tokens",
            ),
            (
                Route::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":1001}"#,
                "max_tokens",
            ),
            (Route::Chat, r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"top_p":0}"#, "top_p"),
            (Route::Chat, r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stop":[1]}"#, "stop"),
            (
                Route::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"response_format":{"type":"json_object"}}"#,
                "response_format",
            ),
            (
                Route::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"top_logprobs":3}"#,
                "top_logprobs",
            ),
            (
                Route::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"logprobs":true,"top_logprobs":21}"#,
                "top_logprobs",
            ),
            (Route::Chat, r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"frobnicate":1}"#, "frobnicate"),
            (
                Route::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream_options":{"include_usage":true}}"#,
                "stream_options",
            ),
            (Route::Completions, r#"{"model":"m","prompt":["a","b"]}"#, "prompt"),
            (Route::Completions, r#"{"model":"m","prompt":"a","logprobs":6}"#, "logprobs"),
            (Route::Completions, r#"{"model":"m","messages":[]}"#, "messages"),
        ];
        for (route, body, param) in cases {
            let e = err(*route, body);
            assert_eq!(e.param.as_deref(), Some(*param), "{body}: {e:?}");
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        }
        let e = err(Route::Chat, "{not json");
        assert!(e.message.contains("not valid JSON"), "{e:?}");
    }

    #[test]
    fn a_valid_request_maps_onto_the_worker_protocol() {
        let v = parse(
            Route::Chat,
            br#"{"model":"m","messages":[{"role":"developer","content":[{"type":"text","text":"be brief"}]},{"role":"user","content":"hi"}],
                 "max_completion_tokens":7,"temperature":0,"seed":3,"stop":"\n","stream":true,"stream_options":{"include_usage":true},"logprobs":true}"#,
            &TokenLimits { default_max_tokens: 16, max_tokens: 0 },
            "req-1",
        )
        .unwrap();
        assert!(v.stream && v.include_usage && v.logprobs);
        let g = v.generate;
        assert_eq!(g.id, "req-1");
        assert_eq!(g.max_tokens, 7);
        assert_eq!(g.sampling.temperature, 0.0);
        assert_eq!(g.sampling.seed, Some(3));
        assert_eq!(g.stop, ["\n"]);
        assert_eq!(
            g.prompt,
            Prompt::Messages(vec![
                Message { role: "system".into(), content: "be brief".into() },
                Message { role: "user".into(), content: "hi".into() }
            ])
        );
        let c = parse(
            Route::Completions,
            br#"{"model":"m","prompt":[1,2,3]}"#,
            &TokenLimits { default_max_tokens: 16, max_tokens: 0 },
            "r",
        )
        .unwrap();
        assert_eq!(c.generate.prompt, Prompt::TokenIds(vec![1, 2, 3]));
        assert_eq!(c.generate.max_tokens, 16);
    }
}
