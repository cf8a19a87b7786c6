//! The admin API: JSON-RPC 2.0 over HTTP POST on a loopback address or a unix socket, with an
//! optional bearer token. Methods take named parameters. docs/admin.md lists them.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use jsonrpsee::RpcModule;
use jsonrpsee::types::{ErrorObjectOwned, Params};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::Config;
use crate::config::ConfigError;
use crate::error::PoolError;
use crate::pool::Pool;

/// Largest admin request body.
const MAX_BODY_BYTES: usize = 1 << 20;

/// Error codes of the admin API, beside the standard JSON-RPC ones.
pub mod codes {
    pub const UNKNOWN_WORKER: i32 = 2001;
    pub const UNKNOWN_MODEL: i32 = 2002;
    pub const CONFLICT: i32 = 2003;
    pub const UNAUTHORIZED: i32 = 2004;
    pub const INVALID_CONFIG: i32 = 2005;
    pub const SHUTTING_DOWN: i32 = 2006;
}

/// Where the admin API listens: `HOST:PORT` or `unix:PATH`.
#[derive(Clone, Debug, PartialEq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Listen {
    pub fn parse(s: &str) -> Result<Listen, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        s.parse().map(Listen::Tcp).map_err(|e| format!("`{s}` is neither HOST:PORT nor unix:PATH ({e})"))
    }

    /// A TCP address off the loopback interface needs a token.
    pub fn check_token(&self, token: Option<&str>) -> Result<(), String> {
        match self {
            Listen::Tcp(addr) if !addr.ip().is_loopback() && token.is_none() => Err(format!(
                "the admin API would listen on {addr}, which is not a loopback address, without a token: set `admin.token`"
            )),
            _ => Ok(()),
        }
    }
}

fn pool_error(e: PoolError) -> ErrorObjectOwned {
    let code = match &e {
        PoolError::UnknownWorker { .. } => codes::UNKNOWN_WORKER,
        PoolError::UnknownModel { .. } => codes::UNKNOWN_MODEL,
        PoolError::ShuttingDown => codes::SHUTTING_DOWN,
        _ => codes::CONFLICT,
    };
    ErrorObjectOwned::owned(code, e.to_string(), Some(json!(e)))
}

