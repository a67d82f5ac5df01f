//! The concurrency measurement: total tokens/s and the median and p95 time to the first token
//! with 1, 4 and 16 concurrent clients, each sending streamed completions one after another
//! to an in-process vet-serve on loopback.
//!
//! `cargo run --release -p serve --example load -- --model fixtures/tiny`
//! `cargo run --release -p serve --example load -- --random 768,24` (a random-init model of
//! that d_model and depth, with the tiny checkpoint's tokenizer: Mamba-130m's shape but
//! that vocabulary)

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use serve::loadgen::{completion_body, post_stream, quantile};
use serve::{router, App, ServeOptions};

#[derive(Parser)]
struct Cli {
    /// Checkpoint directory.
    #[arg(long, required_unless_present = "random")]
    model: Option<PathBuf>,
    /// Instead: a random-init model `D_MODEL,N_LAYER` (written to a temporary directory).
    #[arg(long, value_delimiter = ',')]
    random: Option<Vec<usize>>,
    /// Concurrent clients, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    clients: Vec<usize>,
    /// Requests per client.
    #[arg(long, default_value_t = 4)]
    requests: usize,
    /// Tokens generated per request (ignore_eos: always that many).
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// CPU threads of the engine (0 = every core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[arg(long, default_value = "f32")]
    dtype: trainer::device::WeightDtype,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let max = cli.clients.iter().copied().max().unwrap_or(1);
    let tmp = tempfile::tempdir()?;
    let model = match (&cli.random, &cli.model) {
        (Some(shape), _) if shape.len() == 2 => random_model(tmp.path(), shape[0], shape[1])?,
        (None, Some(m)) => m.clone(),
        _ => anyhow::bail!("give --model DIR or --random D_MODEL,N_LAYER"),
    };
    let opts = ServeOptions {
        model_name: Some("bench".into()),
        threads: cli.threads,
        dtype: cli.dtype,
        max_concurrent: max,
        max_queue: max,
        ..ServeOptions::new(&model)
    };
    let app = App::load(opts).context("loading the model")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let r = router(Arc::clone(&app));
    rt.spawn(async move { axum::serve(listener, r).await });
    println!(
        "model {}, {} tokens per request, {} requests per client",
        model.display(),
        cli.max_tokens,
        cli.requests
    );
    println!("| clients | requests | tokens | wall s | tokens/s | TTFT median ms | TTFT p95 ms | mean batch |");
    println!("|---|---|---|---|---|---|---|---|");
    run(addr, 1, 1, &cli)?; // warm-up
    for &c in &cli.clients {
        let (steps0, rows0) = (steps(&app), rows(&app));
        let started = Instant::now();
        let outs = run(addr, c, cli.requests, &cli)?;
        let wall = started.elapsed().as_secs_f64();
        let tokens: u64 = outs.iter().map(|o| o.completion_tokens).sum();
        let mut ttft: Vec<f64> = outs
            .iter()
            .filter_map(|o| o.ttft)
            .map(|d| d.as_secs_f64() * 1e3)
            .collect();
        anyhow::ensure!(
            outs.iter().all(|o| o.status == 200 && o.done),
            "a request failed: {outs:?}"
        );
        let batch = (rows(&app) - rows0) as f64 / (steps(&app) - steps0).max(1) as f64;
        println!(
            "| {c} | {} | {tokens} | {wall:.2} | {:.1} | {:.1} | {:.1} | {batch:.2} |",
            outs.len(),
            tokens as f64 / wall,
            quantile(&mut ttft, 0.5),
            quantile(&mut ttft, 0.95)
        );
    }
    Ok(())
}

/// A random-init checkpoint (seed 0) of `d_model` x `n_layer` with the tiny tokenizer.
fn random_model(dir: &std::path::Path, d_model: usize, n_layer: usize) -> Result<PathBuf> {
    let tiny = fixtures::tiny_checkpoint();
    let vocab = reference::MambaConfig::load(&tiny.join("config.json"))?.vocab_size;
    let cfg = reference::MambaConfig::new(d_model, n_layer, vocab);
    let params = reference::init::init_params::<f32>(&cfg, 0);
    let out = dir.join(format!("random-{d_model}x{n_layer}"));
    trainer::checkpoint::save(&out, &cfg, &params, Some(&tiny.join("tokenizer.json")))?;
    Ok(out)
}

fn steps(app: &App) -> u64 {
    app.metrics
        .decode_steps
        .load(std::sync::atomic::Ordering::Relaxed)
}

fn rows(app: &App) -> u64 {
    app.metrics
        .decode_rows
        .load(std::sync::atomic::Ordering::Relaxed)
}

fn run(
    addr: SocketAddr,
    clients: usize,
    requests: usize,
    cli: &Cli,
) -> Result<Vec<serve::loadgen::Outcome>> {
    let body = completion_body("bench", "Rabbits need a diet", cli.max_tokens);
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || {
                (0..requests)
                    .map(|_| post_stream(addr, "/v1/completions", &body, None))
                    .collect::<std::io::Result<Vec<_>>>()
            })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.extend(
            h.join()
                .map_err(|_| anyhow::anyhow!("a client panicked"))??,
        );
    }
    Ok(out)
}
