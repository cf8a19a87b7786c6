//! `mlx-serving-bench` against the real `mlx-serving serve` (one worker, the bundled tiny model):
//! each workload runs to the end and its JSON report accounts for every request. No timings are
//! asserted: the machines are shared and slow.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BENCH: &str = env!("CARGO_BIN_EXE_mlx-serving-bench");

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/qwen3-bf16")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Server {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The status code of `GET path`, or None when the server does not answer.
fn get_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

fn serve() -> Server {
    // The server is built with the workspace (`cargo build --workspace --release --bins`) into the
    // same directory as this package's binary.
    let bin = Path::new(BENCH).with_file_name("mlx-serving");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace's binaries first (cargo build --workspace --release --bins)",
        bin.display()
    );
    let dir = std::env::temp_dir().join(format!("mlx-serving-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (port, admin) = (free_port(), free_port());
    let config = format!(
        "[pool]\nworkers = 1\n\n[http]\nlisten = \"127.0.0.1:{port}\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [[models]]\nname = \"m\"\npath = \"{}\"\npreload = true\n",
        model().display()
    );
    std::fs::write(dir.join("config.toml"), config).unwrap();
    let child = Command::new(&bin)
        .args(["serve", "--config"])
        .arg(dir.join("config.toml"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut server = Server { child, port, dir };
    let deadline = Instant::now() + Duration::from_secs(120);
    while get_status(port, "/ready") != Some(200) {
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("mlx-serving serve exited before it was ready: {status}");
        }
        assert!(Instant::now() < deadline, "mlx-serving serve was not ready within 120 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    server
}

fn bench(args: &[&str]) -> Output {
    Command::new(BENCH).args(args).stdin(Stdio::null()).output().unwrap()
}

/// Runs the bench with `args` plus the server's address and a JSON file; returns the report.
fn report(server: &Server, name: &str, args: &[&str]) -> Value {
    let json = server.dir.join(format!("{name}.json"));
    let url = format!("http://127.0.0.1:{}", server.port);
    let model = model();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--url", &url, "--model", "m", "--seed", "7", "--quiet", "--timeout-s", "300"]);
    all.extend(["--tokenizer", model.to_str().unwrap(), "--json", json.to_str().unwrap()]);
    let out = bench(&all);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{args:?} failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("ttft (ms)"), "no table on stdout: {stdout}");
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

fn assert_all_ok(r: &Value, n: u64) {
    assert_eq!(r["requests"]["sent"], n, "{r:#}");
    assert_eq!(r["requests"]["ok"], n, "{r:#}");
    assert_eq!(r["errors"]["count"], 0, "{r:#}");
    assert!(r["tokens"]["completion"].as_u64().unwrap() > 0, "{r:#}");
    assert!(r["tokens"]["prompt"].as_u64().unwrap() > 0, "{r:#}");
    assert_eq!(r["tokens"]["usage_reported"], n, "our server reports usage when streaming: {r:#}");
    assert!(r["throughput"]["output_tokens_per_s"].as_f64().unwrap() > 0.0, "{r:#}");
}

#[test]
fn every_workload_runs_against_the_real_server_and_accounts_for_each_request() {
    let server = serve();

    let r = report(
        &server,
        "run",
        &["run", "--concurrency", "4", "--requests", "8", "--prompt-len", "uniform:8-32", "--max-tokens", "fixed:8"],
    );
    assert_eq!(r["workload"], "run");
    assert_all_ok(&r, 8);
    assert_eq!(r["latency_ms"]["ttft"]["count"], 8, "{r:#}");
    assert_eq!(r["latency_ms"]["e2e"]["count"], 8, "{r:#}");
    assert_eq!(r["settings"]["seed"], 7);
    assert!(r["duplicates"].is_null(), "distinct prompts make no duplicate groups: {r:#}");
    let prompt = r["tokens"]["prompt_per_request"]["max"].as_f64().unwrap();
    assert!(prompt <= 40.0, "prompts of at most 32 tokens (plus a few for the chat-free route): {prompt}");

    let r = report(
        &server,
        "duplicates",
        &["duplicates", "--copies", "6", "--prompt-len", "fixed:16", "--max-tokens", "fixed:8"],
    );
    assert_all_ok(&r, 6);
    assert_eq!(r["duplicates"]["groups"], 1, "{r:#}");
    assert_eq!(r["duplicates"]["requests"], 6, "{r:#}");
    assert!(r["duplicates"]["all_identical"].is_boolean(), "{r:#}");

    let r = report(
        &server,
        "chat",
        &["chat", "--conversations", "2", "--turns", "2", "--prompt-len", "fixed:8", "--max-tokens", "fixed:4"],
    );
    assert_all_ok(&r, 4);
    let turns = r["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 2, "{r:#}");
    assert!(turns.iter().all(|t| t["ok"] == 2 && t["cached_tokens_mean"].is_number()), "{r:#}");
    let (first, second) =
        (turns[0]["prompt_tokens_mean"].as_f64().unwrap(), turns[1]["prompt_tokens_mean"].as_f64().unwrap());
    assert!(second > first, "the second turn carries the first: {first} then {second}");

    let r = report(
        &server,
        "poisson",
        &["run", "--rate", "20", "--requests", "4", "--max-tokens", "fixed:4", "--no-stream"],
    );
    assert_eq!(r["requests"]["ok"], 4, "{r:#}");
    assert!(r["latency_ms"]["ttft"].is_null(), "no time to first token without streaming: {r:#}");
}

#[test]
fn bad_options_are_refused_by_name_before_anything_is_sent() {
    for (args, needle) in [
        (&["run", "--model", "m", "--concurrency", "0"][..], "--concurrency must be at least 1"),
        (&["run", "--model", "m", "--prompt-len", "uniform:9-3"], "minimum 9 is above the maximum 3"),
        (&["run", "--model", "m", "--max-tokens", "zipf:2"], "unknown distribution `zipf`"),
        (&["run", "--model", "m", "--rate", "0"], "--rate must be a positive number"),
        (&["run", "--model", "m", "--duplicates", "1.5"], "--duplicates must be a share between 0 and 1"),
        (&["run", "--model", "m", "--url", "https://localhost:1"], "only http is supported"),
        (&["run", "--model", "m", "--temperature", "3"], "--temperature must be in [0, 2]"),
        (&["duplicates", "--model", "m", "--copies", "1"], "--copies"),
        (&["chat", "--model", "m", "--tokenizer", "/nonexistent/dir"], "/nonexistent/dir"),
        (&["run"], "--model"),
    ] {
        let out = bench(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(needle), "{args:?}: expected `{needle}` in: {stderr}");
    }
    // Nothing listening: a clear error at once, not a run full of failures.
    let port = free_port().to_string();
    let url = format!("http://127.0.0.1:{port}");
    let out = bench(&["run", "--model", "m", "--url", &url]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("cannot connect to"), "{stderr}");
}
