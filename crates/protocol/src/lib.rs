//! The protocol between the mlx-serving supervisor and its workers: JSON-RPC 2.0 over the
//! worker's stdin and stdout, one JSON object per line. docs/protocol.md describes it in full.
//!
//! - [`types`]: the parameters, results and events of every method.
//! - [`rpc`]: the methods as a jsonrpsee trait; the worker implements the server side (tests also
//!   drive it with the generated client).
//! - [`error`]: the error codes a worker answers with.
//! - [`framing`]: reading lines with a length limit, and a jsonrpsee client transport over a
//!   child's pipes.
//! - [`link`]: the supervisor's client of a worker, over the worker's pipes.
pub mod error;
pub mod framing;
pub mod link;
pub mod rpc;
pub mod types;

pub use error::ErrorCode;
pub use rpc::{WorkerRpcClient, WorkerRpcServer};
pub use types::*;

/// Version of this protocol, sent in the handshake. A change that an older peer would misread
/// bumps the major number.
pub const PROTOCOL_VERSION: &str = "1.0";

/// Method name of the worker's heartbeat notification.
pub const HEARTBEAT_METHOD: &str = "heartbeat";
