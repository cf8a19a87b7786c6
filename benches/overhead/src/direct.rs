//! A worker called directly: JSON-RPC lines over its stdin and stdout, with blocking reads so the
//! time of each read is the time its bytes arrived.
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{Context, Result, bail};
use mlx_serving_protocol::GenerateRequest;
use serde::Serialize;
use serde_json::{Value, json};

use crate::clock::{Sample, now_ns};

pub struct Direct {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
    /// Bytes read but not yet split into lines.
    buf: Vec<u8>,
    /// When the latest read returned: every complete line in `buf` came with it.
    last_read: u64,
    next_id: u64,
}

/// A JSON-RPC request with its fields in the order jsonrpsee's client writes them.
#[derive(Serialize)]
struct Request<'a, P> {
    jsonrpc: &'static str,
    id: u64,
    method: &'a str,
    params: P,
}

impl Direct {
    /// Starts `command` (with the arguments the supervisor gives its workers), preloading the
    /// tap, and loads `model` under the name `name`.
    pub fn start(command: &[String], tap: &Path, tap_log: &Path, stderr: &Path, name: &str, model: &Path) -> Result<Direct> {
        let (program, args) = command.split_first().context("empty worker command")?;
        let mut child = Command::new(program)
            .args(args)
            .env("LD_PRELOAD", tap)
            .env("OVH_TAP_LOG", tap_log)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(stderr)?)
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut d = Direct { child, stdin: Some(stdin), stdout, buf: Vec::new(), last_read: 0, next_id: 0 };
        d.call("handshake", json!({}))?;
        d.call("load_model", json!({"model": name, "path": model.display().to_string()}))?;
        Ok(d)
    }

    fn send<P: Serialize>(&mut self, method: &str, params: P) -> Result<u64> {
        self.next_id += 1;
        let mut line = serde_json::to_vec(&Request { jsonrpc: "2.0", id: self.next_id, method, params })?;
        line.push(b'\n');
        self.stdin.as_mut().context("closed")?.write_all(&line)?;
        Ok(self.next_id)
    }

    /// The next complete line and the time of the read that completed it.
    fn next_line(&mut self) -> Result<(Value, u64)> {
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return Ok((serde_json::from_slice(&line).context("a worker line")?, self.last_read));
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = self.stdout.read(&mut chunk)?;
            self.last_read = now_ns();
            if n == 0 {
                bail!("the worker closed its stdout");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        let id = self.send(method, params)?;
        loop {
            let (msg, _) = self.next_line()?;
            if msg["id"].as_u64() == Some(id) {
                if let Some(e) = msg.get("error") {
                    bail!("{method}: {e}");
                }
                return Ok(msg["result"].clone());
            }
        }
    }

    pub fn generate(&mut self, request: &GenerateRequest) -> Result<Sample> {
        let mut sample = Sample::default();
        // Serialize first, so the time is taken just before the write.
        self.next_id += 1;
        let id = self.next_id;
        let mut line = serde_json::to_vec(&Request { jsonrpc: "2.0", id, method: "generate", params: json!({"request": request}) })?;
        line.push(b'\n');
        sample.sent = now_ns();
        self.stdin.as_mut().context("closed")?.write_all(&line)?;
        let mut subscription = None;
        loop {
            let (msg, at) = self.next_line()?;
            if msg["id"].as_u64() == Some(id) {
                if let Some(e) = msg.get("error") {
                    bail!("generate: {e}");
                }
                subscription = Some(msg["result"].clone());
                continue;
            }
            if msg["method"] != "generate_event" || subscription.as_ref() != Some(&msg["params"]["subscription"]) {
                continue;
            }
            let event = &msg["params"]["result"];
            match event["type"].as_str() {
                Some("token") => {
                    let n = event["token_ids"].as_array().map_or(0, Vec::len);
                    sample.tokens.extend(std::iter::repeat_n(at, n));
                }
                Some("final") => {
                    if event["finish_reason"] == "error" {
                        bail!("generate failed: {event}");
                    }
                    sample.done = at;
                    return Ok(sample);
                }
                _ => bail!("unexpected event {event}"),
            }
        }
    }

    /// Closes stdin (the worker exits at once) and waits for it.
    pub fn stop(mut self) -> Result<()> {
        drop(self.stdin.take());
        self.child.wait()?;
        Ok(())
    }
}
