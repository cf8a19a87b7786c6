//! A worker called directly: JSON-RPC lines over its stdin and stdout, with blocking reads so the
//! time of each read is the time its bytes arrived. Or the same lines through the bare relay
//! (relay.rs): a TCP connection to a process that copies them to and from the worker's pipes.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};
use mlx_serving_protocol::GenerateRequest;
use serde::Serialize;
use serde_json::{Value, json};

use crate::clock::{Sample, now_ns};

pub struct Direct {
    child: Child,
    /// The relay process, when the lines go through it.
    relay: Option<Child>,
    /// The worker's stdin, or the connection to the relay.
    stdin: Option<Box<dyn Write>>,
    /// The worker's stdout, or the connection to the relay.
    stdout: Box<dyn Read>,
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
    /// tap, behind the relay if `relay`, and loads `model` under the name `name`.
    pub fn start(
        command: &[String],
        tap: &Path,
        tap_log: &Path,
        stderr: &Path,
        name: &str,
        model: &Path,
        relay: bool,
    ) -> Result<Direct> {
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
        let (stdin, stdout, relay): (Box<dyn Write>, Box<dyn Read>, _) = if relay {
            // The relay gets the worker's pipes as its stdin and stdout, and says on stderr which
            // port it listens on.
            let mut process = Command::new(std::env::current_exe()?)
                .args(["--worker", "-", "--serve", "-", "--model", "-", "--tap", "-", "--relay-child"])
                .stdin(Stdio::from(stdout))
                .stdout(Stdio::from(stdin))
                .stderr(Stdio::piped())
                .spawn()
                .context("starting the relay")?;
            let mut port = String::new();
            BufReader::new(process.stderr.take().context("no relay stderr")?).read_line(&mut port)?;
            let port: u16 = port.trim().parse().with_context(|| format!("the relay's port: {port:?}"))?;
            let socket = TcpStream::connect(("127.0.0.1", port))?;
            socket.set_nodelay(true)?;
            (Box::new(socket.try_clone()?), Box::new(socket), Some(process))
        } else {
            (Box::new(stdin), Box::new(stdout), None)
        };
        let mut d = Direct { child, relay, stdin: Some(stdin), stdout, buf: Vec::new(), last_read: 0, next_id: 0 };
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
        let mut line = serde_json::to_vec(&Request {
            jsonrpc: "2.0",
            id,
            method: "generate",
            params: json!({"request": request}),
        })?;
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

    /// Closes stdin (the relay, then the worker, exit at once) and waits for them.
    pub fn stop(mut self) -> Result<()> {
        drop(self.stdin.take());
        // Both ends of the connection to the relay must close for it to see the end.
        self.stdout = Box::new(std::io::empty());
        if let Some(mut relay) = self.relay.take() {
            relay.wait()?;
        }
        self.child.wait()?;
        Ok(())
    }
}
