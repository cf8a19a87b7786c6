//! Bad input never crashes the worker: each case gets a JSON-RPC error naming the problem, and
//! the next valid request works.
mod common;

use common::*;
use serde_json::{Value, json};

async fn start() -> Raw {
    let mut raw = Raw::start(&[
        "--model",
        model_dir(MODEL).to_str().unwrap(),
        "--model-name",
        "m",
        "--max-line-bytes",
        "1048576",
    ]);
    assert!(raw.call(0, "handshake", json!({})).await["result"].is_object());
    raw
}

/// The worker still answers properly.
async fn still_works(raw: &mut Raw, id: u64) {
    let r = raw.call(id, "handshake", json!({})).await;
    assert_eq!(r["result"]["protocol_version"], "1.0", "{r}");
}

fn error_of(v: &Value) -> (i64, String) {
    let e = &v["error"];
    assert!(e.is_object(), "expected an error response, got {v}");
    (e["code"].as_i64().unwrap(), format!("{} {}", e["message"].as_str().unwrap_or(""), e["data"]))
}

fn generate(id: &str, model: &str, extra: Value) -> Value {
    let mut req = json!({"id": id, "model": model, "prompt": {"text": "Hello"}, "max_tokens": 4});
    for (k, v) in extra.as_object().unwrap() {
        req[k] = v.clone();
    }
    json!({ "request": req })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_lines_get_errors_and_the_next_request_works() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut raw = start().await;
        let cases: [(&str, i64, &str); 6] = [
            ("{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": ", -32700, "parse error"),
            ("not json at all", -32700, "parse error"),
            ("[{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"stats\"}]", -32600, "batch"),
            ("{\"jsonrpc\": \"2.0\", \"method\": \"stats\"}", -32600, "id"),
            ("42", -32600, "object"),
            ("{\"jsonrpc\": \"1.0\", \"id\": 9, \"method\": \"stats\"}", -32600, "invalid request"),
        ];
        for (n, (line, code, says)) in cases.into_iter().enumerate() {
            raw.send(line).await;
            let (got, message) = error_of(&raw.recv().await);
            assert_eq!(got, code, "{line}: {message}");
            assert!(message.contains(says), "{line}: {message}");
            still_works(&mut raw, 100 + n as u64).await;
        }
        // Invalid UTF-8.
        raw.send_bytes(b"{\"id\": \xff\xfe}\n").await;
        let (code, message) = error_of(&raw.recv().await);
        assert_eq!(code, -32600);
        assert!(message.contains("UTF-8"), "{message}");
        still_works(&mut raw, 200).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_megabyte_line_is_refused_by_the_line_limit() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut raw = start().await;
        let huge = format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"stats\",\"params\":{{\"pad\":\"{}\"}}}}",
            "x".repeat(10 << 20)
        );
        raw.send(&huge).await;
        let (code, message) = error_of(&raw.recv().await);
        assert_eq!(code, -32600);
        assert!(message.contains("1048576"), "the error names the limit: {message}");
        still_works(&mut raw, 6).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_types_and_unknown_methods_get_errors() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut raw = start().await;
        let r = raw.call(1, "no_such_method", json!({})).await;
        assert_eq!(error_of(&r).0, -32601);

        let r = raw.call(2, "load_model", json!({"model": 5, "path": "/x"})).await;
        let (code, message) = error_of(&r);
        assert_eq!(code, -32602);
        assert!(message.contains("invalid type"), "{message}");

        let r = raw.call(3, "generate", generate("a", "m", json!({"max_tokens": "many"}))).await;
        let (code, message) = error_of(&r);
        assert_eq!(code, -32602);
        assert!(message.contains("invalid type"), "{message}");

        let r = raw.call(4, "generate", generate("a", "m", json!({"temprature": 0.5}))).await;
        let (code, message) = error_of(&r);
        assert_eq!(code, -32602);
        assert!(message.contains("temprature"), "the unknown field is named: {message}");

        let r = raw.call(5, "cancel", json!({})).await;
        let (code, message) = error_of(&r);
        assert_eq!(code, -32602);
        assert!(message.contains("id"), "{message}");
        still_works(&mut raw, 6).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_the_worker_refuses_get_typed_errors() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut raw = start().await;
        let r = raw.call(1, "generate", generate("a", "nope", json!({}))).await;
        let (code, message) = error_of(&r);
        assert_eq!(code, 1001, "{message}");
        assert!(message.contains("`nope` is not loaded"), "{message}");

        let bad: [(Value, &str); 6] = [
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"max_tokens": 5000}), "context"),
            (json!({"sampling": {"temperature": -1.0}}), "temperature"),
            (json!({"sampling": {"top_p": 0.0}}), "top_p"),
            (json!({"prompt": {"text": ""}}), "empty"),
            (json!({"prompt": {"token_ids": [5, 999999]}}), "999999"),
        ];
        for (n, (extra, says)) in bad.into_iter().enumerate() {
            let r = raw.call(10 + n as u64, "generate", generate("a", "m", extra.clone())).await;
            let (code, message) = error_of(&r);
            assert_eq!(code, 1003, "{extra}: {message}");
            assert!(message.contains(says), "{extra}: {message}");
        }

        let r = raw.call(20, "load_model", json!({"model": "x", "path": "/no/such/dir"})).await;
        let (code, message) = error_of(&r);
        assert_eq!(code, 1002);
        assert!(message.contains("/no/such/dir"), "{message}");

        // After all that, a generation works.
        let r = raw.call(21, "generate", generate("ok", "m", json!({}))).await;
        assert!(r["result"].is_u64(), "{r}");
        loop {
            let v = raw.recv().await;
            if v["params"]["result"]["type"] == "final" {
                assert_eq!(v["params"]["result"]["finish_reason"], "length", "{v}");
                break;
            }
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_with_overloaded_and_a_duplicate_id_is_refused() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut raw = Raw::start(&[
            "--model",
            model_dir(MODEL).to_str().unwrap(),
            "--model-name",
            "m",
            "--max-sequences",
            "1",
            "--max-queue",
            "1",
        ]);
        let long = json!({"max_tokens": 1000, "ignore_eos": true});
        assert!(raw.call(1, "generate", generate("run", "m", long.clone())).await["result"].is_u64());
        let r = raw.call(2, "generate", generate("run", "m", long.clone())).await;
        let (code, message) = error_of(&r);
        assert_eq!(code, 1003);
        assert!(message.contains("already in use"), "{message}");
        assert!(raw.call(3, "generate", generate("queued", "m", long.clone())).await["result"].is_u64());
        let r = raw.call(4, "generate", generate("refused", "m", long.clone())).await;
        let (code, message) = error_of(&r);
        assert_eq!(code, 1004, "{message}");
        assert!(message.contains("queue is full"), "{message}");
        // A queued request can be cancelled before it runs.
        assert_eq!(raw.call(5, "cancel", json!({"id": "queued"})).await["result"], true);
        let stats = raw.call(6, "stats", json!({})).await;
        assert_eq!(stats["result"]["queue_depth"], 0, "{stats}");
        assert_eq!(stats["result"]["active_sequences"], 1, "{stats}");
        assert_eq!(stats["result"]["requests"]["rejected"], 2, "{stats}");
    })
    .await
    .expect("test timed out");
}

/// A flag given a value outside its range stops the worker at start with an error naming the
/// flag (clap's exit status 2), before it loads anything.
#[test]
fn flags_out_of_range_are_refused_by_name() {
    for arg in [
        "--prefill-row-padding=-1",
        "--prefill-row-padding=nan",
        "--prefill-chunk-idle=0",
        "--prefill-chunk=0",
        "--prefill-stall-ms=1001",
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mlx-serving-worker")).arg(arg).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let flag = arg.split('=').next().unwrap();
        assert_eq!(out.status.code(), Some(2), "{arg}: {err}");
        assert!(err.contains(flag), "{arg}: {err}");
    }
}
