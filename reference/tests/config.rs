//! `MambaConfig` reads Hugging Face and mamba_ssm `config.json`, rejects bad values naming the
//! key, and writes configs that read back equal.

use reference::{Error, MambaConfig, NormKind};

/// `state-spaces/mamba-130m-hf/config.json` as transformers wrote it (with its legacy keys).
const MAMBA_130M_HF: &str = r#"{
  "architectures": ["MambaForCausalLM"],
  "bos_token_id": 0,
  "conv_kernel": 4,
  "eos_token_id": 0,
  "expand": 2,
  "fused_add_norm": true,
  "hidden_act": "silu",
  "hidden_size": 768,
  "initializer_range": 0.1,
  "intermediate_size": 1536,
  "layer_norm_epsilon": 1e-05,
  "model_type": "mamba",
  "n_layer": 24,
  "num_hidden_layers": 24,
  "pad_token_id": 0,
  "pad_vocab_size_multiple": 8,
  "rescale_prenorm_residual": false,
  "residual_in_fp32": true,
  "rms_norm": true,
  "state_size": 16,
  "time_step_floor": 0.0001,
  "time_step_init_scheme": "random",
  "time_step_max": 0.1,
  "time_step_min": 0.001,
  "time_step_rank": 48,
  "time_step_scale": 1.0,
  "torch_dtype": "float32",
  "transformers_version": "4.39.0.dev0",
  "use_bias": false,
  "use_cache": true,
  "use_conv_bias": true,
  "vocab_size": 50280
}"#;

/// `state-spaces/mamba-130m/config.json` (mamba_ssm), switched to LayerNorm.
const MAMBA_130M_SSM_LAYERNORM: &str = r#"{
  "d_model": 768,
  "n_layer": 24,
  "vocab_size": 50277,
  "ssm_cfg": {},
  "rms_norm": false,
  "residual_in_fp32": true,
  "fused_add_norm": true,
  "pad_vocab_size_multiple": 8
}"#;

/// splitmix64: a tiny seeded generator, the same on every machine.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }
    fn bool(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn parse(text: &str) -> reference::Result<MambaConfig> {
    MambaConfig::from_json_str(text, "test.json")
}

/// The message of a config error, checking it is `Error::Config` for `key`.
fn config_error(text: &str, key: &str) -> String {
    match parse(text) {
        Err(e @ Error::Config { .. }) => {
            let Error::Config { key: got, .. } = &e else {
                unreachable!()
            };
            assert_eq!(got, key, "error names the wrong key: {e}");
            let msg = e.to_string();
            assert!(msg.contains(key), "message does not name `{key}`: {msg}");
            assert!(
                msg.contains("test.json"),
                "message does not name the source: {msg}"
            );
            msg
        }
        other => panic!("expected a config error for `{key}`, got {other:?}"),
    }
}

#[test]
fn hf_mamba_130m_config_reads_every_field() {
    let cfg = parse(MAMBA_130M_HF).unwrap();
    let mut want = MambaConfig::new(768, 24, 50280);
    want.pad_vocab_size_multiple = 8;
    assert_eq!(cfg, want);
    assert_eq!(cfg.d_inner, 1536);
    assert_eq!(cfg.dt_rank, 48);
    assert_eq!(cfg.norm, NormKind::Rms);
    assert_eq!(cfg.x_proj_rows(), 80);
}

#[test]
fn hf_config_reads_non_default_values() {
    let text = r#"{"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 3,
        "vocab_size": 100, "state_size": 8, "expand": 3, "conv_kernel": 2,
        "intermediate_size": 200, "time_step_rank": 7, "layer_norm_epsilon": 1e-6,
        "use_bias": true, "use_conv_bias": false, "residual_in_fp32": false,
        "tie_word_embeddings": false, "time_step_min": 0.002, "time_step_max": 0.2,
        "time_step_floor": 0.0}"#;
    let cfg = parse(text).unwrap();
    assert_eq!(
        (cfg.d_model, cfg.n_layer, cfg.vocab_size, cfg.d_state),
        (64, 3, 100, 8)
    );
    assert_eq!(
        (cfg.expand, cfg.d_conv, cfg.d_inner, cfg.dt_rank),
        (3, 2, 200, 7)
    );
    assert_eq!(cfg.norm_eps, 1e-6);
    assert!(cfg.use_bias && !cfg.conv_bias && !cfg.residual_in_fp32 && !cfg.tie_embeddings);
    assert_eq!(
        (cfg.dt_min, cfg.dt_max, cfg.dt_init_floor),
        (0.002, 0.2, 0.0)
    );
    assert_eq!(cfg.pad_vocab_size_multiple, 1);
}

