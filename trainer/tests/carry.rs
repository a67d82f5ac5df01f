//! Stateful training (`[train] carry_state`) end to end: the carried states are checkpointed
//! and a resumed run is the same bits as an uninterrupted one; the state really is carried
//! (zeroing the saved state changes what follows); bad settings are clear errors.

use std::path::{Path, PathBuf};

use reference::io::{read_tensors, write_tensors, TensorOut};
use trainer::train::carry::carry_file;
use trainer::train::run::{train, RunOptions};
use trainer::train::run_config::RunConfig;
use trainer::train::state;

mod common;

fn config(out: &Path, manifest: &Path, steps: u64, carry: &str) -> RunConfig {
    RunConfig::parse(&format!(
        r#"
        stage = "pretrain"
        out_dir = "{}"
        [model]
        preset = "quickstart"
        [data]
        manifest = "{}"
        tokenizer = "{}"
        [train]
        batch = 2
        seq_len = 16
        steps = {steps}
        seed = 5
        carry_state = {carry}
        [optim]
        lr = 3e-3
        min_lr = 0.0
        warmup_steps = 2
        [checkpoint]
        every = 3
        keep_last = 5
        "#,
        out.display(),
        manifest.display(),
        common::tokenizer().display()
    ))
    .unwrap()
}

fn losses(out: &Path) -> Vec<u64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["loss"].as_f64())
        .map(f64::to_bits)
        .collect()
}

fn resume() -> RunOptions {
    RunOptions {
        resume: true,
        ..RunOptions::default()
    }
}

/// Runs 6 steps straight and 3 + a resume to 6; returns both output directories.
fn whole_and_resumed(dir: &Path, manifest: &Path, carry: &str) -> (PathBuf, PathBuf) {
    let whole = dir.join("whole");
    train(config(&whole, manifest, 6, carry), &RunOptions::default()).unwrap();
    let split = dir.join("split");
    train(config(&split, manifest, 3, carry), &RunOptions::default()).unwrap();
    (whole, split)
}

fn check_resume_is_exact(name: &str, carry: &str) {
    let dir = common::scratch("carry", name);
    let manifest = common::byte_shards(&dir, 3000);
    let (whole, split) = whole_and_resumed(&dir, &manifest, carry);
    let ck = state::step_dir(&split, 3).join(carry_file(0));
    let saved = read_tensors(&ck).unwrap();
    assert!(
        saved.iter().any(|(_, t)| t.data.iter().any(|&v| v != 0.0)),
        "{name}: the checkpoint holds a carried state"
    );
    train(config(&split, &manifest, 6, carry), &resume()).unwrap();
    assert_eq!(
        losses(&whole),
        losses(&split),
        "{name}: losses after resume"
    );
    for file in ["model.safetensors", carry_file(0).as_str()] {
        let a = std::fs::read(state::step_dir(&whole, 6).join(file)).unwrap();
        let b = std::fs::read(state::step_dir(&split, 6).join(file)).unwrap();
        assert!(a == b, "{name}: {file} differs after resume");
    }
}

#[test]
fn detached_carry_resumes_mid_run_to_the_same_bits() {
    check_resume_is_exact("detach", "\"detach\"");
}

#[test]
fn carry_through_two_windows_resumes_mid_run_to_the_same_bits() {
    check_resume_is_exact("k2", "2");
}

#[test]
fn interleaved_streams_resume_mid_run_to_the_same_bits() {
    check_resume_is_exact("s2", "2\n        carry_streams = 2");
    // Each group's state is saved; resuming with another group count is refused.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("carry-s2");
    let split = dir.join("split");
    let names: Vec<String> = read_tensors(&state::step_dir(&split, 3).join(carry_file(0)))
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
    assert!(names.iter().any(|n| n == "ssm.1"), "{names:?}");
    let manifest = dir.join("manifest.json");
    let cfg = config(&split, &manifest, 9, "2");
    let err = train(cfg, &resume()).err().unwrap();
    assert!(
        format!("{err:#}").contains("a state of more than this run's 1 group(s)"),
        "{err:#}"
    );
}

#[test]
fn the_saved_state_is_the_one_the_next_window_starts_from() {
    let dir = common::scratch("carry", "zeroed");
    let manifest = common::byte_shards(&dir, 3000);
    let (whole, split) = whole_and_resumed(&dir, &manifest, "true");
    // Zero the carried state in the checkpoint: the resumed run must then differ.
    let path = state::step_dir(&split, 3).join(carry_file(0));
    let zeroed: Vec<(String, TensorOut)> = read_tensors(&path)
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let data = vec![0.0; t.data.len()];
            (
                n,
                TensorOut::F32 {
                    shape: t.shape,
                    data,
                },
            )
        })
        .collect();
    write_tensors(&path, &zeroed).unwrap();
    train(config(&split, &manifest, 6, "true"), &resume()).unwrap();
    let (a, b) = (losses(&whole), losses(&split));
    assert_eq!(a[..3], b[..3]);
    assert_ne!(
        a[3], b[3],
        "step 4 starts from the carried state, not from zeros"
    );
}

