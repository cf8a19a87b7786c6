//! The OpenAI-compatible HTTP front: `/v1/chat/completions`, `/v1/completions` (JSON or SSE),
//! `/v1/models`, `/health`, `/ready`, `/metrics`.
pub mod cache;
pub mod error;
pub mod openai;
pub mod ratelimit;
pub mod shared;
pub mod stream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use mlx_serving_protocol::GenerateEvent;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::HttpConfig;
use crate::pool::{Pool, PoolEvent, Priority};
use crate::worker::slot::WorkerState;
use error::ApiError;
use openai::{Route, ValidRequest};

pub struct ApiState {
    pub pool: Arc<Pool>,
    /// Starts requests: shares identical deterministic ones, answers from the response cache.
    pub hub: Arc<shared::Hub>,
    pub config: HttpConfig,
    pub metrics: PrometheusHandle,
    /// Whether `/metrics` is served (`metrics.enabled`).
    pub serve_metrics: bool,
    /// Present when `http.rate_limit_per_s` is set.
    pub limiter: Option<ratelimit::RateLimiter>,
}

impl ApiState {
    pub fn new(pool: Arc<Pool>, config: HttpConfig, metrics: PrometheusHandle) -> ApiState {
        let limiter = (config.rate_limit_per_s > 0.0)
            .then(|| ratelimit::RateLimiter::new(config.rate_limit_per_s, config.rate_limit_burst));
        let c = &config.response_cache;
        let cache = c.enabled.then(|| cache::ResponseCache::new(c.max_bytes, std::time::Duration::from_secs(c.ttl_s)));
        let hub = Arc::new(shared::Hub::new(pool.clone(), config.coalesce, cache));
        ApiState { pool, hub, config, metrics, serve_metrics: true, limiter }
    }
}

/// The request id of a request: from `x-request-id`, or made here.
#[derive(Clone)]
pub struct RequestId(pub String);

pub fn router(state: Arc<ApiState>) -> Router {
    let limit = state.config.max_body_bytes;
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    let mut router = Router::new()
        .merge(v1)
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready));
    if state.serve_metrics {
        router = router.route("/metrics", get(metrics));
    }
    router
        // The body limit is enforced when the handler reads the body, so the 413 comes in the
        // OpenAI error format.
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

/// Serves `router` on `listen` until `stop` is cancelled.
pub async fn serve(listen: SocketAddr, router: Router, stop: CancellationToken) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, "HTTP API listening");
    // Streams are many small writes: without TCP_NODELAY each one after the first can wait for
    // the client's delayed ACK (up to 40 ms).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY: {e}");
        }
    });
    // The router is cloned per connection as it is (an Arc): axum's default would rebuild its route
    // table for every connection.
    axum::serve(listener, router.into_make_service())
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(|| format!("req-{:016x}", rand::random::<u64>()));
    req.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!("request", id = %id, method = %req.method(), path = %req.uri().path());
    let mut response = next.run(req).instrument(span).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

/// API keys, then the per-key rate limit.
async fn auth(State(state): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    let given =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if !state.config.api_keys.is_empty() {
        match given {
            Some(key) if state.config.api_keys.iter().any(|k| k == key) => {}
            Some(_) => return ApiError::unauthorized("invalid API key").into_response(),
            None => return ApiError::unauthorized("missing API key: send Authorization: Bearer <key>").into_response(),
        }
    }
    if let Some(limiter) = &state.limiter
        && let Err(wait) = limiter.check(given.unwrap_or(""), tokio::time::Instant::now())
    {
        return ApiError::rate_limited(wait).into_response();
    }
    next.run(req).await
}

async fn chat(
    state: State<Arc<ApiState>>,
    id: axum::Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate(state, id, Route::Chat, headers, body).await
}

async fn completions(
    state: State<Arc<ApiState>>,
    id: axum::Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate(state, id, Route::Completions, headers, body).await
}

/// The `x-priority` header: urgent, default (when absent) or background.
fn priority(headers: &HeaderMap) -> Result<Priority, ApiError> {
    match headers.get("x-priority") {
        None => Ok(Priority::Default),
        Some(v) => v.to_str().ok().and_then(Priority::parse).ok_or_else(|| {
            ApiError::invalid(
                Some("x-priority".to_string()),
                "the `x-priority` header must be urgent, default or background",
            )
        }),
    }
}

async fn generate(
    State(state): State<Arc<ApiState>>,
    axum::Extension(RequestId(id)): axum::Extension<RequestId>,
    route: Route,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    let fail = |model: &str, e: ApiError| {
        crate::metrics::request_done(route.name(), model, e.status.as_u16());
        e.into_response()
    };
    let body = match body {
        Ok(b) => b,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return fail("", ApiError::too_large(state.config.max_body_bytes));
        }
        Err(rejection) => return fail("", ApiError::invalid(None, rejection.body_text())),
    };
    let (req, priority) = match openai::parse(
        route,
        &body,
        &openai::TokenLimits {
            default_max_tokens: state.config.default_max_tokens,
            max_tokens: state.config.max_tokens,
        },
        &id,
    )
    .and_then(|r| Ok((r, priority(&headers)?)))
    {
        Ok(r) => r,
        Err(e) => return fail("", e),
    };
    let (feed, source) = state.hub.generate(req.generate.clone(), priority);
    let mut response = answer(&state, req, arrived, &id, feed).await;
    if state.hub.caching() {
        let value = if source == shared::Source::Cache { "hit" } else { "miss" };
        response.headers_mut().insert("x-cache", HeaderValue::from_static(value));
    }
    response
}

