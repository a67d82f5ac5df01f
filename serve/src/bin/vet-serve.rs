//! `vet-serve`: a Vet-Mamba checkpoint behind an OpenAI-compatible HTTP API and a chat page.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serve::{router, App, ServeOptions};
use trainer::device::WeightDtype;

#[derive(Parser)]
#[command(
    name = "vet-serve",
    version,
    about = "Serve a Vet-Mamba checkpoint: OpenAI-compatible API (/v1/chat/completions, \
        /v1/completions, /v1/models), /health, /metrics and a chat page at /"
)]
struct Cli {
    /// Checkpoint directory: config.json + model.safetensors + tokenizer.json.
    #[arg(long)]
    model: PathBuf,
    /// The model id clients send (default: the directory's name).
    #[arg(long)]
    model_name: Option<String>,
    /// cpu (the simd tier), reference, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weight storage: f32, bf16, int8 or int4 on --device cpu; int8 on cuda. Default: the
    /// checkpoint's own (int8 / int4 from `vet-train quantize`), else f32.
    #[arg(long)]
    dtype: Option<WeightDtype>,
    /// CPU worker threads (0 = every core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Address to listen on. Anything but loopback requires --api-key.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Requests must send `Authorization: Bearer KEY` (the page and /health excepted).
    #[arg(long)]
    api_key: Option<String>,
    /// Sequences decoded together in one batch.
    #[arg(long, default_value_t = 8)]
    max_concurrent: usize,
    /// Requests that may wait beyond --max-concurrent; past that, 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Memory for kept conversation states, in MiB (0 = no cache).
    #[arg(long, default_value_t = 256)]
    state_cache_mb: usize,
    /// Prompt tokens plus max_tokens may not exceed this.
    #[arg(long, default_value_t = 4096)]
    max_context: usize,
    /// max_tokens when a request gives none.
    #[arg(long, default_value_t = 256)]
    default_max_tokens: usize,
    /// temperature when a request gives none (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    default_temperature: f64,
    /// Largest request body, in KiB.
    #[arg(long, default_value_t = 1024)]
    max_body_kb: usize,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if !cli.host.is_loopback() && cli.api_key.as_deref().is_none_or(str::is_empty) {
        bail!(
            "--host {}: listening beyond this machine requires --api-key",
            cli.host
        );
    }
    let dtype = cli
        .dtype
        .unwrap_or_else(|| trainer::device::checkpoint_dtype(&cli.model, &cli.device));
    let opts = ServeOptions {
        model_name: cli.model_name,
        device: cli.device,
        dtype,
        threads: cli.threads,
        api_key: cli.api_key.filter(|k| !k.is_empty()),
        max_concurrent: cli.max_concurrent,
        max_queue: cli.max_queue,
        state_cache_mb: cli.state_cache_mb,
        max_context: cli.max_context,
        default_max_tokens: cli.default_max_tokens,
        default_temperature: cli.default_temperature,
        max_body_bytes: cli.max_body_kb << 10,
        ..ServeOptions::new(&cli.model)
    };
    let app = App::load(opts).with_context(|| format!("loading {}", cli.model.display()))?;
    let addr = SocketAddr::new(cli.host, cli.port);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        eprintln!(
            "vet-serve: model {} on http://{addr}/ (API at http://{addr}/v1, max {} at once)",
            app.model_name, app.opts.max_concurrent
        );
        axum::serve(listener, router(app))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("serving")
    })
}
