//! `mlx-serving admin`: calls the admin API of a running supervisor and prints the answer for
//! people, or as JSON with `--json`.
use crate::emit;
use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use mlx_serving_supervisor::admin::{Listen, call};
use serde_json::{Value, json};
use std::fmt::Write as _;

/// The admin API's address when neither the flag nor the environment gives one (the server's
/// default `admin.listen`).
const DEFAULT_ADDR: &str = "127.0.0.1:8081";

#[derive(Args)]
pub struct AdminArgs {
    /// The supervisor's admin address: `HOST:PORT` or `unix:PATH`. Without it, and without
    /// `MLX_SERVING_ADMIN`, the address the server takes from `MLX_SERVING_ADMIN_LISTEN`, so
    /// that one environment serves both; else 127.0.0.1:8081.
    #[arg(long, env = "MLX_SERVING_ADMIN")]
    addr: Option<String>,
    /// Bearer token, when the admin API requires one.
    #[arg(long, env = "MLX_SERVING_ADMIN_TOKEN")]
    token: Option<String>,
    /// Print the JSON result as it came.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Every worker: state, pid, load, models, memory, breaker, restarts, last crash.
    Status,
    /// Take no new requests on a worker; its requests finish.
    Drain {
        #[arg(allow_negative_numbers = true)]
        worker: i64,
    },
    /// Take requests on a drained worker again.
    Undrain {
        #[arg(allow_negative_numbers = true)]
        worker: i64,
    },
    /// Restart a worker gracefully.
    Restart {
        #[arg(allow_negative_numbers = true)]
        worker: i64,
    },
    /// Replace every worker, one at a time, without losing capacity.
    RollingRestart,
    /// Load a configured model on workers ahead of traffic.
    Prefetch {
        model: String,
        /// Comma-separated worker ids; all workers when absent.
        #[arg(long, value_delimiter = ',')]
        workers: Option<Vec<i64>>,
    },
    /// Unload a model from workers.
    Unload {
        model: String,
        #[arg(long, value_delimiter = ',')]
        workers: Option<Vec<i64>>,
    },
    /// Grow or shrink the pool to N workers.
    Scale {
        /// Passed to the API as given; it refuses what is out of range.
        #[arg(allow_negative_numbers = true)]
        workers: i64,
    },
    /// Read the configuration file again.
    Reload,
}

pub fn run(args: AdminArgs) -> Result<()> {
    let addr = args
        .addr
        .clone()
        .or_else(|| std::env::var("MLX_SERVING_ADMIN_LISTEN").ok().filter(|a| !a.is_empty()))
        .unwrap_or_else(|| DEFAULT_ADDR.to_string());
    let listen = Listen::parse(&addr).map_err(anyhow::Error::msg)?;
    let (method, params) = match &args.command {
        AdminCommand::Status => ("status", json!({})),
        AdminCommand::Drain { worker } => ("drain", json!({ "worker": worker })),
        AdminCommand::Undrain { worker } => ("undrain", json!({ "worker": worker })),
        AdminCommand::Restart { worker } => ("restart", json!({ "worker": worker })),
        AdminCommand::RollingRestart => ("rolling_restart", json!({})),
        AdminCommand::Prefetch { model, workers } => ("prefetch", json!({ "model": model, "workers": workers })),
        AdminCommand::Unload { model, workers } => ("unload", json!({ "model": model, "workers": workers })),
        AdminCommand::Scale { workers } => ("scale", json!({ "workers": workers })),
        AdminCommand::Reload => ("reload_config", json!({})),
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let result = runtime.block_on(call(&listen, args.token.as_deref(), method, params));
    match result {
        Ok(v) if args.json => emit(&format!("{}\n", serde_json::to_string_pretty(&v)?))?,
        Ok(v) if method == "status" => emit(&status_text(&v))?,
        Ok(v) => emit(&format!("{method}: {}\n", compact(&v)))?,
        Err(e) => {
            if args.json {
                emit(&format!("{}\n", serde_json::to_string_pretty(&json!({ "error": e }))?))?;
            }
            match e.get("code") {
                Some(code) => bail!("{method} failed ({code}): {}", e["message"].as_str().unwrap_or("")),
                None => bail!("{method} failed: {}", e["message"].as_str().unwrap_or("")),
            }
        }
    }
    Ok(())
}

fn compact(v: &Value) -> String {
    match v.as_object() {
        Some(o) => o.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" "),
        None => v.to_string(),
    }
}

fn mib(v: &Value) -> String {
    v.as_u64().map_or("-".into(), |b| format!("{:.1}", b as f64 / (1 << 20) as f64))
}

fn status_text(v: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "workers: {} ready of {} target; requests: {} active, {} moved off dead workers, {} retried; uptime {:.0} s{}",
        v["ready_workers"],
        v["target_workers"],
        v["active_requests"],
        v["moved_requests"],
        v["retried_requests"],
        v["uptime_s"].as_f64().unwrap_or(0.0),
        if v["shutting_down"] == true { "; SHUTTING DOWN" } else { "" },
    );
    let _ = writeln!(
        s,
        "{:>4} {:<12} {:>8} {:>4} {:>5} {:>9} {:>9} {:<10} {:>8}  models",
        "id", "state", "pid", "gen", "load", "rss MiB", "mlx MiB", "breaker", "restarts"
    );
    for w in v["workers"].as_array().into_iter().flatten() {
        let models: Vec<&str> =
            w["models"].as_array().into_iter().flatten().filter_map(|m| m["name"].as_str()).collect();
        let gpu = w["cuda_visible_devices"].as_str().map_or(String::new(), |d| format!("  CUDA_VISIBLE_DEVICES={d}"));
        let _ = writeln!(
            s,
            "{:>4} {:<12} {:>8} {:>4} {:>5} {:>9} {:>9} {:<10} {:>8}  {}{gpu}",
            w["id"].to_string(),
            w["state"].as_str().unwrap_or("?"),
            w["pid"].as_u64().map_or("-".into(), |p| p.to_string()),
            w["generation"].to_string(),
            w["in_flight"].to_string(),
            mib(&w["memory"]["rss"]),
            mib(&w["memory"]["active"]),
            w["breaker"].as_str().unwrap_or("?"),
            w["restarts"].to_string(),
            models.join(","),
        );
        if let Some(c) = w["last_crash"].as_object() {
            let _ = writeln!(
                s,
                "       last crash: {} (pid {}, {} requests in flight)",
                c["reason"].as_str().unwrap_or("?"),
                c["pid"],
                c["in_flight"].as_array().map_or(0, Vec::len)
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn status_text_shows_each_workers_gpu_when_it_has_one() {
        let worker = |id: u64, gpu: Option<&str>| {
            let mut w = json!({"id": id, "state": "ready", "pid": 100 + id, "generation": 1, "in_flight": 0,
                               "breaker": "closed", "restarts": 0, "models": [{"name": "m"}]});
            if let Some(g) = gpu {
                w["cuda_visible_devices"] = json!(g);
            }
            w
        };
        let status = json!({"ready_workers": 2, "target_workers": 2, "active_requests": 0, "moved_requests": 0,
                            "retried_requests": 0, "uptime_s": 1.0, "shutting_down": false,
                            "workers": [worker(0, Some("GPU-1f2e")), worker(1, None)]});
        let text = super::status_text(&status);
        let rows: Vec<&str> = text.lines().skip(2).collect();
        assert!(rows[0].ends_with("m  CUDA_VISIBLE_DEVICES=GPU-1f2e"), "{text}");
        assert!(rows[1].ends_with(" m"), "{text}");
    }
}
