//! Running as a service: the effective configuration (file < environment < flags) and the
//! systemd notifications (READY=1 once workers are ready, WATCHDOG=1, STATUS=, STOPPING=1 on
//! SIGTERM) seen through a fake NOTIFY_SOCKET.
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mlx_serving_supervisor::admin::{Listen, call};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mlx-serving-service-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `mlx-serving config check` with these arguments and variables: the effective configuration,
/// or the error output.
fn check(args: &[&str], env: &[(&str, &str)]) -> Result<toml::Table, String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mlx-serving"));
    cmd.args(["config", "check"]).args(args);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("MLX_SERVING_")) {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap())
}

#[test]
fn the_environment_overrides_the_file_and_flags_override_both() {
    let dir = temp_dir("precedence");
    let file = write(&dir, "[pool]\nworkers = 3\n[http]\nlisten = \"127.0.0.1:9001\"\n[logging]\nlevel = \"warn\"\n");
    let f = file.to_str().unwrap();
    let workers = |t: &toml::Table| t["pool"]["workers"].as_integer().unwrap();
    let listen = |t: &toml::Table| t["http"]["listen"].as_str().unwrap().to_string();

    let t = check(&[f], &[]).unwrap();
    assert_eq!((workers(&t), listen(&t).as_str()), (3, "127.0.0.1:9001"));
    assert_eq!(t["logging"]["level"].as_str(), Some("warn"));
    assert_eq!(t["logging"]["json"].as_bool(), Some(false));

    let env = [
        ("MLX_SERVING_WORKERS", "2"),
        ("MLX_SERVING_LISTEN", "127.0.0.1:9002"),
        ("MLX_SERVING_LOG_LEVEL", "debug"),
        ("MLX_SERVING_LOG_JSON", "1"),
        ("MLX_SERVING_ADMIN_TOKEN", "from-env"),
    ];
    let t = check(&[f], &env).unwrap();
    assert_eq!((workers(&t), listen(&t).as_str()), (2, "127.0.0.1:9002"));
    assert_eq!(t["logging"]["level"].as_str(), Some("debug"));
    assert_eq!(t["logging"]["json"].as_bool(), Some(true));
    assert_eq!(t["admin"]["token"].as_str(), Some("<hidden>"), "the token is set and not printed");

    let t = check(&[f, "--workers", "1", "--listen", "127.0.0.1:9003", "--log-json=false"], &env).unwrap();
    assert_eq!((workers(&t), listen(&t).as_str()), (1, "127.0.0.1:9003"));
    assert_eq!(t["logging"]["json"].as_bool(), Some(false));
    assert_eq!(t["logging"]["level"].as_str(), Some("debug"), "no flag: the environment holds");

    // The file through the environment.
    let t = check(&[], &[("MLX_SERVING_CONFIG", f)]).unwrap();
    assert_eq!(workers(&t), 3);
    // A bad override is refused like a bad file.
    let e = check(&[f, "--workers", "0"], &[]).unwrap_err();
    assert!(e.contains("`pool.workers` must be at least 1"), "{e}");
    let e = check(&[f], &[("MLX_SERVING_WORKERS", "many")]).unwrap_err();
    assert!(e.contains("many") && e.contains("--workers"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn config_check_names_the_key_and_the_file() {
    let dir = temp_dir("errors");
    for (text, wants) in [
        ("[pool]\nworkerz = 2\n", vec!["workerz", "config.toml"]),
        ("[pool]\nworkers = \"two\"\n", vec!["workers", "config.toml", "invalid type"]),
        ("[pool]\nworkers = 0\n", vec!["`pool.workers` must be at least 1"]),
        (
            &format!(
                "model_roots = [\"{}\"]\n[[models]]\nname = \"m\"\npath = \"/etc\"\n",
                fixtures().join("models").display()
            ),
            vec!["model `m`", "outside the model roots"],
        ),
    ] {
        let file = write(&dir, text);
        let e = check(&[file.to_str().unwrap()], &[]).unwrap_err();
        for w in wants {
            assert!(e.contains(w), "`{w}` is not in: {e}");
        }
    }
    // The documented file is valid, and so are the defaults.
    let documented = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/mlx-serving.toml");
    check(&[documented.to_str().unwrap()], &[]).unwrap();
    check(&[], &[]).unwrap();
    let schema = Command::new(env!("CARGO_BIN_EXE_mlx-serving")).args(["config", "schema"]).output().unwrap();
    let schema: serde_json::Value = serde_json::from_slice(&schema.stdout).unwrap();
    assert!(schema["properties"]["pool"].is_object(), "{schema}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_after_the_workers_then_watchdog_then_stopping() {
    let dir = temp_dir("notify");
    let socket = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&socket).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let admin_port = free_port();
    let admin = Listen::parse(&format!("127.0.0.1:{admin_port}")).unwrap();
    let config = write(
        &dir,
        &format!(
            "[pool]\nworkers = 2\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 2000\ndrain_deadline_ms = 5000\n\
             [http]\nlisten = \"127.0.0.1:{}\"\nmin_ready_workers = 2\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\
             [[models]]\nname = \"m\"\npath = \"{}\"\npreload = true\n",
            free_port(),
            fixtures().join("models/qwen3-bf16").display()
        ),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_mlx-serving"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket)
        .env("WATCHDOG_USEC", "1000000")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    // Messages as they come (when, the message, the ready worker count the admin API showed right then).
    type Seen = Vec<(Instant, String, Option<u64>)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let reader = {
        let seen = seen.clone();
        let admin = admin.clone();
        let rt = tokio::runtime::Handle::current();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let end = Instant::now() + Duration::from_secs(90);
            while Instant::now() < end {
                let Ok(n) = sock.recv(&mut buf) else { continue };
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let ready = msg.lines().any(|l| l == "READY=1").then(|| {
                    rt.block_on(call(&admin, None, "status", json!({}))).ok().and_then(|s| s["ready_workers"].as_u64())
                });
                let stopping = msg.lines().any(|l| l == "STOPPING=1");
                seen.lock().unwrap().push((Instant::now(), msg, ready.flatten()));
                if stopping {
                    return;
                }
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready_at = loop {
        if let Some((at, _, workers)) = seen.lock().unwrap().iter().find(|(_, m, _)| m.lines().any(|l| l == "READY=1"))
        {
            assert!(workers.is_some_and(|n| n >= 2), "READY=1 with {workers:?} ready workers; want 2");
            break *at;
        }
        assert!(Instant::now() < deadline, "no READY=1: {:?}", seen.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The watchdog interval is 1 s: pings every 0.5 s, each with a STATUS= line.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let pings: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, m, _)| *at > ready_at && m.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(_, m, _)| m.clone())
        .collect();
    assert!(pings.len() >= 3, "{} watchdog pings in 2.2 s: {pings:?}", pings.len());
    assert!(pings.iter().all(|m| m.contains("STATUS=2/2 workers ready")), "{pings:?}");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    reader.join().unwrap();
    let last = seen.lock().unwrap().last().cloned().unwrap();
    assert!(last.1.lines().any(|l| l == "STOPPING=1"), "{last:?}");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
