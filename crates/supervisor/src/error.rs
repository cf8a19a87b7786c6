//! Errors of the supervisor's request path and admin operations. One enum per boundary; the HTTP
//! front and the admin API map each variant to their own codes in one place.
use serde::Serialize;

#[derive(Clone, Debug, PartialEq, thiserror::Error, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PoolError {
    /// The model is not declared in the configuration.
    #[error("model `{model}` is not configured (configured: {configured:?})")]
    UnknownModel { model: String, configured: Vec<String> },
    /// The request itself is wrong; the message names the field.
    #[error("{message}")]
    InvalidRequest { message: String },
    /// The supervisor's bound on waiting and running requests is reached.
    #[error("too many requests for {scope} (limit {limit}); retry in {retry_after_s} s")]
    QueueFull { scope: String, limit: usize, retry_after_s: u64 },
    /// Every worker that could take the request is full.
    #[error("all workers are busy; retry later")]
    Overloaded,
    /// No worker became able to take the request in time.
    #[error("no worker is ready to serve `{model}` (waited {waited_ms} ms)")]
    NoWorker { model: String, waited_ms: u64 },
    /// Attempts failed and the retry budget or the candidates ran out.
    #[error("the request failed on {attempts} worker(s); last error: {last}")]
    RetriesExhausted { attempts: u32, last: String },
    /// The worker died after the stream had sent tokens.
    #[error("worker {worker} failed after the stream started: {message}")]
    WorkerFailedMidStream { worker: u64, message: String },
    /// This request (or one identical to it) took down workers; it is refused for a while.
    #[error("this request took down {crashes} workers and is quarantined: it is refused for 10 minutes")]
    Poisoned { crashes: u32 },
    /// The supervisor is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// An admin call named a worker that does not exist.
    #[error("no worker with id {id} (workers: {known:?})")]
    UnknownWorker { id: u64, known: Vec<u64> },
    /// An admin call that cannot be done in the current state.
    #[error("{message}")]
    Conflict { message: String },
}
