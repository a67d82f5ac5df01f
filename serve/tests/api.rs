//! The OpenAI-compatible API on `fixtures/tiny`, in process: the shapes of good answers, and an
//! OpenAI-style 4xx for each kind of bad input, after which the server still answers.

mod common;

use axum::http::StatusCode;
use common::*;
use serde_json::json;
use serve::ServeOptions;
use trainer::tokenizer::{encode_templated, QA_TEMPLATE};

#[tokio::test]
async fn a_chat_answer_has_openai_shape_and_real_usage() {
    let (app, r) = app(options());
    let reply = post(
        &r,
        "/v1/chat/completions",
        chat_body(&[("user", "Why do dogs pant?")], 12),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let v = reply.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let want_prompt = encode_templated(&app.tok, QA_TEMPLATE, "Why do dogs pant?")
        .unwrap()
        .len();
    assert_eq!(v["usage"]["prompt_tokens"], want_prompt as u64);
    let completion = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&completion), "{v}");
    assert_eq!(v["usage"]["total_tokens"], want_prompt as u64 + completion);
    let finish = v["choices"][0]["finish_reason"].as_str().unwrap();
    assert_eq!(finish == "length", completion == 12, "{v}");
    assert!(metric(&r, "generated_tokens_total").await >= completion as f64);
}

#[tokio::test]
async fn a_streamed_answer_equals_the_whole_one_and_ends_with_done() {
    let (_app, r) = app(options());
    let q = [("user", "How often should a cat be vaccinated?")];
    let whole = content(
        &post(&r, "/v1/chat/completions", chat_body(&q, 20))
            .await
            .json(),
    );
    let mut body = chat_body(&q, 20);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let reply = post(&r, "/v1/chat/completions", body).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = sse_events(&reply.body);
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, whole);
    assert!(events
        .iter()
        .any(|e| e["choices"][0]["finish_reason"].is_string()));
    let usage = &events.last().unwrap()["usage"];
    assert!(usage["completion_tokens"].as_u64().unwrap() >= 1, "{usage}");
}

#[tokio::test]
async fn completions_stop_strings_and_max_tokens() {
    let (_app, r) = app(options());
    let body = json!({"model": MODEL, "prompt": "The dog", "max_tokens": 16, "temperature": 0});
    let v = post(&r, "/v1/completions", body.clone()).await.json();
    assert_eq!(v["object"], "text_completion");
    let full = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 16);
    // A stop string from the middle of the greedy answer cuts it there.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 4, "answer too short to cut: {full:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = &full[..full.find(&stop).unwrap()];
    let mut with_stop = body.clone();
    with_stop["stop"] = json!([stop]);
    let v = post(&r, "/v1/completions", with_stop.clone()).await.json();
    assert_eq!(v["choices"][0]["text"], cut, "stop {stop:?} in {full:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // Streamed, the same cut.
    with_stop["stream"] = json!(true);
    let reply = post(&r, "/v1/completions", with_stop).await;
    let text: String = sse_events(&reply.body)
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, cut);
}

#[tokio::test]
async fn models_health_metrics_and_the_page() {
    let (_app, r) = app(options());
    let v = send(&r, "GET", "/v1/models", "", None).await.json();
    assert_eq!(v["data"][0]["id"], MODEL);
    assert_eq!(
        send(&r, "GET", "/health", "", None).await.json()["status"],
        "ok"
    );
    let m = send(&r, "GET", "/metrics", "", None).await;
    for name in [
        "queue_length",
        "tokens_per_second",
        "state_cache_hit_rate",
        "errors_total",
    ] {
        metric_in(&m.body, name);
    }
    assert!(m
        .body
        .contains("vet_serve_requests_total{endpoint=\"chat\"} 0"));
    let page = send(&r, "GET", "/", "", None).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains(">tiny<"), "model name missing");
    assert!(page.body.contains("not clinical advice"));
    assert!(
        !page.body.contains("http://") && !page.body.contains("https://"),
        "external fetch"
    );
}

/// One bad request: its status, `param` (None: not checked) and a word of its message.
async fn refused(
    r: &axum::Router,
    path: &str,
    body: &str,
    status: u16,
    param: Option<&str>,
    says: &str,
) {
    let reply = send(r, "POST", path, body, None).await;
    assert_eq!(reply.status.as_u16(), status, "{body} -> {}", reply.body);
    let e = reply.error();
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{body} -> {e}");
    }
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains(says), "{body} -> {msg:?} lacks {says:?}");
}

