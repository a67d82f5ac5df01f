//! # vet-serve — a Vet-Mamba model behind an OpenAI-compatible HTTP API
//!
//! `POST /v1/chat/completions` and `POST /v1/completions` (streaming by server-sent events
//! or not), `GET /v1/models`, `/health`, `/metrics` (Prometheus text) and a chat page at `/`.
//! Built on axum and tokio; the model runs on one decode thread ([`sched`]) that batches
//! every active request into one engine step, and keeps the states of recent conversations
//! ([`cache`]) so a follow-up question prefills only its new tokens.

pub mod api;
pub mod cache;
pub mod error;
pub mod handlers;
pub mod loadgen;
pub mod metrics;
pub mod rows;
pub mod sched;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use reference::MambaConfig;
use tokenizers::Tokenizer;
use trainer::data::qa::QaTemplate;
use trainer::device::{self, EngineOptions, WeightDtype};
use trainer::tokenizer::{self, EOT};

pub use handlers::router;
use metrics::Metrics;
use sched::{Scheduler, SchedulerOptions};

/// How to load the model and what to allow.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Checkpoint directory (config.json, model.safetensors, tokenizer.json).
    pub model: PathBuf,
    /// The model id clients name (default: the directory's name).
    pub model_name: Option<String>,
    /// `cpu`, `reference`, `cuda` or `cuda:N`.
    pub device: String,
    pub dtype: WeightDtype,
    /// CPU worker threads (0 = every core).
    pub threads: usize,
    /// Requests must send `Authorization: Bearer <key>` (the page and `/health` excepted).
    pub api_key: Option<String>,
    /// Sequences decoded together.
    pub max_concurrent: usize,
    /// Requests waiting beyond `max_concurrent` before 429.
    pub max_queue: usize,
    /// The state cache's budget in MiB (0 = off).
    pub state_cache_mb: usize,
    /// Prompt tokens plus `max_tokens` may not exceed this.
    pub max_context: usize,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// `temperature` when a request gives none (0 = greedy, as vet-chat).
    pub default_temperature: f64,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
}

impl ServeOptions {
    /// The defaults for the checkpoint in `model`.
    pub fn new(model: &Path) -> ServeOptions {
        ServeOptions {
            model: model.to_path_buf(),
            model_name: None,
            device: "cpu".into(),
            dtype: WeightDtype::F32,
            threads: 0,
            api_key: None,
            max_concurrent: 8,
            max_queue: 64,
            state_cache_mb: 256,
            max_context: 4096,
            default_max_tokens: 256,
            default_temperature: 0.0,
            max_body_bytes: 1 << 20,
        }
    }
}

/// Everything the handlers share.
pub struct App {
    pub model_name: String,
    pub tok: Arc<Tokenizer>,
    pub template: QaTemplate,
    pub eot: Option<u32>,
    pub vocab: usize,
    pub opts: ServeOptions,
    pub sched: Scheduler,
    pub metrics: Arc<Metrics>,
    /// Response ids.
    pub next_id: AtomicU64,
    /// Unix seconds at start (`created` of the model).
    pub started: u64,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl App {
    /// Loads the checkpoint and starts the decode thread.
    pub fn load(opts: ServeOptions) -> Result<Arc<App>> {
        let dir = opts.model.clone();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            if !dir.join(f).is_file() {
                bail!("model {}: {f} is missing", dir.display());
            }
        }
        if opts.max_concurrent == 0 {
            bail!("--max-concurrent must be at least 1");
        }
        let cfg = MambaConfig::load(&dir.join("config.json"))
            .with_context(|| format!("reading {}", dir.join("config.json").display()))?;
        let tok = Arc::new(tokenizer::load(
            &dir.join("tokenizer.json"),
            cfg.vocab_size,
        )?);
        let metrics = Arc::new(Metrics::default());
        let eopts = EngineOptions {
            threads: opts.threads,
            dtype: opts.dtype,
            ..EngineOptions::default()
        };
        let (d, dev) = (dir.clone(), opts.device.clone());
        let sched = Scheduler::start(
            move || {
                let (engine, _) = device::load_for_inference(&d, &dev, &eopts)
                    .with_context(|| format!("loading {} on {dev}", d.display()))?;
                Ok(engine)
            },
            Arc::clone(&tok),
            SchedulerOptions {
                max_concurrent: opts.max_concurrent,
                max_queue: opts.max_queue,
                cache_bytes: opts.state_cache_mb << 20,
            },
            Arc::clone(&metrics),
        )?;
        let model_name = opts.model_name.clone().unwrap_or_else(|| {
            dir.canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "vet-mamba".into())
        });
        Ok(Arc::new(App {
            model_name,
            eot: tok.token_to_id(EOT),
            tok,
            template: QaTemplate::default(),
            vocab: cfg.vocab_size,
            opts,
            sched,
            metrics,
            next_id: AtomicU64::new(1),
            started: unix_now(),
        }))
    }
}