#[test]
fn a_checkpoint_without_carried_states_is_refused_naming_the_file() {
    let dir = common::scratch("carry", "missing");
    let manifest = common::byte_shards(&dir, 3000);
    let out = dir.join("run");
    train(config(&out, &manifest, 3, "false"), &RunOptions::default()).unwrap();
    let err = train(config(&out, &manifest, 6, "\"detach\""), &resume()).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&carry_file(0)) && msg.contains("without `train.carry_state`"),
        "{msg}"
    );
}

#[test]
fn bad_carry_settings_are_clear_errors() {
    for (value, want) in [
        ("0", "`train.carry_state` is 0"),
        ("\"sometimes\"", "\"sometimes\""),
    ] {
        let text = format!("stage = \"pretrain\"\nout_dir = \"x\"\n[model]\npreset = \"tiny\"\n[data]\nmanifest = \"m\"\n[train]\nbatch = 1\nseq_len = 4\nsteps = 1\ncarry_state = {value}\n[optim]\nlr = 1e-3\n");
        let err = RunConfig::parse(&text).unwrap_err();
        assert!(format!("{err:#}").contains(want), "{value}: {err:#}");
    }
    let text = "stage = \"pretrain\"\nout_dir = \"x\"\n[model]\npreset = \"tiny\"\n[data]\nmanifest = \"m\"\n[train]\nbatch = 1\nseq_len = 4\nsteps = 1\ncarry_state = \"3\"\n[optim]\nlr = 1e-3\n";
    let cfg = RunConfig::parse(text).unwrap();
    assert_eq!(
        cfg.train.carry_state,
        trainer::train::carry::CarryState::Windows(3)
    );
    let again = RunConfig::parse(&cfg.to_toml().unwrap()).unwrap();
    assert_eq!(
        again.train.carry_state, cfg.train.carry_state,
        "the setting survives to_toml"
    );
}

#[test]
fn eval_long_reads_a_document_in_windows_as_one_forward_and_buckets_every_position() {
    use reference::rng::Rng;
    use trainer::train::long_eval::{bucket_edges, document_losses, document_losses_with};
    use trainer::train::long_eval::{long_eval, long_eval_with};
    let ck = trainer::checkpoint::load(&fixtures::tiny_checkpoint()).unwrap();
    let vocab = ck.config.vocab_size as u64;
    let mut e = reference::ReferenceEngine::<f32>::new(ck.config, ck.params);
    let mut rng = Rng::new(21);
    let doc: Vec<u32> = (0..60).map(|_| rng.below(vocab) as u32).collect();
    let whole = document_losses(&mut e, &doc, 1000).unwrap();
    let windowed = document_losses(&mut e, &doc, 7).unwrap();
    assert_eq!((whole.len(), windowed.len()), (59, 59));
    for (t, (a, b)) in windowed.iter().zip(&whole).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs(),
            "position {t}: {a} in windows, {b} whole"
        );
    }
    // --reset-windows: each window alone, from zeros.
    let reset = document_losses_with(&mut e, &doc, 7, false).unwrap();
    let alone = document_losses(&mut e, &doc[7..15], 1000).unwrap();
    assert_eq!(
        (reset[..7].to_vec(), reset[7..14].to_vec()),
        (whole[..7].to_vec(), alone)
    );
    assert!(
        (reset[8] - windowed[8]).abs() > 1e-6,
        "the carried state matters"
    );
    assert_eq!(bucket_edges(600), vec![0, 512, 2048]);
    assert_eq!(
        bucket_edges(40_000),
        vec![0, 512, 2048, 8192, 32768, 131072]
    );
    let long: Vec<u32> = (0..700).map(|_| rng.below(vocab) as u32).collect();
    let r = long_eval(&mut e, &[doc.clone(), long], 128, "tiny").unwrap();
    let spans: Vec<(u64, u64, u64)> = r.buckets.iter().map(|b| (b.from, b.to, b.tokens)).collect();
    assert_eq!(spans, vec![(0, 512, 59 + 512), (512, 2048, 699 - 512)]);
    assert!(r
        .buckets
        .iter()
        .all(|b| b.perplexity.is_finite() && b.perplexity > 1.0));
    let r0 = long_eval_with(&mut e, &[doc], 128, "tiny", false).unwrap();
    assert!(r.state_carried && !r0.state_carried);
}

