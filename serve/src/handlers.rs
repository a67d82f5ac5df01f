//! The HTTP side: routes, the API-key check, request handling and the SSE streams.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use trainer::generate::Sampling;

use crate::api::{self, ChatRequest, CompletionRequest, Settings};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::sched::{Done, Event, Job};
use crate::{unix_now, App};

/// Every route of the server.
pub fn router(app: Arc<App>) -> Router {
    let guarded = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&app), auth));
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .merge(guarded)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(app.opts.max_body_bytes))
        .with_state(app)
}

async fn auth(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(key) = &app.opts.api_key {
        let sent = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if sent.map(str::trim) != Some(key.as_str()) {
            Metrics::inc(&app.metrics.errors);
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

async fn not_found(State(app): State<Arc<App>>, uri: Uri) -> ApiError {
    Metrics::inc(&app.metrics.errors);
    ApiError::not_found(uri.path())
}

async fn method_not_allowed(State(app): State<Arc<App>>) -> ApiError {
    Metrics::inc(&app.metrics.errors);
    ApiError::method_not_allowed()
}

async fn page(State(app): State<Arc<App>>) -> Html<String> {
    let escaped = app
        .model_name
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;");
    Html(
        include_str!("page.html")
            .replace("{{MODEL}}", &escaped)
            .replace(
                "{{KEY_REQUIRED}}",
                if app.opts.api_key.is_some() {
                    "true"
                } else {
                    "false"
                },
            ),
    )
}

async fn health(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({"status": "ok", "model": app.model_name}))
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": app.model_name, "object": "model", "created": app.started, "owned_by": "vet-mamba",
    }]}))
}

/// Which endpoint a request came through (the response shapes differ).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

async fn chat(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    Metrics::inc(&app.metrics.requests_chat);
    let run = async {
        let bytes = body.map_err(|e| rejected(&app, e))?;
        let req: ChatRequest = api::parse(&bytes)?;
        let common = req.common();
        check_model(&app, &common.model)?;
        let set = api::settings(&common, app.opts.default_temperature)?;
        let prompt = api::render_chat(&app.tok, &app.template.prompt, app.eot, &req.messages)?;
        generate(&app, Kind::Chat, prompt, set).await
    };
    run.await.unwrap_or_else(|e| fail(&app, e))
}

async fn completions(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    Metrics::inc(&app.metrics.requests_completions);
    let run = async {
        let bytes = body.map_err(|e| rejected(&app, e))?;
        let req: CompletionRequest = api::parse(&bytes)?;
        let common = req.common();
        check_model(&app, &common.model)?;
        let set = api::settings(&common, app.opts.default_temperature)?;
        let prompt = api::render_prompt(&app.tok, app.vocab, &req.prompt)?;
        generate(&app, Kind::Text, prompt, set).await
    };
    run.await.unwrap_or_else(|e| fail(&app, e))
}

fn fail(app: &App, e: ApiError) -> Response {
    Metrics::inc(&app.metrics.errors);
    e.into_response()
}

fn rejected(app: &App, e: BytesRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(app.opts.max_body_bytes)
    } else {
        ApiError::invalid("", format!("Cannot read the request body: {e}"))
    }
}

fn check_model(app: &App, model: &str) -> Result<(), ApiError> {
    if model == app.model_name {
        Ok(())
    } else {
        Err(ApiError::unknown_model(model, &app.model_name))
    }
}

/// Checks the length limit, queues the job and answers (a stream or one JSON body).
async fn generate(
    app: &Arc<App>,
    kind: Kind,
    prompt: Vec<u32>,
    set: Settings,
) -> Result<Response, ApiError> {
    let limit = app.opts.max_context;
    let room = limit.saturating_sub(prompt.len());
    let max_new = match set.max_tokens {
        Some(m) if prompt.len() as u64 + m > limit as u64 => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "The prompt ({} tokens) plus `max_tokens` ({m}) is more than this server's limit of {limit} tokens",
                    prompt.len()
                ),
            )
            .with_code("context_length_exceeded"))
        }
        Some(m) => m as usize,
        None if room == 0 => {
            return Err(ApiError::invalid(
                "messages",
                format!("The prompt ({} tokens) fills this server's limit of {limit} tokens", prompt.len()),
            )
            .with_code("context_length_exceeded"))
        }
        None => app.opts.default_max_tokens.min(room),
    };
    let id = app.next_id.fetch_add(1, Ordering::Relaxed);
    let seed = set.seed.unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(0);
        nanos ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    });
    let (tx, rx) = unbounded_channel();
    let job = Job {
        prompt,
        sampling: Sampling {
            temperature: set.temperature,
            top_p: set.top_p,
            max_new_tokens: max_new,
            seed,
            ..Sampling::default()
        },
        stops: set.stops.clone(),
        keep_state: kind == Kind::Chat && !set.ignore_eos,
        ignore_eos: set.ignore_eos,
        events: tx,
    };
    if app.sched.submit(job).is_err() {
        Metrics::inc(&app.metrics.rejected_busy);
        return Err(ApiError::busy(1));
    }
    let meta = Meta {
        id: match kind {
            Kind::Chat => format!("chatcmpl-{id}"),
            Kind::Text => format!("cmpl-{id}"),
        },
        created: unix_now(),
        model: app.model_name.clone(),
        kind,
        include_usage: set.include_usage,
    };
    if set.stream {
        return Ok(Sse::new(sse_stream(meta, rx)).into_response());
    }
    collect(meta, rx).await.map(|v| Json(v).into_response())
}