/// The answer to a request whose events come from `feed`: an error response when it was refused
/// before a worker took it, else the JSON body or the SSE stream.
async fn answer(state: &ApiState, req: ValidRequest, arrived: Instant, id: &str, mut feed: shared::Feed) -> Response {
    let route = req.route;
    let fail = |model: &str, e: ApiError| {
        crate::metrics::request_done(route.name(), model, e.status.as_u16());
        e.into_response()
    };
    // Wait until a worker has taken the request, so refusals get their status code.
    let first = match feed.recv().await {
        Some(Ok(PoolEvent::Started)) => None,
        Some(Ok(PoolEvent::Event(e))) => Some(e),
        Some(Err(e)) => {
            let reason = match &e {
                crate::PoolError::QueueFull { .. } | crate::PoolError::Overloaded => "overloaded",
                crate::PoolError::InvalidRequest { .. } | crate::PoolError::UnknownModel { .. } => "invalid",
                _ => "unavailable",
            };
            // A model name no worker serves is the client's text: it never becomes a label value,
            // or every new name would add series to /metrics.
            let model = if matches!(e, crate::PoolError::UnknownModel { .. }) { "" } else { req.model.as_str() };
            crate::metrics::rejected(model, reason);
            return fail(model, ApiError::from_pool(e, route.prompt_param()));
        }
        None => return fail(&req.model, ApiError::from_pool(crate::PoolError::ShuttingDown, route.prompt_param())),
    };
    let meta = stream::Meta::new(&req, id, arrived);
    if req.stream {
        stream::sse(meta, &req, feed, first, state.config.sse_keep_alive_s).into_response()
    } else {
        complete(meta, req, feed, first).await
    }
}

/// A non-streaming answer: every event, then one JSON body.
async fn complete(
    mut meta: stream::Meta,
    req: ValidRequest,
    mut rx: shared::Feed,
    first: Option<GenerateEvent>,
) -> Response {
    let mut tokens = Vec::new();
    let mut text = String::new();
    let mut pending = first;
    loop {
        let event = match pending.take() {
            Some(e) => e,
            None => match rx.recv().await {
                Some(Ok(PoolEvent::Event(e))) => e,
                Some(Ok(PoolEvent::Started)) => continue,
                Some(Err(e)) => {
                    meta.finish(502);
                    return ApiError::from_pool(e, req.route.prompt_param()).into_response();
                }
                None => {
                    meta.finish(502);
                    return ApiError::from_pool(crate::PoolError::ShuttingDown, req.route.prompt_param())
                        .into_response();
                }
            },
        };
        match event {
            GenerateEvent::Token(t) => {
                meta.on_tokens(t.token_ids.len());
                text.push_str(&t.text);
                tokens.push(t);
            }
            GenerateEvent::Final(f) => {
                text.push_str(&f.text);
                meta.on_final(&f);
                let logprobs =
                    if req.logprobs { openai::logprobs(req.route, &tokens) } else { serde_json::Value::Null };
                let reason = openai::finish_reason(f.finish_reason);
                let created = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                let mut body = match req.route {
                    Route::Chat => json!({
                        "id": req.route.response_id(&meta.id), "object": "chat.completion", "created": created, "model": req.model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs, "finish_reason": reason}],
                        "usage": openai::usage(&f.usage),
                    }),
                    Route::Completions => json!({
                        "id": req.route.response_id(&meta.id), "object": "text_completion", "created": created, "model": req.model,
                        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}],
                        "usage": openai::usage(&f.usage),
                    }),
                };
                if req.return_token_ids {
                    body["choices"][0]["token_ids"] =
                        json!(tokens.iter().flat_map(|t| t.token_ids.iter()).collect::<Vec<_>>());
                }
                meta.finish(200);
                return Json(body).into_response();
            }
        }
    }
}

async fn models(State(state): State<Arc<ApiState>>) -> Json<serde_json::Value> {
    let data: Vec<_> = state
        .pool
        .config()
        .models
        .iter()
        .map(|m| json!({"id": m.name, "object": "model", "created": 0, "owned_by": "mlx-serving"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn ready(State(state): State<Arc<ApiState>>) -> Response {
    let config = state.pool.config();
    let model = state.config.default_model.clone().or_else(|| config.models.first().map(|m| m.name.clone()));
    let status = state.pool.status();
    let ready = status
        .workers
        .iter()
        .filter(|w| {
            w.state == WorkerState::Ready && model.as_ref().is_none_or(|m| w.models.iter().any(|x| &x.name == m))
        })
        .count();
    let ok = ready >= state.config.min_ready_workers.max(1) && !status.shutting_down;
    let code = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (
        code,
        Json(json!({"ready": ok, "ready_workers": ready, "required": state.config.min_ready_workers, "model": model})),
    )
        .into_response()
}

async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}