/// Parses named parameters; the error names the method and what is wrong.
fn parse<T: DeserializeOwned>(method: &str, params: &Params<'_>) -> Result<T, ErrorObjectOwned> {
    serde_json::from_str(params.as_str().unwrap_or("{}"))
        .map_err(|e| ErrorObjectOwned::owned::<()>(-32602, format!("invalid params for `{method}`: {e}"), None))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkerParams {
    worker: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelParams {
    model: String,
    /// Worker ids; every worker when absent.
    #[serde(default)]
    workers: Option<Vec<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaleParams {
    workers: usize,
}

/// Reads and validates the configuration again (for `reload_config` and SIGHUP).
pub type Reloader = Arc<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

pub struct AdminContext {
    pub pool: Arc<Pool>,
    pub reload: Reloader,
}

/// The admin methods.
pub fn module(ctx: AdminContext) -> RpcModule<AdminContext> {
    let mut m = RpcModule::new(ctx);
    macro_rules! method {
        ($name:literal, |$p:ident: $ty:ty, $ctx:ident| $body:expr) => {
            m.register_async_method($name, |params, $ctx, _| async move {
                let $p: $ty = parse($name, &params)?;
                let result: Result<Value, ErrorObjectOwned> = $body;
                result
            })
            .expect("method names are unique");
        };
    }
    method!("status", |_p: NoParams, ctx| Ok(json!(ctx.pool.status())));
    method!("drain", |p: WorkerParams, ctx| ctx
        .pool
        .drain(p.worker)
        .map(|()| json!({"worker": p.worker, "draining": true}))
        .map_err(pool_error));
    method!("undrain", |p: WorkerParams, ctx| ctx
        .pool
        .undrain(p.worker)
        .map(|()| json!({"worker": p.worker, "draining": false}))
        .map_err(pool_error));
    method!("restart", |p: WorkerParams, ctx| ctx
        .pool
        .restart(p.worker)
        .map(|()| json!({"worker": p.worker, "restarting": true}))
        .map_err(pool_error));
    method!("rolling_restart", |_p: NoParams, ctx| ctx
        .pool
        .rolling_restart()
        .await
        .map(|ids| json!({"replaced": ids}))
        .map_err(pool_error));
    method!("prefetch", |p: ModelParams, ctx| ctx
        .pool
        .prefetch(&p.model, p.workers)
        .await
        .map(|ids| json!({"model": p.model, "workers": ids}))
        .map_err(pool_error));
    method!("unload", |p: ModelParams, ctx| ctx
        .pool
        .unload(&p.model, p.workers)
        .await
        .map(|ids| json!({"model": p.model, "workers": ids}))
        .map_err(pool_error));
    method!("scale", |p: ScaleParams, ctx| ctx
        .pool
        .scale(p.workers)
        .await
        .map(|n| json!({"workers": n}))
        .map_err(pool_error));
    method!("reload_config", |_p: NoParams, ctx| {
        match (ctx.reload)() {
            Ok(config) => {
                ctx.pool.reload(config).await.map(|n| json!({"reloaded": true, "workers": n})).map_err(pool_error)
            }
            Err(e) => Err(ErrorObjectOwned::owned::<()>(codes::INVALID_CONFIG, e.to_string(), None)),
        }
    });
    m
}

struct Served {
    module: RpcModule<AdminContext>,
    token: Option<String>,
}

async fn handle(State(s): State<Arc<Served>>, headers: HeaderMap, body: Bytes) -> impl IntoResponse {
    let reply = |status: StatusCode, body: String| (status, [(header::CONTENT_TYPE, "application/json")], body);
    let error = |code: i32, message: &str| {
        json!({"jsonrpc": "2.0", "id": null, "error": {"code": code, "message": message}}).to_string()
    };
    if let Some(token) = &s.token {
        let given =
            headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(t) if t == token => {}
            Some(_) => return reply(StatusCode::UNAUTHORIZED, error(codes::UNAUTHORIZED, "wrong bearer token")),
            None => {
                return reply(
                    StatusCode::UNAUTHORIZED,
                    error(codes::UNAUTHORIZED, "missing bearer token (Authorization: Bearer ...)"),
                );
            }
        }
    }
    let Ok(text) = std::str::from_utf8(&body) else {
        return reply(StatusCode::BAD_REQUEST, error(-32700, "the body is not UTF-8"));
    };
    match s.module.raw_json_request(text, 1).await {
        Ok((response, _)) => reply(StatusCode::OK, response.get().to_string()),
        Err(e) => reply(StatusCode::BAD_REQUEST, error(-32700, &format!("not a JSON-RPC request: {e}"))),
    }
}

/// Serves the admin API until `stop` is cancelled.
pub async fn serve(
    listen: Listen,
    token: Option<String>,
    module: RpcModule<AdminContext>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    listen.check_token(token.as_deref()).map_err(std::io::Error::other)?;
    let app = Router::new()
        .route("/", post(handle))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(Arc::new(Served { module, token }));
    let shutdown = async move { stop.cancelled().await };
    match listen {
        Listen::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            tracing::info!(%addr, "admin API listening");
            axum::serve(listener, app).with_graceful_shutdown(shutdown).await
        }
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path)?;
            tracing::info!(path = %path.display(), "admin API listening");
            axum::serve(listener, app).with_graceful_shutdown(shutdown).await
        }
    }
}

/// Calls one admin method over HTTP (TCP or unix socket). Returns the JSON-RPC `result`, or the
/// `error` object as the error.
pub async fn call(listen: &Listen, token: Option<&str>, method: &str, params: Value) -> Result<Value, Value> {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).to_string();
    let mut req =
        hyper::Request::post("/").header(header::CONTENT_TYPE, "application/json").header(header::HOST, "localhost");
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req.body(Full::new(Bytes::from(body))).map_err(|e| json!({"message": e.to_string()}))?;
    let transport = |e: std::io::Error| json!({"message": format!("cannot reach the admin API at {listen:?}: {e}")});
    let response = match listen {
        Listen::Tcp(addr) => {
            let stream = tokio::net::TcpStream::connect(addr).await.map_err(transport)?;
            send(TokioIo::new(stream), req).await
        }
        Listen::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path).await.map_err(transport)?;
            send(TokioIo::new(stream), req).await
        }
    }
    .map_err(|e| json!({"message": e}))?;
    let bytes = response.into_body().collect().await.map_err(|e| json!({"message": e.to_string()}))?.to_bytes();
    let v: Value =
        serde_json::from_slice(&bytes).map_err(|e| json!({"message": format!("not JSON from the admin API: {e}")}))?;
    match (v.get("result"), v.get("error")) {
        (Some(r), _) => Ok(r.clone()),
        (_, Some(e)) => Err(e.clone()),
        _ => Err(json!({"message": format!("not a JSON-RPC response: {v}")})),
    }
}

async fn send<T>(
    io: T,
    req: hyper::Request<http_body_util::Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    sender.send_request(req).await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse_and_non_loopback_needs_a_token() {
        assert_eq!(Listen::parse("unix:/tmp/a.sock").unwrap(), Listen::Unix("/tmp/a.sock".into()));
        let local = Listen::parse("127.0.0.1:8081").unwrap();
        assert!(local.check_token(None).is_ok());
        let any = Listen::parse("0.0.0.0:8081").unwrap();
        assert!(any.check_token(None).unwrap_err().contains("not a loopback address"));
        assert!(any.check_token(Some("t")).is_ok());
        assert!(Listen::parse("localhost").is_err());
    }
}
