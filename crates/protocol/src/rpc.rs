//! The worker's methods as a jsonrpsee trait. Parameters travel by name (a JSON object).
use jsonrpsee::core::{RpcResult, SubscriptionResult};
use jsonrpsee::proc_macros::rpc;

use crate::types::{GenerateEvent, GenerateRequest, Handshake, ModelInfo, ShutdownAck, Stats, Unloaded};

#[rpc(client, server)]
pub trait WorkerRpc {
    /// Who the worker is and what it can do. The first call a supervisor makes.
    #[method(name = "handshake", param_kind = map)]
    async fn handshake(&self) -> RpcResult<Handshake>;

    /// Loads the model directory `path` under the name `model`. Loading a name again with the
    /// same path is a no-op; with another path it is an error (unload first).
    #[method(name = "load_model", param_kind = map)]
    async fn load_model(&self, model: String, path: String) -> RpcResult<ModelInfo>;

    /// Unloads a model; its running and queued requests end with finish_reason `cancelled`.
    #[method(name = "unload_model", param_kind = map)]
    async fn unload_model(&self, model: String) -> RpcResult<Unloaded>;

    #[method(name = "list_models", param_kind = map)]
    async fn list_models(&self) -> RpcResult<Vec<ModelInfo>>;

    /// Starts a generation. A refused request gets an error response; an admitted one gets a
    /// subscription whose events end with one `final` event.
    #[subscription(name = "generate" => "generate_event", unsubscribe = "generate_unsubscribe", item = GenerateEvent, param_kind = map)]
    async fn generate(&self, request: GenerateRequest) -> SubscriptionResult;

    /// Cancels the running or queued request `id`: its stream ends with finish_reason
    /// `cancelled` at the next decode step. Returns whether the request was found.
    #[method(name = "cancel", param_kind = map)]
    async fn cancel(&self, id: String) -> RpcResult<bool>;

    #[method(name = "stats", param_kind = map)]
    async fn stats(&self) -> RpcResult<Stats>;

    /// Stops admitting requests, lets running ones finish for up to `deadline_ms`, cancels the
    /// rest, then exits with status 0.
    #[method(name = "shutdown", param_kind = map)]
    async fn shutdown(&self, deadline_ms: u64) -> RpcResult<ShutdownAck>;
}
