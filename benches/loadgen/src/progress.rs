//! A one-line progress display on stderr, redrawn every second while a run lasts (only when
//! stderr is a terminal, so logs and CI output stay clean).
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::client::Outcome;

#[derive(Default)]
pub struct Counters {
    done: AtomicUsize,
    errors: AtomicUsize,
    tokens: AtomicUsize,
}

/// Counts finished requests; `stop` ends the display.
pub struct Progress {
    counters: Arc<Counters>,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// `total`: the number of requests when known.
    pub fn start(label: &str, total: Option<usize>, enabled: bool) -> Progress {
        let counters = Arc::new(Counters::default());
        let ticker = (enabled && std::io::stderr().is_terminal()).then(|| {
            let c = counters.clone();
            let label = label.to_string();
            tokio::spawn(async move {
                let start = Instant::now();
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    let total = total.map_or(String::new(), |t| format!("/{t}"));
                    let secs = start.elapsed().as_secs_f64();
                    let tokens = c.tokens.load(Ordering::Relaxed);
                    eprint!(
                        "\r{label}: {}{total} requests, {} errors, {tokens} tokens, {:.0} tokens/s, {secs:.0} s   ",
                        c.done.load(Ordering::Relaxed),
                        c.errors.load(Ordering::Relaxed),
                        tokens as f64 / secs.max(1e-9),
                    );
                    let _ = std::io::stderr().flush();
                }
            })
        });
        Progress { counters, ticker }
    }

    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    pub fn stop(self) {
        if let Some(t) = self.ticker {
            t.abort();
            eprintln!();
        }
    }
}

impl Counters {
    pub fn record(&self, o: &Outcome) {
        self.done.fetch_add(1, Ordering::Relaxed);
        if !o.ok() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.tokens.fetch_add(o.completion_tokens as usize, Ordering::Relaxed);
    }
}
