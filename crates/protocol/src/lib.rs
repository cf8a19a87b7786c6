//! The protocol between the mlx-serving supervisor and its workers: JSON-RPC 2.0 over the
//! worker's stdin and stdout, one JSON object per line. docs/protocol.md describes it in full.
//!
//! - [`types`]: the parameters, results and events of every method.
//! - [`rpc`]: the methods as a jsonrpsee trait; the worker implements the server side, the
//!   supervisor (and tests) use the generated client.
//! - [`error`]: the error codes a worker answers with.
//! - [`framing`]: reading lines with a length limit, and a jsonrpsee client transport over a
//!   child's pipes.
pub mod error;
pub mod framing;
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
