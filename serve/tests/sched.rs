//! The decode loop: batched answers equal lone ones, the state cache changes nothing but the
//! work, the queue refuses cleanly past its bound, and a client that leaves stops its answer.

mod common;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use http_body_util::BodyExt;
use serde_json::json;
use serve::ServeOptions;
use tower::ServiceExt;

const QUESTIONS: [&str; 6] = [
    "How often should a puppy be vaccinated?",
    "What causes hairballs in cats?",
    "Is chocolate toxic to dogs?",
    "How do I trim a rabbit's nails?",
    "Why is my horse limping?",
    "What should a parrot eat?",
];

/// Request `i` of the mix: greedy chat questions (half of them streamed) and seeded sampled
/// completions, whose answers differ from one another, so a mix-up of rows would show.
fn request(i: usize) -> (&'static str, serde_json::Value) {
    let q = QUESTIONS[i % QUESTIONS.len()];
    if i < QUESTIONS.len() {
        let mut body = chat_body(&[("user", q)], 24);
        body["stream"] = json!(i.is_multiple_of(2));
        ("/v1/chat/completions", body)
    } else {
        let body = json!({"model": MODEL, "prompt": q, "max_tokens": 24, "temperature": 1.0,
            "seed": i, "stream": i % 2 == 1});
        ("/v1/completions", body)
    }
}

async fn answer(r: &axum::Router, i: usize) -> String {
    let (path, body) = request(i);
    let stream = body["stream"] == json!(true);
    let reply = post(r, path, body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    if !stream {
        let v = reply.json();
        let c = &v["choices"][0];
        return c["message"]["content"]
            .as_str()
            .or(c["text"].as_str())
            .unwrap()
            .to_string();
    }
    sse_events(&reply.body)
        .iter()
        .filter_map(|e| {
            let c = &e["choices"][0];
            c["delta"]["content"].as_str().or(c["text"].as_str())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn greedy_and_seeded_answers_under_concurrency_equal_answers_alone() {
    let n = 2 * QUESTIONS.len();
    let (_app, r) = app(ServeOptions {
        max_concurrent: n,
        ..options()
    });
    let mut alone = Vec::new();
    for i in 0..n {
        alone.push(answer(&r, i).await);
    }
    assert_eq!(
        metric(&r, "decode_batch_max").await,
        1.0,
        "lone requests were batched"
    );
    let distinct: std::collections::HashSet<_> = alone.iter().collect();
    assert!(
        distinct.len() >= n / 2,
        "too few distinct answers: {alone:?}"
    );
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let r = r.clone();
            tokio::spawn(async move { answer(&r, i).await })
        })
        .collect();
    let mut together = Vec::new();
    for t in tasks {
        together.push(t.await.unwrap());
    }
    assert_eq!(together, alone);
    let max_batch = metric(&r, "decode_batch_max").await;
    assert!(
        max_batch >= 2.0,
        "never decoded more than one sequence at a time"
    );
    eprintln!("largest decode batch: {max_batch}");
}

#[tokio::test]
async fn a_follow_up_answers_the_same_with_and_without_the_cache_and_skips_the_prefix() {
    let (_c, cached) = app(options());
    let (_n, plain) = app(ServeOptions {
        state_cache_mb: 0,
        ..options()
    });
    // An answer is cached only when its text re-encodes to the tokens drawn (sched.rs `keep`);
    // on the tiny model that holds for this question's greedy answer, not for every question's.
    let q1 = "What causes hairballs in cats?";
    let q2 = "And in an older cat?";
    let first = post(
        &cached,
        "/v1/chat/completions",
        chat_body(&[("user", q1)], 24),
    )
    .await
    .json();
    let a1 = content(&first);
    let turn1_tokens = first["usage"]["prompt_tokens"].as_u64().unwrap()
        + first["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(metric(&cached, "state_cache_entries").await, 1.0);
    let prefill_before = metric(&cached, "prefill_tokens_total").await;
    let follow = chat_body(&[("user", q1), ("assistant", &a1), ("user", q2)], 24);
    let hit = post(&cached, "/v1/chat/completions", follow.clone())
        .await
        .json();
    let miss = post(&plain, "/v1/chat/completions", follow).await.json();
    assert_eq!(
        content(&hit),
        content(&miss),
        "the cache changed the answer"
    );
    assert_eq!(
        hit["usage"]["prompt_tokens"],
        miss["usage"]["prompt_tokens"]
    );
    // The hit stood for turn one (its prompt, its answer and the end token, one more than
    // the tokens drawn when the answer did not end with it).
    let cached_tokens = hit["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let stopped = first["choices"][0]["finish_reason"] == "stop";
    assert_eq!(cached_tokens, turn1_tokens + u64::from(!stopped));
    assert_eq!(miss["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let prefilled = metric(&cached, "prefill_tokens_total").await - prefill_before;
    let prompt = hit["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        prefilled as u64,
        prompt - cached_tokens,
        "the hit did not skip the prefix"
    );
    assert_eq!(metric(&cached, "state_cache_hits_total").await, 1.0);
    assert_eq!(metric(&cached, "state_cache_hit_rate").await, 0.5);
    assert_eq!(metric(&plain, "state_cache_hits_total").await, 0.0);
}

/// A streamed request that would run for a long time; returns its response (headers sent).
async fn long_stream(r: &axum::Router) -> axum::response::Response {
    let body = json!({"model": MODEL, "prompt": "The cat", "max_tokens": 200000,
        "ignore_eos": true, "stream": true});
    let req = Request::builder()
        .method("POST")
        .uri("/v1/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    r.clone().oneshot(req).await.unwrap()
}

async fn wait_for(r: &axum::Router, name: &str, want: f64) {
    let start = Instant::now();
    loop {
        let got = metric(r, name).await;
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{name} stayed {got}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_and_a_client_that_leaves_cancels_its_answer() {
    let opts = ServeOptions {
        max_concurrent: 1,
        max_queue: 1,
        max_context: 1 << 20,
        ..options()
    };
    let (_app, r) = app(opts);
    let mut first = long_stream(&r).await;
    assert_eq!(first.status(), StatusCode::OK);
    // It is decoding: a first chunk arrives.
    let chunk = first.body_mut().frame().await.unwrap().unwrap();
    assert!(chunk.is_data());
    let second = long_stream(&r).await;
    assert_eq!(second.status(), StatusCode::OK, "the queue place");
    let third = long_stream(&r).await;
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(third.headers()["retry-after"], "1");
    let body = third.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "queue_full");
    assert_eq!(metric(&r, "queue_length").await, 1.0);
    // Both clients leave: the answer in progress stops, the waiting one never starts.
    drop(first);
    drop(second);
    wait_for(&r, "cancelled_total", 2.0).await;
    wait_for(&r, "queue_length", 0.0).await;
    let generated = metric(&r, "generated_tokens_total").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        metric(&r, "generated_tokens_total").await,
        generated,
        "still generating"
    );
    assert!(generated < 200000.0);
    let ok = post(&r, "/v1/chat/completions", chat_body(&[("user", "hi")], 3)).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
}