#[test]
fn mamba_ssm_config_pads_the_vocabulary_and_reads_layernorm() {
    let cfg = parse(MAMBA_130M_SSM_LAYERNORM).unwrap();
    assert_eq!(cfg.vocab_size, 50280);
    assert_eq!(cfg.pad_vocab_size_multiple, 8);
    assert_eq!(cfg.norm, NormKind::Layer);
    assert_eq!(
        (cfg.d_model, cfg.n_layer, cfg.d_inner, cfg.dt_rank),
        (768, 24, 1536, 48)
    );
    assert_eq!((cfg.d_state, cfg.d_conv, cfg.expand), (16, 4, 2));
    assert!(cfg.tie_embeddings && cfg.conv_bias && !cfg.use_bias);
}

#[test]
fn mamba_ssm_config_reads_ssm_cfg() {
    let text = r#"{"d_model": 2048, "d_intermediate": 0, "n_layer": 48, "vocab_size": 32000,
        "ssm_cfg": {"layer": "Mamba1", "d_state": 8, "d_conv": 3, "expand": 3, "dt_rank": 5,
                    "dt_min": 0.003, "dt_max": 0.3, "dt_init_floor": 0.001,
                    "conv_bias": false, "bias": true, "use_fast_path": true},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": true, "residual_in_fp32": false,
        "pad_vocab_size_multiple": 16, "tie_embeddings": false, "norm_epsilon": 1e-6}"#;
    let cfg = parse(text).unwrap();
    assert_eq!(cfg.vocab_size, 32000);
    assert_eq!(
        (cfg.d_state, cfg.d_conv, cfg.expand, cfg.d_inner),
        (8, 3, 3, 6144)
    );
    assert_eq!(cfg.dt_rank, 5);
    assert_eq!(
        (cfg.dt_min, cfg.dt_max, cfg.dt_init_floor),
        (0.003, 0.3, 0.001)
    );
    assert!(!cfg.conv_bias && cfg.use_bias && !cfg.residual_in_fp32 && !cfg.tie_embeddings);
    assert_eq!(
        (cfg.norm, cfg.norm_eps, cfg.pad_vocab_size_multiple),
        (NormKind::Rms, 1e-6, 16)
    );
}

#[test]
fn dt_rank_auto_is_ceil_d_model_over_16_and_an_integer_is_kept() {
    let hf = |rank: &str| {
        parse(&format!(
            r#"{{"hidden_size": 100, "num_hidden_layers": 1, "vocab_size": 10, "time_step_rank": {rank}}}"#
        ))
        .unwrap()
        .dt_rank
    };
    assert_eq!(hf("\"auto\""), 7);
    assert_eq!(hf("3"), 3);
    let ssm = |rank: &str| {
        parse(&format!(
            r#"{{"d_model": 33, "n_layer": 1, "vocab_size": 10, "ssm_cfg": {{"dt_rank": {rank}}}}}"#
        ))
        .unwrap()
        .dt_rank
    };
    assert_eq!(ssm("\"auto\""), 3);
    assert_eq!(ssm("11"), 11);
    config_error(
        r#"{"hidden_size": 100, "num_hidden_layers": 1, "vocab_size": 10, "time_step_rank": "big"}"#,
        "time_step_rank",
    );
}

/// A random valid config of either norm, with every field away from its default.
fn random_config(rng: &mut SplitMix64) -> MambaConfig {
    let d_model = rng.range(1, 300);
    let pad = [1, 8, 16][rng.range(0, 2)];
    let expand = rng.range(1, 4);
    let mut cfg = MambaConfig::new(d_model, rng.range(1, 64), pad * rng.range(1, 5000));
    cfg.norm = if rng.bool() {
        NormKind::Rms
    } else {
        NormKind::Layer
    };
    cfg.d_state = rng.range(1, 64);
    cfg.d_conv = rng.range(1, 8);
    cfg.expand = expand;
    cfg.d_inner = expand * d_model;
    if cfg.norm == NormKind::Rms && rng.bool() {
        cfg.d_inner = rng.range(1, 1000); // intermediate_size need not be expand * hidden_size
    }
    cfg.dt_rank = rng.range(1, 100);
    cfg.norm_eps = 1e-7 + rng.unit() * 1e-3;
    cfg.tie_embeddings = rng.bool();
    cfg.use_bias = rng.bool();
    cfg.conv_bias = rng.bool();
    cfg.residual_in_fp32 = rng.bool();
    cfg.pad_vocab_size_multiple = pad;
    cfg.dt_min = 1e-4 + rng.unit() * 1e-2;
    cfg.dt_max = cfg.dt_min + rng.unit();
    cfg.dt_init_floor = rng.unit() * 1e-3;
    cfg
}

