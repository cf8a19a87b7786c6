//! A small HTTP client for the chaos runs: one greedy SSE stream per call, read to its end.
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// How one request ended.
#[derive(Debug)]
pub enum Outcome {
    /// The stream ended with `[DONE]`; its token ids.
    Ok(Vec<u32>),
    /// An error the server named (an HTTP error body or an SSE error event).
    TypedError(String),
    /// Neither: the connection broke, the stream stopped without `[DONE]`, or it timed out.
    Lost(String),
}

/// The longest a request may take before it counts as lost.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

async fn send(port: u16, req: hyper::Request<Full<Bytes>>) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    sender.send_request(req).await.map_err(|e| e.to_string())
}

pub async fn get(port: u16, path: &str) -> Result<u16, String> {
    let req = hyper::Request::get(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    Ok(send(port, req).await?.status().as_u16())
}

/// A greedy completion streamed with SSE; the tokens it delivered.
pub async fn stream(port: u16, id: &str, prompt: &str, max_tokens: usize) -> Outcome {
    stream_prompt(port, id, prompt.into(), max_tokens).await
}

/// The same with the prompt as the API takes it (a string or token ids).
pub async fn stream_prompt(port: u16, id: &str, prompt: Value, max_tokens: usize) -> Outcome {
    match tokio::time::timeout(REQUEST_TIMEOUT, stream_inner(port, id, prompt, max_tokens)).await {
        Ok(o) => o,
        Err(_) => Outcome::Lost(format!("no end within {REQUEST_TIMEOUT:?}")),
    }
}

async fn stream_inner(port: u16, id: &str, prompt: Value, max_tokens: usize) -> Outcome {
    let body = json!({
        "model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": true,
        "ignore_eos": true, "return_token_ids": true,
    });
    let req = match hyper::Request::post("/v1/completions")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .header("x-request-id", id)
        .body(Full::new(Bytes::from(body.to_string())))
    {
        Ok(r) => r,
        Err(e) => return Outcome::Lost(e.to_string()),
    };
    let response = match send(port, req).await {
        Ok(r) => r,
        Err(e) => return Outcome::Lost(e),
    };
    let status = response.status();
    let mut body = response.into_body();
    if !status.is_success() {
        let bytes = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return Outcome::Lost(format!("HTTP {status}, body unreadable: {e}")),
        };
        return match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) if v.get("error").is_some() => {
                Outcome::TypedError(format!("HTTP {status}: {}", v["error"]["message"]))
            }
            _ => Outcome::Lost(format!("HTTP {status} without an error body")),
        };
    }
    let (mut tokens, mut pending) = (Vec::new(), String::new());
    loop {
        let frame = match body.frame().await {
            Some(Ok(f)) => f,
            Some(Err(e)) => return Outcome::Lost(format!("the stream broke after {} tokens: {e}", tokens.len())),
            None => return Outcome::Lost(format!("the stream ended without [DONE] after {} tokens", tokens.len())),
        };
        let Ok(data) = frame.into_data() else { continue };
        pending.push_str(&String::from_utf8_lossy(&data));
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            let Some(payload) = line.trim().strip_prefix("data: ") else { continue };
            if payload == "[DONE]" {
                return Outcome::Ok(tokens);
            }
            let Ok(v) = serde_json::from_str::<Value>(payload) else {
                return Outcome::Lost(format!("not JSON in the stream: {payload}"));
            };
            if let Some(e) = v.get("error") {
                return Outcome::TypedError(format!("in stream after {} tokens: {}", tokens.len(), e["message"]));
            }
            if let Some(ids) = v["choices"][0]["token_ids"].as_array() {
                tokens.extend(ids.iter().filter_map(|x| x.as_u64().map(|n| n as u32)));
            }
        }
    }
}
