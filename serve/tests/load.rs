//! A bounded load test on loopback: 200 requests from 16 clients against a server that
//! decodes 4 at a time and queues 8 more. Every request is answered in full or refused with
//! an OpenAI-style error (429 with Retry-After when busy), and memory is flat afterwards.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use reference::rng::Rng;
use serve::loadgen::{completion_body, post_stream, rss_bytes, Outcome};
use serve::{router, App, ServeOptions};

fn start() -> (Arc<App>, SocketAddr, tokio::runtime::Runtime) {
    let opts = ServeOptions {
        model_name: Some("tiny".into()),
        threads: 1,
        max_concurrent: 4,
        max_queue: 8,
        ..ServeOptions::new(&fixtures::tiny_checkpoint())
    };
    let app = App::load(opts).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let r = router(Arc::clone(&app));
    rt.spawn(async move { axum::serve(listener, r).await });
    (app, addr, rt)
}

/// `total` requests from `clients` threads: mostly streamed completions of 1..=32 tokens,
/// every tenth one malformed JSON.
fn round(addr: SocketAddr, clients: usize, total: usize, seed: u64) -> Vec<Outcome> {
    let next = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let next = Arc::clone(&next);
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed + c as u64);
                let mut out = Vec::new();
                while next.fetch_add(1, Ordering::SeqCst) < total {
                    let n = out.len();
                    let body = if (c + n) % 10 == 9 {
                        "{\"model\": \"tiny\", \"prompt\": ".to_string()
                    } else {
                        let max = 1 + (rng.next_u64() % 32) as usize;
                        completion_body("tiny", "The horse", max)
                    };
                    let o = post_stream(addr, "/v1/completions", &body, None).unwrap();
                    if o.status == 429 {
                        // A polite client backs off (Retry-After says 1 s; a short pause
                        // keeps the test quick).
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    out.push(o);
                }
                out
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

#[test]
fn two_hundred_requests_from_sixteen_clients_are_answered_or_refused_cleanly() {
    let (app, addr, _rt) = start();
    round(addr, 16, 48, 1);
    let rss_before = rss_bytes();
    let outcomes = round(addr, 16, 200, 100);
    let rss_after = rss_bytes();
    assert_eq!(outcomes.len(), 200);
    for o in &outcomes {
        assert!(o.clean(), "unclean: {o:?}");
    }
    let count = |s: u16| outcomes.iter().filter(|o| o.status == s).count();
    let (ok, busy, bad) = (count(200), count(429), count(400));
    assert_eq!(ok + busy + bad, 200, "other statuses");
    assert!(ok > 0 && bad > 0, "ok {ok}, 429 {busy}, 400 {bad}");
    for o in outcomes.iter().filter(|o| o.status == 200) {
        assert!((1..=32).contains(&o.completion_tokens), "{o:?}");
    }
    assert_eq!(
        app.metrics.in_flight.load(Ordering::SeqCst),
        0,
        "requests left in flight"
    );
    let grew = rss_after.saturating_sub(rss_before);
    assert!(grew < 16 << 20, "RSS grew by {} MiB", grew >> 20);
    eprintln!(
        "load: {ok} answered, {busy} refused busy, {bad} malformed; RSS {} -> {} MiB",
        rss_before >> 20,
        rss_after >> 20
    );
}