#[test]
fn score_after_buckets_only_the_rest_of_each_cued_line() {
    use trainer::train::long_eval::{cue_mask, document_losses, long_eval_cued, Cued};
    let cues = vec!["allergic to".to_string()];
    // Byte tokens: target t predicts byte t + 1.
    let tok = trainer::tokenizer::byte_level().unwrap();
    let text = b"Header: allergic to X.\nvisit 1\nCheck: allergic to YY.\nend";
    let doc: Vec<u32> = text.iter().map(|&b| b as u32).collect();
    let mask = cue_mask(&tok, &doc, &cues);
    let picked: String = (0..mask.len())
        .filter(|&t| mask[t])
        .map(|t| text[t + 1] as char)
        .collect();
    assert_eq!(picked, " X. YY.");
    // BPE: the value's token starts with its space, past the cue's end.
    let bpe = trainer::tokenizer::load(&fixtures::tokenizer(), 1 << 20).unwrap();
    let line =
        "VISIT 3. recheck.\nAllergy check before prescribing: allergic to amoxicillin.\nVISIT 4.";
    let ids = trainer::tokenizer::encode_text(&bpe, line).unwrap();
    let m = cue_mask(&bpe, &ids, &cues);
    let chosen: Vec<u32> = ids[1..]
        .iter()
        .zip(&m)
        .filter(|(_, &x)| x)
        .map(|(&i, _)| i)
        .collect();
    assert_eq!(
        trainer::tokenizer::decode(&bpe, &chosen).unwrap(),
        " amoxicillin."
    );
    // The cued bucket is the mean loss of exactly those targets.
    let ck = trainer::checkpoint::load(&fixtures::tiny_checkpoint()).unwrap();
    let mut e = reference::ReferenceEngine::<f32>::new(ck.config, ck.params);
    let losses = document_losses(&mut e, &doc, 1000).unwrap();
    let masks = [mask.clone()];
    let cued = Cued {
        cues: &cues,
        masks: &masks,
    };
    let docs = std::slice::from_ref(&doc);
    let r = long_eval_cued(&mut e, docs, 16, "tiny", true, Some(&cued)).unwrap();
    let want: f64 = (0..mask.len())
        .filter(|&t| mask[t])
        .map(|t| losses[t])
        .sum::<f64>()
        / 7.0;
    assert_eq!((r.cued.len(), r.cued[0].tokens), (1, 7));
    assert!(
        (r.cued[0].loss - want).abs() <= 1e-5 * want,
        "cued loss {} against {want}",
        r.cued[0].loss
    );
    assert_eq!(r.buckets[0].tokens, doc.len() as u64 - 1);
    assert!((r.buckets[0].loss - r.cued[0].loss).abs() > 1e-3);
    assert_eq!(r.cues, cues);
}

/// A carrying run's validation (`eval_loss_carried`): each row's windows in order with the
/// state carried give the loss of one forward over the row's whole stretch, and not the loss
/// of the same windows each started from zeros.
#[test]
fn a_carrying_runs_validation_reads_each_rows_windows_with_the_state_carried() {
    use reference::model::Batch;
    use reference::InferenceEngine;
    use trainer::data::loader::LoaderConfig;
    use trainer::train::eval::{eval_loss, eval_loss_carried};
    use trainer::train::source::Source;
    let dir = common::scratch("carry", "validation");
    let manifest = common::byte_shards(&dir, 3000);
    let ck = trainer::checkpoint::load(&fixtures::tiny_checkpoint()).unwrap();
    let vocab = ck.config.vocab_size;
    let mut e = reference::ReferenceEngine::<f32>::new(ck.config, ck.params);
    let (rows, seq, windows) = (2, 16, 3);
    let lc = LoaderConfig {
        batch: rows,
        seq_len: seq,
        seed: 5,
        rank: 0,
        world_size: 1,
    };
    let open = |streams: bool| {
        let f = if streams {
            Source::streams
        } else {
            Source::tokens
        };
        f(&manifest, "val", lc, None, vocab).unwrap()
    };
    let carried = eval_loss_carried(&mut e, &mut open(true), windows).unwrap();
    // The same windows, concatenated per row, in one forward.
    let mut src = open(true);
    let batches: Vec<_> = (0..windows).map(|_| src.next_batch().unwrap()).collect();
    let cat = |f: &dyn Fn(&trainer::train::source::TrainBatch) -> Vec<u32>| -> Vec<u32> {
        (0..rows)
            .flat_map(|r| {
                batches
                    .iter()
                    .flat_map(|b| f(b)[r * seq..(r + 1) * seq].to_vec())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let (tokens, targets) = (cat(&|b| b.inputs.clone()), cat(&|b| b.targets.clone()));
    let resets: Vec<bool> = cat(&|b| b.resets.iter().map(|&r| u32::from(r)).collect())
        .into_iter()
        .map(|r| r == 1)
        .collect();
    let input = Batch {
        batch: rows,
        seq_len: windows * seq,
        tokens: &tokens,
        resets: Some(&resets),
    };
    let whole = e.loss(&input, &targets, None, None).unwrap().loss;
    assert!(
        (carried - whole).abs() <= 1e-5 * whole.abs(),
        "carried {carried}, one forward {whole}"
    );
    // Each of those windows from zeros: what the validation gave before.
    let from_zeros = eval_loss(&mut e, &mut open(true), windows).unwrap();
    assert!(
        (carried - from_zeros).abs() > 1e-4,
        "the carried state matters: carried {carried}, from zeros {from_zeros}"
    );
}