#[test]
fn random_configs_round_trip_through_their_json() {
    let mut rng = SplitMix64(0x5EED_C0F1);
    for _ in 0..200 {
        let cfg = random_config(&mut rng);
        cfg.validate().unwrap();
        let text = serde_json::to_string_pretty(&cfg.to_json()).unwrap();
        assert_eq!(parse(&text).unwrap(), cfg, "{text}");
    }
}

#[test]
fn both_formats_round_trip() {
    let hf = parse(MAMBA_130M_HF).unwrap();
    let json = hf.to_hf_json();
    assert_eq!(json["model_type"], "mamba");
    assert_eq!(json["architectures"][0], "MambaForCausalLM");
    assert_eq!(json["time_step_rank"], 48);
    assert_eq!(json["intermediate_size"], 1536);
    assert_eq!(parse(&json.to_string()).unwrap(), hf);

    let ssm = parse(MAMBA_130M_SSM_LAYERNORM).unwrap();
    let json = ssm.to_json();
    assert_eq!(json["ssm_cfg"]["layer"], "Mamba1");
    assert_eq!(json["rms_norm"], false);
    assert_eq!(json["vocab_size"], 50280);
    assert_eq!(parse(&json.to_string()).unwrap(), ssm);
    // An RMSNorm model also reads back from the mamba_ssm format.
    let mut rms = ssm.clone();
    rms.norm = NormKind::Rms;
    assert_eq!(parse(&rms.to_mamba_ssm_json().to_string()).unwrap(), rms);
}