#[tokio::test]
async fn every_bad_input_gets_an_openai_error_and_the_server_goes_on() {
    let opts = ServeOptions {
        max_body_bytes: 4096,
        max_context: 64,
        ..options()
    };
    let (_app, r) = app(opts);
    let chat = "/v1/chat/completions";
    let ok_msgs = r#""messages": [{"role": "user", "content": "hi"}]"#;
    refused(
        &r,
        chat,
        "{\"model\": \"tiny\", ",
        400,
        None,
        "not valid JSON",
    )
    .await;
    refused(&r, chat, "[1, 2]", 400, None, "Bad request body").await;
    refused(
        &r,
        chat,
        &format!(r#"{{"model": "tiny", {ok_msgs}, "max_tokens": "ten"}}"#),
        400,
        Some("max_tokens"),
        "invalid type",
    )
    .await;
    refused(
        &r,
        chat,
        r#"{"model": "tiny", "messages": "hi"}"#,
        400,
        Some("messages"),
        "invalid type",
    )
    .await;
    refused(
        &r,
        chat,
        r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
        400,
        None,
        "model",
    )
    .await;
    refused(
        &r,
        chat,
        &format!(r#"{{"model": "gpt-4", {ok_msgs}}}"#),
        404,
        Some("model"),
        "gpt-4",
    )
    .await;
    refused(
        &r,
        chat,
        r#"{"model": "tiny", "messages": []}"#,
        400,
        Some("messages"),
        "empty",
    )
    .await;
    refused(
        &r,
        chat,
        r#"{"model": "tiny", "messages": [{"role": "user", "content": "  "}]}"#,
        400,
        Some("messages[0].content"),
        "empty",
    )
    .await;
    refused(
        &r,
        chat,
        r#"{"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}"#,
        400,
        Some("messages[0].role"),
        "wizard",
    )
    .await;
    refused(
        &r,
        chat,
        r#"{"model": "tiny", "messages": [{"role": "user", "content": 5}]}"#,
        400,
        Some("messages[0].content"),
        "string",
    )
    .await;
    refused(
        &r,
        chat,
        r#"{"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]}"#,
        400,
        Some("messages"),
        "last message",
    )
    .await;
    refused(
        &r,
        chat,
        &format!(r#"{{"model": "tiny", {ok_msgs}, "n": 2}}"#),
        400,
        Some("n"),
        "n = 1",
    )
    .await;
    refused(
        &r,
        chat,
        &format!(r#"{{"model": "tiny", {ok_msgs}, "temperature": 7}}"#),
        400,
        Some("temperature"),
        "between 0 and 2",
    )
    .await;
    refused(
        &r,
        chat,
        &format!(r#"{{"model": "tiny", {ok_msgs}, "top_p": 0}}"#),
        400,
        Some("top_p"),
        "top_p",
    )
    .await;
    refused(
        &r,
        chat,
        &format!(r#"{{"model": "tiny", {ok_msgs}, "max_tokens": 0}}"#),
        400,
        Some("max_tokens"),
        "at least 1",
    )
    .await;
    refused(
        &r,
        chat,
        &format!(r#"{{"model": "tiny", {ok_msgs}, "stop": ["a","b","c","d","e"]}}"#),
        400,
        Some("stop"),
        "at most 4",
    )
    .await;
    refused(
        &r,
        chat,
        &format!(r#"{{"model": "tiny", {ok_msgs}, "max_tokens": 100}}"#),
        400,
        Some("max_tokens"),
        "limit of 64",
    )
    .await;
    let long = "why ".repeat(200);
    refused(
        &r,
        chat,
        &format!(r#"{{"model": "tiny", "messages": [{{"role": "user", "content": "{long}"}}]}}"#),
        400,
        None,
        "limit of 64",
    )
    .await;
    let huge = "x".repeat(8000);
    refused(
        &r,
        chat,
        &format!(r#"{{"model": "tiny", "messages": [{{"role": "user", "content": "{huge}"}}]}}"#),
        413,
        None,
        "4096 bytes",
    )
    .await;
    let text = "/v1/completions";
    refused(
        &r,
        text,
        r#"{"model": "tiny", "prompt": ""}"#,
        400,
        Some("prompt"),
        "empty",
    )
    .await;
    refused(
        &r,
        text,
        r#"{"model": "tiny", "prompt": ["a", "b"]}"#,
        400,
        Some("prompt"),
        "several",
    )
    .await;
    refused(
        &r,
        text,
        r#"{"model": "tiny", "prompt": [1, 99999999]}"#,
        400,
        Some("prompt"),
        "vocabulary",
    )
    .await;
    refused(
        &r,
        text,
        r#"{"model": "tiny", "prompt": {"a": 1}}"#,
        400,
        Some("prompt"),
        "string",
    )
    .await;
    let nowhere = send(&r, "GET", "/v1/nowhere", "", None).await;
    assert_eq!(nowhere.status, StatusCode::NOT_FOUND);
    nowhere.error();
    let wrong_method = send(&r, "GET", chat, "", None).await;
    assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
    wrong_method.error();
    // The server still answers, and counted the errors.
    let ok = post(&r, chat, chat_body(&[("user", "hi")], 4)).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    assert!(metric(&r, "errors_total").await >= 25.0);
}

#[tokio::test]
async fn an_api_key_guards_the_api_but_not_the_page_or_health() {
    let (_app, r) = app(ServeOptions {
        api_key: Some("s3cret".into()),
        ..options()
    });
    let body = chat_body(&[("user", "hi")], 2).to_string();
    for key in [None, Some("wrong"), Some("")] {
        let reply = send(&r, "POST", "/v1/chat/completions", &body, key).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "key {key:?}");
        assert_eq!(reply.error()["code"], "invalid_api_key");
    }
    assert_eq!(
        send(&r, "GET", "/v1/models", "", None).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(&r, "GET", "/metrics", "", None).await.status,
        StatusCode::UNAUTHORIZED
    );
    let ok = send(&r, "POST", "/v1/chat/completions", &body, Some("s3cret")).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    assert_eq!(
        send(&r, "GET", "/health", "", None).await.status,
        StatusCode::OK
    );
    assert_eq!(send(&r, "GET", "/", "", None).await.status, StatusCode::OK);
}