/// What every response body repeats.
struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    include_usage: bool,
}

fn usage(d: &Done) -> Value {
    json!({
        "prompt_tokens": d.prompt_tokens,
        "completion_tokens": d.completion_tokens,
        "total_tokens": d.prompt_tokens + d.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": d.cached_tokens},
    })
}

/// Waits for the whole answer (a dropped future, a client gone, cancels it).
async fn collect(meta: Meta, mut rx: UnboundedReceiver<Event>) -> Result<Value, ApiError> {
    let mut text = String::new();
    let done = loop {
        match rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done(d)) => break d,
            Some(Event::Failed(e)) => return Err(ApiError::internal(e)),
            None => return Err(ApiError::internal("the decode loop stopped")),
        }
    };
    let choice = match meta.kind {
        Kind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": done.finish.name(),
            "logprobs": null,
        }),
        Kind::Text => json!({
            "index": 0, "text": text, "finish_reason": done.finish.name(), "logprobs": null,
        }),
    };
    Ok(json!({
        "id": meta.id,
        "object": if meta.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": meta.created,
        "model": meta.model,
        "choices": [choice],
        "usage": usage(&done),
    }))
}

impl Meta {
    /// One streamed chunk with `choices` (and `usage`, null unless given).
    fn chunk(&self, choices: Value, usage: Value) -> SseEvent {
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Text => "text_completion",
        };
        let v = json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": choices, "usage": usage,
        });
        SseEvent::default().data(v.to_string())
    }

    fn piece(&self, text: &str, finish: Option<&str>) -> SseEvent {
        let choice = match self.kind {
            Kind::Chat => {
                let delta = if finish.is_some() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null})
            }
            Kind::Text => {
                json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": null})
            }
        };
        self.chunk(json!([choice]), Value::Null)
    }

    /// The chunks after the last piece: the finish reason, the usage if asked, `[DONE]`.
    fn ending(&self, done: &Done) -> Vec<SseEvent> {
        let mut out = vec![self.piece("", Some(done.finish.name()))];
        if self.include_usage {
            out.push(self.chunk(json!([]), usage(done)));
        }
        out.push(SseEvent::default().data("[DONE]"));
        out
    }
}

/// The SSE body: a role chunk (chat), one chunk per text piece, the ending. Dropping it (the
/// client went away) drops the receiver, which cancels the generation.
fn sse_stream(
    meta: Meta,
    rx: UnboundedReceiver<Event>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let first = match meta.kind {
        Kind::Chat => {
            let c = json!([{"index": 0, "delta": {"role": "assistant", "content": ""},
                "finish_reason": null, "logprobs": null}]);
            vec![meta.chunk(c, Value::Null)]
        }
        Kind::Text => Vec::new(),
    };
    let rest = stream::unfold(Some((meta, rx)), |st| async move {
        let (meta, mut rx) = st?;
        match rx.recv().await {
            Some(Event::Text(t)) => {
                let ev = vec![meta.piece(&t, None)];
                Some((ev, Some((meta, rx))))
            }
            Some(Event::Done(d)) => Some((meta.ending(&d), None)),
            Some(Event::Failed(e)) => {
                let err = ApiError::internal(e).body().to_string();
                Some((
                    vec![
                        SseEvent::default().data(err),
                        SseEvent::default().data("[DONE]"),
                    ],
                    None,
                ))
            }
            None => None,
        }
    });
    stream::iter(first)
        .chain(rest.flat_map(stream::iter))
        .map(Ok)
}
