//! `mlx-serving-bench`: a load generator for OpenAI-compatible servers (mlx-serving and
//! mlx_lm.server alike). It sends independent requests at a fixed concurrency or with Poisson
//! arrivals, multi-turn conversations, or bursts of identical requests, and reports time to first
//! token, inter-token latency, end-to-end latency, requests/s and tokens/s (docs/benchmarks.md).
pub mod cli;
pub mod client;
pub mod dist;
pub mod progress;
pub mod prompt;
pub mod report;
pub mod stats;
pub mod workload;
