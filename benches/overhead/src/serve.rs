//! `mlx-serving serve` with one worker, started with the tap preloaded into that worker.
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::MODEL;
use crate::http::Http;

/// `mlx-serving serve` with one worker, its tap on.
pub struct Supervisor {
    child: Child,
    pub addr: SocketAddr,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Supervisor {
    pub fn start(serve: &Path, dir: &Path, worker: &Path, tap: &Path, model: &Path) -> Result<Supervisor> {
        let wrapper = dir.join("worker.sh");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexport LD_PRELOAD='{}'\nexport OVH_TAP_LOG='{}'\nexec '{}' \"$@\"\n",
                tap.display(),
                dir.join("supervised.tap").display(),
                worker.display()
            ),
        )?;
        std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let port = free_port()?;
        let config = format!(
            "[pool]\nworkers = 1\nworker_command = [\"{}\"]\n\n[http]\nlisten = \"127.0.0.1:{port}\"\n\n[admin]\nlisten = \"127.0.0.1:{}\"\n\n\
             [logging]\nlevel = \"warn\"\n\n[[models]]\nname = \"{MODEL}\"\npath = \"{}\"\npreload = true\nkeep_alive_s = 0\n",
            wrapper.display(),
            free_port()?,
            model.display()
        );
        let path = dir.join("config.toml");
        std::fs::write(&path, config)?;
        let log = std::fs::File::create(dir.join("serve.log"))?;
        let child = Command::new(serve)
            .args(["serve", "--config"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", serve.display()))?;
        Ok(Supervisor { child, addr: SocketAddr::from(([127, 0, 0, 1], port)) })
    }

    pub fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the supervisor exited: {status}");
            }
            if Http::get_status(self.addr, "/ready").ok() == Some(200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the supervisor was not ready within 180 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// CPU time of every live thread of the supervisor (schedstat), ns.
    pub fn cpu_ns(&self) -> u64 {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.child.id())) else { return 0 };
        tasks
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| s.split(' ').next().and_then(|v| v.parse::<u64>().ok()))
            .sum()
    }

    /// SIGTERM, as an operator would: the supervisor shuts its worker down and exits.
    pub fn stop(mut self) -> Result<()> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                self.child.kill()?;
                self.child.wait()?;
                bail!("the supervisor did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}
