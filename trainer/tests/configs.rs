//! Every bundled run config parses and validates, and the DeepSpeed example applies to them.

use trainer::train::deepspeed::{apply_deepspeed, DsConfig, Precision};
use trainer::train::run_config::{preset, RunConfig, ScheduleKind};

fn configs_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs")
}

#[test]
fn bundled_configs_parse_and_name_their_presets() {
    for name in ["quickstart", "tiny", "130m", "370m", "1.4b-hf", "1.3b-ln"] {
        let cfg = RunConfig::load(&configs_dir().join(format!("{name}.toml"))).unwrap();
        assert_eq!(cfg.model.preset.as_deref(), Some(name), "{name}.toml");
        preset(name).unwrap();
    }
    let ln = RunConfig::load(&configs_dir().join("1.3b-ln.toml")).unwrap();
    assert_eq!(ln.optim.precision, Precision::Fp16);
}

#[test]
fn the_deepspeed_example_keeps_auto_values_and_sets_the_rest() {
    let ds = DsConfig::load(&configs_dir().join("ds_config.json")).unwrap();
    let mut cfg = RunConfig::load(&configs_dir().join("1.4b-hf.toml")).unwrap();
    let before = cfg.clone();
    let unsupported = apply_deepspeed(&mut cfg, &ds).unwrap();
    // ZeRO stage 1 acts only in a distributed run: one process reports it.
    assert_eq!(unsupported, vec!["zero_optimization.stage"]);
    assert_eq!(
        cfg.train.batch, before.train.batch,
        "auto micro batch keeps the TOML's"
    );
    assert_eq!(cfg.train.grad_accum, 4);
    assert_eq!(cfg.optim.lr, before.optim.lr, "auto lr keeps the TOML's");
    assert_eq!(cfg.optim.schedule, ScheduleKind::WarmupDecay);
    assert_eq!(cfg.optim.min_lr, 0.0);
    assert_eq!(
        cfg.optim.precision,
        Precision::Bf16,
        "auto precision keeps the TOML's"
    );
    assert!(cfg.optim.loss_scale.is_some());
}
