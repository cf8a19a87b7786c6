//! The mlx-serving supervisor: a pool of worker processes that heals itself.
//!
//! - [`pool`]: the slots and the request path (routing, retries, breakers), and the operations
//!   the admin API exposes (drain, restart, rolling restart, prefetch, unload, scale, reload).
//! - [`worker`]: one slot's actor, which owns its worker process and replaces it when it dies or
//!   hangs.
//! - [`breaker`], [`restart`], [`retry`], [`route`], [`prefix`]: the small state machines those
//!   use.
//! - [`config`]: the TOML configuration.
pub mod admin;
pub mod api;
pub mod breaker;
pub mod config;
pub mod error;
pub mod metrics;
pub mod pool;
pub mod prefix;
pub mod restart;
pub mod retry;
pub mod route;
pub mod status;
pub mod worker;

pub use config::Config;
pub use error::PoolError;
pub use pool::{Pool, PoolEvent, Priority, StreamItem};
