//! Shared by the integration tests: a server on `fixtures/tiny` called in process (tower's
//! `oneshot`), and small JSON helpers.

#![allow(dead_code)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::Value;
use serve::{router, App, ServeOptions};
use tower::ServiceExt;

pub const MODEL: &str = "tiny";

/// The options every test starts from: the tiny checkpoint, one CPU thread.
pub fn options() -> ServeOptions {
    ServeOptions {
        model_name: Some(MODEL.into()),
        threads: 1,
        ..ServeOptions::new(&fixtures::tiny_checkpoint())
    }
}

pub fn app(opts: ServeOptions) -> (Arc<App>, Router) {
    let app = App::load(opts).expect("loading the tiny checkpoint");
    let r = router(Arc::clone(&app));
    (app, r)
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `error` object of an OpenAI-style error body.
    pub fn error(&self) -> Value {
        let v = self.json();
        let e = v["error"].clone();
        assert!(e["message"].is_string(), "no error.message in {v}");
        assert!(e["type"].is_string(), "no error.type in {v}");
        e
    }
}

pub async fn send(r: &Router, method: &str, path: &str, body: &str, key: Option<&str>) -> Reply {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let resp = r
        .clone()
        .oneshot(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

pub async fn post(r: &Router, path: &str, body: Value) -> Reply {
    send(r, "POST", path, &body.to_string(), None).await
}

/// A greedy chat request body.
pub fn chat_body(messages: &[(&str, &str)], max_tokens: u64) -> Value {
    let msgs: Vec<Value> = messages
        .iter()
        .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
        .collect();
    serde_json::json!({"model": MODEL, "messages": msgs, "max_tokens": max_tokens, "temperature": 0})
}

/// The answer text of a non-streamed chat reply.
pub fn content(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content in {v}"))
        .to_string()
}

/// The JSON payloads of an SSE body, `[DONE]` excluded; panics unless it ends with it.
pub fn sse_events(body: &str) -> Vec<Value> {
    assert!(
        body.trim_end().ends_with("data: [DONE]"),
        "the stream does not end with [DONE]: {body:?}"
    );
    body.split("\n\n")
        .filter_map(|b| b.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
        .collect()
}

/// A metric's value from `/metrics`.
pub async fn metric(r: &Router, name: &str) -> f64 {
    let m = send(r, "GET", "/metrics", "", None).await;
    metric_in(&m.body, name)
}

pub fn metric_in(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("vet_serve_{name} ")))
        .unwrap_or_else(|| panic!("no metric {name} in {text}"))
        .trim()
        .parse()
        .unwrap()
}
