//! A worker process: spawned in a process group of its own, its stdin/stdout a JSON-RPC client,
//! the last lines of its stderr kept for crash reports.
use std::collections::VecDeque;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mlx_serving_protocol::framing::LineReader;
use mlx_serving_protocol::link::WorkerLink;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// Lines of a worker's stderr kept for its crash report.
pub const STDERR_TAIL_LINES: usize = 64;
/// Longest stderr line kept; longer lines are cut.
const STDERR_LINE_BYTES: usize = 4096;

/// The last lines a process wrote to stderr.
#[derive(Clone, Default)]
pub struct StderrTail(Arc<Mutex<VecDeque<String>>>);

impl StderrTail {
    fn push(&self, line: String) {
        if let Ok(mut t) = self.0.lock() {
            if t.len() == STDERR_TAIL_LINES {
                t.pop_front();
            }
            t.push_back(line);
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.lock().map(|t| t.iter().cloned().collect()).unwrap_or_default()
    }
}

pub struct Process {
    pub child: Child,
    pub pid: u32,
    pub client: WorkerLink,
    pub stderr: StderrTail,
    /// Ends when stderr closes.
    pub stderr_done: tokio::task::JoinHandle<()>,
}

/// Starts `command` (program and arguments), with `env` added to the supervisor's environment,
/// in its own process group and connects a client to its pipes, which refuses lines longer than
/// `max_line_bytes`.
pub fn spawn(
    command: &[String],
    env: &[(&str, &str)],
    worker: u64,
    request_timeout: Duration,
    max_line_bytes: usize,
) -> std::io::Result<Process> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "the worker command is empty"))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let pid = child.id().unwrap_or(0);
    let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(std::io::Error::other("the worker's pipes are missing"));
    };
    let client = WorkerLink::new(stdin, LineReader::new(stdout, max_line_bytes), request_timeout);
    let tail = StderrTail::default();
    let keep = tail.clone();
    let stderr_done = tokio::spawn(async move {
        let mut lines = LineReader::new(stderr, STDERR_LINE_BYTES);
        loop {
            match lines.next_line().await {
                Ok(Some(line)) => {
                    tracing::info!(target: "worker", worker, "{line}");
                    keep.push(line);
                }
                Ok(None) => return,
                Err(e) if e.is_recoverable() => keep.push(format!("<{e}>")),
                Err(_) => return,
            }
        }
    });
    Ok(Process { child, pid, client, stderr: tail, stderr_done })
}

/// Sends `signal` to the worker's process group (the worker and anything it started).
pub fn signal_group(pid: u32, signal: Signal) {
    if pid == 0 {
        return;
    }
    if let Err(e) = killpg(Pid::from_raw(pid as i32), signal)
        && e != nix::errno::Errno::ESRCH
    {
        tracing::warn!(pid, "killpg({signal}) failed: {e}");
    }
}

/// How a process ended, in words: `exit status 3`, `signal 9 (SIGKILL)`.
pub fn describe_exit(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        return format!("exit status {code}");
    }
    match status.signal() {
        Some(sig) => match Signal::try_from(sig) {
            Ok(s) => format!("signal {sig} ({s})"),
            Err(_) => format!("signal {sig}"),
        },
        None => "unknown".into(),
    }
}
