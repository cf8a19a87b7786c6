//! Drives the real worker binary over its pipes: as a jsonrpsee client (the way a supervisor
//! does) or line by line (to send what no well-behaved client would).
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use jsonrpsee::core::client::{Client, ClientBuilder, Subscription};
use mlx_serving_protocol::framing::{LineReader, PipeReceiver, PipeSender, write_line};
use mlx_serving_protocol::{FinalEvent, GenerateEvent, GenerateRequest, Prompt, WorkerRpcClient};
use serde_json::Value;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// Every test body runs under this bound, so a hang fails instead of stalling CI.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(180);

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

pub const MODEL: &str = "qwen3-bf16";

fn command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mlx-serving-worker"));
    c.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    c
}

/// A worker with a jsonrpsee client on its pipes.
pub struct Connected {
    pub child: Child,
    pub client: Client,
}

/// Starts a worker with `args` and connects a client to it.
pub fn connect(args: &[&str]) -> Connected {
    let mut child = command(args).spawn().expect("start mlx-serving-worker");
    let stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let client = ClientBuilder::default()
        .request_timeout(Duration::from_secs(120))
        .max_buffer_capacity_per_subscription(16 * 1024)
        .build_with_tokio(PipeSender(stdin), PipeReceiver(LineReader::new(stdout, 64 << 20)));
    Connected { child, client }
}

/// Starts a worker with the fixture model loaded under the name `m`.
pub async fn with_model(extra: &[&str]) -> Connected {
    let w = connect(extra);
    w.client.load_model("m".into(), model_dir(MODEL).display().to_string()).await.expect("load_model");
    w
}

pub fn request(id: &str, prompt: Prompt, max_tokens: usize) -> GenerateRequest {
    GenerateRequest { ignore_eos: true, ..GenerateRequest::new(id, "m", prompt, max_tokens) }
}

/// What one stream delivered.
#[derive(Debug)]
pub struct Streamed {
    pub tokens: Vec<u32>,
    pub text: String,
    pub last: FinalEvent,
}

/// Reads a stream to its final event.
pub async fn collect(mut sub: Subscription<GenerateEvent>) -> Streamed {
    collect_from(&mut sub).await
}

/// Reads a stream to its final event and leaves the subscription open: dropping it makes the
/// client send an unsubscribe, and a client whose write fails (the worker has exited) ends all
/// its other subscriptions, including finals it has read but not yet delivered.
pub async fn collect_from(sub: &mut Subscription<GenerateEvent>) -> Streamed {
    let mut tokens = Vec::new();
    let mut text = String::new();
    while let Some(event) = sub.next().await {
        match event.expect("a well-formed event") {
            GenerateEvent::Token(t) => {
                tokens.extend(t.token_ids);
                text.push_str(&t.text);
            }
            GenerateEvent::Final(f) => {
                text.push_str(&f.text);
                return Streamed { tokens, text, last: f };
            }
        }
    }
    panic!("the stream ended without a final event");
}

/// A worker driven line by line.
pub struct Raw {
    pub child: Child,
    stdin: ChildStdin,
    lines: LineReader<ChildStdout>,
}

impl Raw {
    pub fn start(args: &[&str]) -> Raw {
        let mut child = command(args).spawn().expect("start mlx-serving-worker");
        let stdin = child.stdin.take().unwrap();
        let lines = LineReader::new(child.stdout.take().unwrap(), 64 << 20);
        Raw { child, stdin, lines }
    }

    pub async fn send(&mut self, line: &str) {
        write_line(&mut self.stdin, line).await.expect("write to the worker");
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.stdin.write_all(bytes).await.expect("write to the worker");
        self.stdin.flush().await.unwrap();
    }

    /// Closes the worker's stdin, as a dying parent does, and hands back the process.
    pub fn close_stdin(self) -> Child {
        drop(self.stdin);
        self.child
    }

    /// The next line that is not a heartbeat, parsed.
    pub async fn recv(&mut self) -> Value {
        loop {
            let line = self.lines.next_line().await.expect("a line").expect("the worker closed stdout");
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {line}"));
            if v["method"] != "heartbeat" {
                return v;
            }
        }
    }

    /// Sends a request and returns its response (notifications of other streams are skipped).
    pub async fn call(&mut self, id: u64, method: &str, params: Value) -> Value {
        let req = serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.send(&req.to_string()).await;
        self.response(id).await
    }

    pub async fn response(&mut self, id: u64) -> Value {
        loop {
            let v = self.recv().await;
            if v["id"] == id {
                return v;
            }
        }
    }
}
