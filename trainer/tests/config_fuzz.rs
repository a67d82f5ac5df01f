//! Damaged run configs and DeepSpeed configs never panic (issue 18): seeded random mutations
//! (byte flips, truncation, inserted tokens, values swapped for other types) of valid files
//! give `Ok` or an error, through parsing, validation and applying the DeepSpeed values.

use std::panic::{catch_unwind, AssertUnwindSafe};

use reference::rng::Rng;
use trainer::train::deepspeed::{apply_deepspeed, DsConfig};
use trainer::train::run_config::RunConfig;

const RUN_TOML: &str = r#"
stage = "pretrain"
out_dir = "runs/fuzz"
[model]
preset = "tiny"
[data]
manifest = "runs/data/manifest.json"
tokenizer = "fixtures/tokenizer/tokenizer.json"
[train]
batch = 8
seq_len = 256
grad_accum = 2
steps = 2000
seed = 3
[optim]
lr = 2e-3
min_lr = 2e-4
schedule = "warmup_decay"
warmup_steps = 100
betas = [0.9, 0.95]
eps = 1e-8
weight_decay = 0.1
grad_clip = 1.0
precision = "f32"
[checkpoint]
every = 500
keep_last = 3
[eval]
every = 250
batches = 4
"#;

const DS_FULL: &str = r#"{
  "train_batch_size": 16,
  "train_micro_batch_size_per_gpu": 8,
  "gradient_accumulation_steps": 2,
  "gradient_clipping": 1.0,
  "fp16": {"enabled": false, "loss_scale": 0, "initial_scale_power": 16,
           "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
  "bf16": {"enabled": false},
  "optimizer": {"type": "AdamW", "params": {"lr": 0.001, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}},
  "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.001, "warmup_num_steps": 10, "total_num_steps": 100}},
  "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}
}"#;

/// Tokens that stress a parser or a validator: other types, huge, negative and odd numbers,
/// brackets, section headers.
const TOKENS: &[&str] = &[
    "\"",
    "[",
    "]",
    "{",
    "}",
    "=",
    ",",
    ":",
    "-1",
    "0",
    "-0.0",
    "1e400",
    "nan",
    "inf",
    "-inf",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "4294967296",
    "1e-300",
    "\"auto\"",
    "true",
    "null",
    "[]",
    "{}",
    "\"\"",
    "\n[train]\n",
    "\n[[x]]\n",
    "\"\\u0000\"",
    "0.5",
    "\"x\"",
    "1e30",
    "[1, \"a\"]",
    "\n",
    "#",
];

fn mutate(rng: &mut Rng, text: &str) -> String {
    let mut b = text.as_bytes().to_vec();
    for _ in 0..=rng.below(3) {
        let at = rng.below(b.len() as u64 + 1) as usize;
        let token = TOKENS[rng.below(TOKENS.len() as u64) as usize].as_bytes();
        match rng.below(4) {
            0 if at < b.len() => b[at] ^= 1 + rng.below(255) as u8,
            1 => b.truncate(at),
            2 => drop(b.splice(at..at, token.iter().copied())),
            _ => {
                // Swap the value after a `=` / `:` for a token of another type.
                let Some(sep) = b.iter().skip(at).position(|&c| c == b'=' || c == b':') else {
                    continue;
                };
                let start = at + sep + 1;
                let end = b[start..]
                    .iter()
                    .position(|&c| c == b'\n' || c == b',' || c == b'}')
                    .map_or(b.len(), |e| start + e);
                b.splice(start..end, token.iter().copied());
            }
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

/// Parses, validates and applies; whatever comes back is fine, a panic is not. Returns
/// whether both files parsed (so the test can check that validation was reached).
fn exercise(toml: &str, ds: &str) -> bool {
    let Ok(mut cfg) = RunConfig::parse(toml) else {
        return false;
    };
    let _ = cfg.validate();
    let _ = cfg.to_toml();
    let Ok(ds) = DsConfig::parse(ds) else {
        return false;
    };
    if apply_deepspeed(&mut cfg, &ds).is_ok() {
        let _ = cfg.validate();
    }
    true
}

#[test]
fn damaged_run_and_deepspeed_configs_are_errors_never_panics() {
    assert!(RunConfig::parse(RUN_TOML).unwrap().validate().is_ok());
    let ds_bundled = include_str!("../configs/ds_config.json");
    let mut cfg = RunConfig::parse(RUN_TOML).unwrap();
    apply_deepspeed(&mut cfg, &DsConfig::parse(DS_FULL).unwrap()).unwrap();
    let (mut panics, mut parsed) = (Vec::new(), 0);
    std::panic::set_hook(Box::new(|_| {}));
    for case in 0..6000u64 {
        let mut rng = Rng::stream(case, "config-fuzz");
        let (toml, ds) = match case % 3 {
            0 => (mutate(&mut rng, RUN_TOML), DS_FULL.to_string()),
            1 => (RUN_TOML.to_string(), mutate(&mut rng, DS_FULL)),
            _ => (RUN_TOML.to_string(), mutate(&mut rng, ds_bundled)),
        };
        match catch_unwind(AssertUnwindSafe(|| exercise(&toml, &ds))) {
            Ok(ok) => parsed += usize::from(ok),
            Err(p) => {
                let why = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panics.push(format!("case {case}: {why}\n{toml}\n{ds}"));
            }
        }
    }
    let _ = std::panic::take_hook();
    // Enough mutants still parse for the validators and apply_deepspeed to be exercised.
    assert!(parsed > 600, "only {parsed} of 6000 mutants parsed");
    assert!(
        panics.is_empty(),
        "{} panics; first: {}",
        panics.len(),
        panics[0]
    );
}
