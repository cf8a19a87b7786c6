//! The worker's side of each request, from the records of tap.c: when the generate request's
//! line was complete on its stdin, and when each token event and the final event were written.
//! And what the tap costs per call.
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::clock::now_ns;
use crate::report::median;

/// One generate request as the worker saw it.
#[derive(Clone, Debug, Default)]
pub struct Segment {
    /// The read that completed the request's line returned.
    pub arrived: u64,
    /// Just before the write of each token event.
    pub tokens: Vec<u64>,
    /// Just before the write of the final event.
    pub finished: u64,
}

struct Record {
    kind: char,
    t: u64,
    /// R: generate requests in the read; W: token events in the write.
    a: usize,
    /// R: newlines in the read; W: final events in the write.
    b: usize,
}

/// The generate requests of one worker, in order. Requests must have been sequential.
pub fn segments(path: &Path) -> Result<Vec<Segment>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut records = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let [kind, t, a, b, _bytes] = f[..] else { bail!("bad tap record {line:?}") };
        records.push(Record { kind: kind.chars().next().unwrap_or('?'), t: t.parse()?, a: a.parse()?, b: b.parse()? });
    }
    // Records of two threads may be appended out of order by a few hundred nanoseconds.
    records.sort_by_key(|r| r.t);
    let mut out = Vec::new();
    let mut current: Option<Segment> = None;
    // A generate request was read, but not yet its newline.
    let mut waiting_newline = false;
    for r in records {
        match r.kind {
            'R' => {
                if r.a > 0 {
                    if r.a > 1 || current.is_some() {
                        bail!("overlapping generate requests in {}", path.display());
                    }
                    current = Some(Segment::default());
                    waiting_newline = true;
                }
                if waiting_newline && r.b > 0 {
                    if let Some(s) = current.as_mut() {
                        s.arrived = r.t;
                    }
                    waiting_newline = false;
                }
            }
            'W' => {
                let Some(s) = current.as_mut() else { continue };
                s.tokens.extend(std::iter::repeat_n(r.t, r.a));
                if r.b > 0 {
                    s.finished = r.t;
                    out.push(current.take().context("a segment")?);
                }
            }
            other => bail!("bad tap record kind {other:?}"),
        }
    }
    Ok(out)
}

/// A token event line, as the worker writes it.
const TOKEN_LINE: &[u8] = b"{\"jsonrpc\":\"2.0\",\"method\":\"generate_event\",\"params\":{\"subscription\":8417026851031807,\"result\":{\"type\":\"token\",\"token_ids\":[646],\"text\":\" Hi\"}}}\n";

/// The child of [`cost`]: `n` writes of a token line to stdout and `n` reads of 300 bytes
/// from stdin; prints the mean nanoseconds of each.
pub fn cost_child(n: usize) -> Result<()> {
    let start = now_ns();
    for _ in 0..n {
        // SAFETY: writing a valid buffer to fd 1.
        unsafe { libc::write(1, TOKEN_LINE.as_ptr().cast(), TOKEN_LINE.len()) };
    }
    let write_ns = (now_ns() - start) as f64 / n as f64;
    let mut buf = [0u8; 300];
    let start = now_ns();
    for _ in 0..n {
        // SAFETY: reading into a valid buffer from fd 0.
        unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
    }
    let read_ns = (now_ns() - start) as f64 / n as f64;
    eprintln!("{}", json!({"write_ns": write_ns, "read_ns": read_ns}));
    Ok(())
}

/// What the tap costs the worker per protocol read and write: the same calls, to /dev/null and
/// from /dev/zero, with and without it, alternated five times; medians.
pub fn cost(tap: &Path, dir: &Path) -> Result<Value> {
    let exe = std::env::current_exe()?;
    let n = 200_000;
    let mut with = (Vec::new(), Vec::new());
    let mut without = (Vec::new(), Vec::new());
    for i in 0..10 {
        let tapped = i % 2 == 0;
        let mut cmd = Command::new(&exe);
        cmd.args(["--worker", "-", "--serve", "-", "--model", "-", "--tap", "-", "--tap-cost-child", &n.to_string()])
            .stdin(std::fs::File::open("/dev/zero")?)
            .stdout(std::fs::File::create("/dev/null")?)
            .stderr(Stdio::piped());
        if tapped {
            cmd.env("LD_PRELOAD", tap).env("OVH_TAP_LOG", dir.join("cost.tap"));
        }
        let out = cmd.output()?;
        let v: Value = serde_json::from_slice(&out.stderr).context("the tap cost child's output")?;
        let side = if tapped { &mut with } else { &mut without };
        side.0.push(v["write_ns"].as_f64().unwrap_or(f64::NAN));
        side.1.push(v["read_ns"].as_f64().unwrap_or(f64::NAN));
    }
    let _ = std::fs::remove_file(dir.join("cost.tap"));
    let (w1, w0, r1, r0) = (median(&with.0), median(&without.0), median(&with.1), median(&without.1));
    Ok(json!({
        "write_ns_with": w1, "write_ns_without": w0, "write_ns_added": w1 - w0,
        "read_ns_with": r1, "read_ns_without": r0, "read_ns_added": r1 - r0,
    }))
}
