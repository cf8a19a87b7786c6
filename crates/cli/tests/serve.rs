//! `mlx-serving serve` and `mlx-serving admin` as processes: the admin API, its bad input, and
//! what happens to the workers when the supervisor goes away.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mlx_serving_supervisor::admin::{Listen, call};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

const TOKEN: &str = "s3cret";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn worker_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mlx-serving")).with_file_name("mlx-serving-worker")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Supervisor {
    child: Child,
    listen: Listen,
    dir: PathBuf,
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write_config(tag: &str, admin: &str, extra: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mlx-serving-cli-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = format!(
        r#"
[pool]
workers = 2
worker_command = ["{worker}"]
heartbeat_interval_ms = 100
heartbeat_timeout_ms = 2000
drain_deadline_ms = 5000
{extra}

[admin]
{admin}

[http]
listen = "127.0.0.1:{http}"

[[models]]
name = "m"
path = "{m}"
preload = true

[[models]]
name = "m2"
path = "{m2}"
"#,
        worker = worker_bin().display(),
        http = free_port(),
        m = fixtures().join("models/qwen3-bf16").display(),
        m2 = fixtures().join("models/llama-bf16").display(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, config).unwrap();
    dir
}

fn serve(tag: &str) -> Supervisor {
    let port = free_port();
    let dir = write_config(tag, &format!("listen = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\""), "");
    let child = Command::new(env!("CARGO_BIN_EXE_mlx-serving"))
        .args(["serve", "--config"])
        .arg(dir.join("config.toml"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    Supervisor { child, listen: Listen::parse(&format!("127.0.0.1:{port}")).unwrap(), dir }
}

async fn admin(s: &Supervisor, method: &str, params: Value) -> Result<Value, Value> {
    call(&s.listen, Some(TOKEN), method, params).await
}

/// Waits until `n` workers are ready; returns their pids.
async fn ready(s: &Supervisor, n: usize) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(status) = admin(s, "status", json!({})).await
            && status["ready_workers"].as_u64() == Some(n as u64)
        {
            return status["workers"].as_array().unwrap().iter().map(|w| w["pid"].as_i64().unwrap() as i32).collect();
        }
        assert!(Instant::now() < deadline, "the supervisor did not get {n} ready workers");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Alive and not a zombie.
fn alive(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => !cfg!(target_os = "linux"),
    }
}

fn addr(listen: &Listen) -> String {
    match listen {
        Listen::Tcp(a) => a.to_string(),
        Listen::Unix(p) => format!("unix:{}", p.display()),
    }
}

fn code(e: &Value) -> i64 {
    e["code"].as_i64().unwrap_or_else(|| panic!("no code in {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_answers_and_refuses_bad_input_by_name() {
    tokio::time::timeout(Duration::from_secs(180), async {
        let s = serve("admin");
        ready(&s, 2).await;

        // Auth.
        let e = call(&s.listen, None, "status", json!({})).await.unwrap_err();
        assert_eq!(code(&e), 2004, "{e}");
        assert!(e["message"].as_str().unwrap().contains("missing bearer token"));
        let e = call(&s.listen, Some("wrong"), "status", json!({})).await.unwrap_err();
        assert_eq!(code(&e), 2004, "{e}");
        assert!(e["message"].as_str().unwrap().contains("wrong bearer token"));

        // Bad input names the problem.
        let e = admin(&s, "drain", json!({"worker": 99})).await.unwrap_err();
        assert_eq!(code(&e), 2001, "{e}");
        assert!(e["message"].as_str().unwrap().contains("no worker with id 99"));
        let e = admin(&s, "scale", json!({"workers": -1})).await.unwrap_err();
        assert_eq!(code(&e), -32602, "{e}");
        assert!(
            e["message"].as_str().unwrap().contains("`scale`") && e["message"].as_str().unwrap().contains("-1"),
            "{e}"
        );
        let e = admin(&s, "prefetch", json!({"model": "nope"})).await.unwrap_err();
        assert_eq!(code(&e), 2002, "{e}");
        assert!(e["message"].as_str().unwrap().contains("`nope` is not configured"));
        let e = admin(&s, "drain", json!({"wroker": 1})).await.unwrap_err();
        assert!(e["message"].as_str().unwrap().contains("wroker"), "{e}");
        let e = admin(&s, "no_such", json!({})).await.unwrap_err();
        assert_eq!(code(&e), -32601, "{e}");

        // Operations.
        assert_eq!(admin(&s, "drain", json!({"worker": 0})).await.unwrap()["draining"], true);
        assert_eq!(admin(&s, "status", json!({})).await.unwrap()["workers"][0]["state"], "draining");
        admin(&s, "undrain", json!({"worker": 0})).await.unwrap();
        assert_eq!(admin(&s, "prefetch", json!({"model": "m2", "workers": [1]})).await.unwrap()["workers"], json!([1]));
        let status = admin(&s, "status", json!({})).await.unwrap();
        let names: Vec<&str> =
            status["workers"][1]["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["m", "m2"]);

        // Reloading the configuration applies a new worker count; a broken file is refused.
        let path = s.dir.join("config.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("workers = 2", "workers = 3")).unwrap();
        assert_eq!(admin(&s, "reload_config", json!({})).await.unwrap()["workers"], 3);
        std::fs::write(&path, text.replace("workers = 2", "workers = 2\nbogus = 1")).unwrap();
        let e = admin(&s, "reload_config", json!({})).await.unwrap_err();
        assert_eq!(code(&e), 2005, "{e}");
        assert!(e["message"].as_str().unwrap().contains("bogus"), "{e}");
        std::fs::write(&path, &text).unwrap();
        kill(Pid::from_raw(s.child.id() as i32), Signal::SIGHUP).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while admin(&s, "status", json!({})).await.unwrap()["workers"].as_array().unwrap().len() != 2 {
            assert!(Instant::now() < deadline, "SIGHUP did not reload the configuration");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ready(&s, 2).await;

        // The CLI prints the same for people.
        let out = Command::new(env!("CARGO_BIN_EXE_mlx-serving"))
            .args(["admin", "--addr", &addr(&s.listen)])
            .args(["--token", TOKEN, "status"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("2 ready of 2 target") && text.contains("m,m2"), "{text}");
        // A reader that has gone (`admin status | head -1`) ends the output quietly.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_mlx-serving"))
            .args(["admin", "--addr", &addr(&s.listen)])
            .args(["--token", TOKEN, "status"])
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
        // Without --addr and MLX_SERVING_ADMIN, the client finds the server at the address the
        // server takes from the environment.
        let out = Command::new(env!("CARGO_BIN_EXE_mlx-serving"))
            .args(["admin", "--token", TOKEN, "status"])
            .env_remove("MLX_SERVING_ADMIN")
            .env("MLX_SERVING_ADMIN_LISTEN", addr(&s.listen))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("2 ready of 2 target"), "{text}");
        let out = Command::new(env!("CARGO_BIN_EXE_mlx-serving"))
            .args(["admin", "--addr", &addr(&s.listen)])
            .args(["--token", TOKEN, "scale", "-3"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("-32602"), "{}", String::from_utf8_lossy(&out.stderr));
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_supervisor_leaves_no_worker_alive() {
    tokio::time::timeout(Duration::from_secs(180), async {
        let mut s = serve("kill");
        let pids = ready(&s, 2).await;
        assert!(pids.iter().all(|&p| alive(p)));
        s.child.kill().unwrap(); // SIGKILL
        s.child.wait().unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let left: Vec<i32> = pids.into_iter().filter(|&p| alive(p)).collect();
        assert!(left.is_empty(), "workers still alive 2 s after the supervisor died: {left:?}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_workers_and_exits_zero() {
    tokio::time::timeout(Duration::from_secs(180), async {
        let mut s = serve("term");
        let pids = ready(&s, 2).await;
        kill(Pid::from_raw(s.child.id() as i32), Signal::SIGTERM).unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(status) = s.child.try_wait().unwrap() {
                break status;
            }
            assert!(start.elapsed() < Duration::from_secs(15), "the supervisor did not exit after SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(status.success(), "{status}");
        assert!(pids.iter().all(|&p| !alive(p)), "workers left behind");
    })
    .await
    .expect("test timed out");
}

#[test]
fn a_public_admin_address_without_a_token_is_refused_at_start() {
    let dir = write_config("public", "listen = \"0.0.0.0:0\"", "");
    let out = Command::new(env!("CARGO_BIN_EXE_mlx-serving"))
        .args(["serve", "--config"])
        .arg(dir.join("config.toml"))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a loopback address") && err.contains("admin.token"), "{err}");
}