#[test]
fn save_then_load_from_file_and_directory() {
    let dir = std::env::temp_dir().join(format!("vet-mamba-{}-config-save", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for text in [MAMBA_130M_HF, MAMBA_130M_SSM_LAYERNORM] {
        let cfg = parse(text).unwrap();
        cfg.save(&dir.join("config.json")).unwrap();
        assert_eq!(MambaConfig::load(&dir).unwrap(), cfg);
        assert_eq!(MambaConfig::load(&dir.join("config.json")).unwrap(), cfg);
    }
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["config.json"], "a temporary file was left behind");
    let missing = MambaConfig::load(&dir.join("nope.json")).unwrap_err();
    assert!(matches!(missing, Error::Io { .. }) && missing.to_string().contains("nope.json"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn save_refuses_a_layernorm_config_mamba_ssm_cannot_hold() {
    let mut cfg = parse(MAMBA_130M_SSM_LAYERNORM).unwrap();
    cfg.d_inner = 1000;
    let path = std::env::temp_dir().join(format!(
        "vet-mamba-{}-config-refuse.json",
        std::process::id()
    ));
    let err = cfg.save(&path).unwrap_err();
    assert!(err.to_string().contains("expand"), "{err}");
    assert!(!path.exists());
}

#[test]
fn out_of_range_values_name_their_key() {
    let hf = |extra: &str| {
        format!(r#"{{"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100, {extra}}}"#)
    };
    config_error(&hf(r#""state_size": 0"#), "state_size");
    config_error(&hf(r#""conv_kernel": 0"#), "conv_kernel");
    config_error(&hf(r#""intermediate_size": 0"#), "intermediate_size");
    config_error(&hf(r#""layer_norm_epsilon": 0"#), "layer_norm_epsilon");
    config_error(&hf(r#""layer_norm_epsilon": -1e-5"#), "layer_norm_epsilon");
    config_error(&hf(r#""time_step_min": 0.5"#), "time_step_max");
    config_error(&hf(r#""time_step_min": 0"#), "time_step_min");
    config_error(&hf(r#""time_step_floor": -1"#), "time_step_floor");
    config_error(&hf(r#""time_step_rank": 0"#), "time_step_rank");
    config_error(
        r#"{"hidden_size": 0, "num_hidden_layers": 2, "vocab_size": 100}"#,
        "hidden_size",
    );
    config_error(
        r#"{"hidden_size": 64, "num_hidden_layers": 0, "vocab_size": 100}"#,
        "num_hidden_layers",
    );
    config_error(
        r#"{"hidden_size": 4294967296, "num_hidden_layers": 1, "vocab_size": 4294967296}"#,
        "vocab_size",
    );
    config_error(
        r#"{"d_model": 0, "n_layer": 2, "vocab_size": 100}"#,
        "d_model",
    );
    config_error(
        r#"{"d_model": 8, "n_layer": 2, "vocab_size": 100, "pad_vocab_size_multiple": 0}"#,
        "pad_vocab_size_multiple",
    );
    config_error(
        r#"{"d_model": 8, "n_layer": 2, "vocab_size": 100, "ssm_cfg": {"d_state": 0}}"#,
        "ssm_cfg.d_state",
    );
}

#[test]
fn wrong_types_name_their_key() {
    let hf = |extra: &str| {
        format!(r#"{{"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100, {extra}}}"#)
    };
    let msg = config_error(
        r#"{"hidden_size": "big", "num_hidden_layers": 2, "vocab_size": 100}"#,
        "hidden_size",
    );
    assert!(msg.contains("\"big\""), "{msg}");
    config_error(&hf(r#""state_size": -16"#), "state_size");
    config_error(&hf(r#""state_size": 16.0"#), "state_size");
    config_error(&hf(r#""state_size": null"#), "state_size");
    config_error(&hf(r#""use_bias": "no""#), "use_bias");
    config_error(&hf(r#""layer_norm_epsilon": "tiny""#), "layer_norm_epsilon");
    config_error(
        r#"{"d_model": 8, "n_layer": 2, "vocab_size": 100, "ssm_cfg": []}"#,
        "ssm_cfg",
    );
    config_error(
        r#"{"d_model": 8, "n_layer": 2, "vocab_size": 100, "ssm_cfg": {"expand": 1.5}}"#,
        "ssm_cfg.expand",
    );
    config_error(r#"{"d_model": 8, "vocab_size": 100}"#, "n_layer");
    config_error(
        r#"{"num_hidden_layers": 2, "vocab_size": 100}"#,
        "hidden_size",
    );
}

#[test]
fn non_mamba1_models_are_refused_naming_the_key() {
    let ssm =
        |extra: &str| format!(r#"{{"d_model": 8, "n_layer": 2, "vocab_size": 100, {extra}}}"#);
    let msg = config_error(&ssm(r#""ssm_cfg": {"layer": "Mamba2"}"#), "ssm_cfg.layer");
    assert!(msg.contains("Mamba2"), "{msg}");
    config_error(&ssm(r#""d_intermediate": 512"#), "d_intermediate");
    config_error(&ssm(r#""attn_layer_idx": [3, 7]"#), "attn_layer_idx");
    let msg = config_error(
        r#"{"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100}"#,
        "model_type",
    );
    assert!(msg.contains("mamba2"), "{msg}");
}

#[test]
fn invalid_json_is_a_syntax_error() {
    for text in ["{\"hidden_size\": 768,", "", "[1, 2]", "not json"] {
        match parse(text) {
            Err(e @ Error::ConfigSyntax { .. }) => assert!(e.to_string().contains("test.json")),
            other => panic!("{text:?}: expected ConfigSyntax, got {other:?}"),
        }
    }
}

#[test]
fn validate_names_the_key_of_the_format_it_writes() {
    let mut cfg = MambaConfig::new(64, 2, 100);
    cfg.validate().unwrap();
    cfg.d_state = 0;
    let err = cfg.validate().unwrap_err();
    assert!(err.to_string().contains("state_size"), "{err}");
    cfg.d_state = 16;
    cfg.norm = NormKind::Layer;
    cfg.pad_vocab_size_multiple = 8;
    let err = cfg.validate().unwrap_err();
    assert!(err.to_string().contains("vocab_size"), "{err}");
    cfg.vocab_size = 104;
    cfg.dt_max = f64::NAN;
    let err = cfg.validate().unwrap_err();
    assert!(err.to_string().contains("ssm_cfg.dt_max"), "{err}");
}
