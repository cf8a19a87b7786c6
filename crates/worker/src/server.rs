//! Serving the protocol on stdin/stdout: one task reads lines, each request runs in a task of
//! its own, and one writer task owns stdout, so lines never interleave.
use std::sync::Arc;

use jsonrpsee::RpcModule;
use mlx_serving_protocol::ErrorCode;
use mlx_serving_protocol::framing::{LineError, LineReader};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

/// Notifications buffered per subscription before the sender waits for the writer.
const SUBSCRIPTION_BUFFER: usize = 1024;

/// Writes each line from `lines` to `out`, flushing whenever no more lines are waiting. Ends
/// when every sender is gone or `out` fails.
pub async fn write_lines<W: AsyncWrite + Unpin>(mut lines: mpsc::Receiver<String>, out: W) {
    let mut out = BufWriter::new(out);
    while let Some(line) = lines.recv().await {
        let mut batch = Some(line);
        while let Some(line) = batch {
            if out.write_all(line.as_bytes()).await.is_err() || out.write_all(b"\n").await.is_err() {
                return;
            }
            batch = lines.try_recv().ok();
        }
        if out.flush().await.is_err() {
            return;
        }
    }
    let _ = out.flush().await;
}

/// Reads requests from `input` until it ends, running each in a task on `tracker`. Returns at
/// end of input (or when it fails).
pub async fn read_requests<R: AsyncRead + Unpin, C: Send + Sync + 'static>(
    input: R,
    max_line_bytes: usize,
    module: Arc<RpcModule<C>>,
    out: mpsc::Sender<String>,
    tracker: TaskTracker,
) {
    let mut reader = LineReader::new(input, max_line_bytes);
    loop {
        match reader.next_line().await {
            Ok(Some(line)) => {
                if line.trim().is_empty() {
                    continue;
                }
                let (module, out) = (module.clone(), out.clone());
                tracker.spawn(async move { handle_line(&module, &line, &out).await });
            }
            Ok(None) => return,
            Err(e) if e.is_recoverable() => {
                tracing::warn!(error = %e, "refused an input line");
                let _ = out.send(error_response(&Value::Null, ErrorCode::InvalidRequest, &e.to_string())).await;
            }
            Err(e @ LineError::Truncated(_)) => {
                tracing::warn!(error = %e, "input ended inside a line");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "reading stdin failed");
                return;
            }
        }
    }
}

/// Answers one line: checks the envelope (jsonrpsee cannot answer batches and notifications
/// itself), runs the method, then forwards the subscription's notifications until it ends.
async fn handle_line<C: Send + Sync + 'static>(module: &RpcModule<C>, line: &str, out: &mpsc::Sender<String>) {
    let value: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            let _ = out.send(error_response(&Value::Null, ErrorCode::ParseError, &format!("parse error: {e}"))).await;
            return;
        }
    };
    let refuse =
        |message: &str| error_response(value.get("id").unwrap_or(&Value::Null), ErrorCode::InvalidRequest, message);
    let problem = match &value {
        Value::Array(_) => Some("batch requests are not supported: send one request per line"),
        Value::Object(o) if !o.contains_key("id") => {
            Some("notifications are not supported: every request needs an `id`")
        }
        Value::Object(_) => None,
        _ => Some("a request must be a JSON object"),
    };
    if let Some(message) = problem {
        let _ = out.send(refuse(message)).await;
        return;
    }
    let (response, mut notifications) = match module.raw_json_request(line, SUBSCRIPTION_BUFFER).await {
        Ok(r) => r,
        Err(e) => {
            let _ = out.send(refuse(&format!("invalid request: {e}"))).await;
            return;
        }
    };
    if out.send(response.get().to_string()).await.is_err() {
        return;
    }
    while let Some(n) = notifications.recv().await {
        if out.send(n.get().to_string()).await.is_err() {
            return;
        }
    }
}

fn error_response(id: &Value, code: ErrorCode, message: &str) -> String {
    serde_json::json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": { "code": code.code(), "message": message },
    })
    .to_string()
}
