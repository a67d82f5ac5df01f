//! The README's main job: on the bundled data, prepare the corpus, pretrain a small model,
//! fine-tune it on the QA train split, evaluate on the eval split (before and after
//! fine-tuning) and answer a sample question.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::data::prepare::{prepare, Options};
use crate::data::qa::read_qa_jsonl;
use crate::train::eval::eval_loss;
use crate::train::qa_eval::{evaluate_qa, QaScores};
use crate::train::run::{train, RunOptions, RunSummary};
use crate::train::run_config::RunConfig;
use crate::train::source::Source;
use crate::{checkpoint, device, tokenizer};

/// Sizes of the pipeline: [`QuickstartOptions::full`] for the README, `smoke` for tests.
#[derive(Clone, Debug)]
pub struct QuickstartOptions {
    pub out: PathBuf,
    pub device: String,
    pub batch: usize,
    pub seq_len: usize,
    pub pretrain_steps: u64,
    pub finetune_steps: u64,
    /// QA pairs answered in each evaluation.
    pub qa_limit: usize,
    pub max_new_tokens: usize,
}

impl QuickstartOptions {
    /// The README's run on the fast CPU tier (`--device cpu`).
    pub fn full(out: PathBuf) -> Self {
        QuickstartOptions {
            out,
            device: "cpu".into(),
            batch: 8,
            seq_len: 128,
            pretrain_steps: 600,
            finetune_steps: 240,
            qa_limit: 40,
            max_new_tokens: 40,
        }
    }

    /// The same pipeline in about a minute, for the test suite.
    pub fn smoke(out: PathBuf) -> Self {
        QuickstartOptions {
            out,
            device: "cpu".into(),
            batch: 4,
            seq_len: 64,
            pretrain_steps: 30,
            finetune_steps: 30,
            qa_limit: 4,
            max_new_tokens: 8,
        }
    }
}

/// What the quickstart measured.
#[derive(Clone, Debug, Serialize)]
pub struct QuickstartReport {
    pub pretrain_final_loss: f64,
    pub pretrain_val_loss: Option<f64>,
    /// Answer-only loss on the QA eval split, before and after fine-tuning.
    pub qa_eval_loss_before: f64,
    pub qa_eval_loss_after: f64,
    pub qa_before: QaScores,
    pub qa_after: QaScores,
    pub sample_question: String,
    pub sample_answer: String,
    pub seconds: f64,
}

fn run_config(
    o: &QuickstartOptions,
    stage: &str,
    model: &str,
    data: &str,
    steps: u64,
    lr: f64,
    out: &Path,
) -> Result<RunConfig> {
    let text = format!(
        r#"
        stage = "{stage}"
        out_dir = "{out}"
        [model]
        {model}
        [data]
        {data}
        tokenizer = "{tok}"
        [train]
        batch = {batch}
        seq_len = {seq_len}
        steps = {steps}
        seed = 1
        [optim]
        lr = {lr:e}
        min_lr = {min_lr:e}
        warmup_steps = {warmup}
        [checkpoint]
        every = {steps}
        keep_last = 1
        [eval]
        every = {eval_every}
        batches = 4
        "#,
        out = out.display(),
        tok = fixtures::tokenizer().display(),
        batch = o.batch,
        seq_len = o.seq_len,
        min_lr = lr / 10.0,
        warmup = (steps / 10).max(1),
        eval_every = (steps / 3).max(1),
    );
    RunConfig::parse(&text).context("building the quickstart run config")
}

/// Answer-only loss on the QA eval split for the checkpoint in `dir`.
fn qa_loss(o: &QuickstartOptions, dir: &Path) -> Result<f64> {
    let ck = checkpoint::load(dir)?;
    let tok = tokenizer::load(&fixtures::tokenizer(), ck.config.vocab_size)?;
    let mut engine = device::engine(&o.device, &ck.config, ck.params)?;
    let qc = crate::data::qa::QaConfig {
        batch: o.batch,
        seq_len: o.seq_len,
        seed: 0,
        rank: 0,
        world_size: 1,
        pack: true,
    };
    let mut src = Source::qa(&fixtures::data().join("qa_eval.jsonl"), &tok, qc)?;
    let batches = src.steps_per_epoch().max(1) as usize;
    eval_loss(engine.as_mut(), &mut src, batches)
}

fn qa_scores(o: &QuickstartOptions, dir: &Path, report: &Path) -> Result<QaScores> {
    let ck = checkpoint::load(dir)?;
    let tok = tokenizer::load(&fixtures::tokenizer(), ck.config.vocab_size)?;
    let mut engine = device::engine(&o.device, &ck.config, ck.params)?;
    let pairs = read_qa_jsonl(&fixtures::data().join("qa_eval.jsonl"))?;
    evaluate_qa(
        engine.as_mut(),
        &tok,
        &pairs,
        o.qa_limit,
        o.max_new_tokens,
        1.0,
        report,
    )
}

fn step(n: usize, what: &str) {
    eprintln!("\n== {n}/5 {what}");
}

/// Runs the five steps, printing progress, and returns the measurements (also written to
/// `OUT/quickstart_report.json`).
pub fn run(o: &QuickstartOptions) -> Result<QuickstartReport> {
    let started = Instant::now();
    std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    let _lock = crate::lock::DirLock::acquire(&o.out)?;
    step(1, "prepare the bundled corpus");
    let data_dir = o.out.join("data");
    let mut popts = Options::new(
        vec![fixtures::data().join("corpus.jsonl")],
        fixtures::tokenizer(),
        data_dir.clone(),
    );
    popts.val_fraction = 0.05;
    let ps = prepare(&popts)?;
    ps.print();
    let manifest = data_dir.join("manifest.json");
    step(2, "pretrain a small model on the corpus");
    let pre_dir = o.out.join("pretrain");
    let cfg = run_config(
        o,
        "pretrain",
        "preset = \"quickstart\"",
        &format!("manifest = \"{}\"", manifest.display()),
        o.pretrain_steps,
        3e-3,
        &pre_dir,
    )?;
    // The pretrain and finetune folders are the quickstart's own: a rerun starts them afresh.
    let ropts = RunOptions {
        device: o.device.clone(),
        overwrite: true,
        ..RunOptions::default()
    };
    let pre: RunSummary = train(cfg, &ropts)?;
    eprintln!(
        "pretrained {} steps: loss {:.4}, validation loss {:?}, {:.0} tokens/s",
        pre.steps,
        pre.losses.last().copied().unwrap_or(f64::NAN),
        pre.val_loss,
        pre.tokens_per_s
    );
    step(3, "fine-tune on the QA train split (answer-only loss)");
    let ft_dir = o.out.join("finetune");
    let qa_data = format!(
        "qa_train = \"{}\"\n        qa_eval = \"{}\"",
        fixtures::data().join("qa_train.jsonl").display(),
        fixtures::data().join("qa_eval.jsonl").display()
    );
    let from = format!("from = \"{}\"", pre.checkpoint.display());
    let ft = train(
        run_config(
            o,
            "finetune",
            &from,
            &qa_data,
            o.finetune_steps,
            1e-3,
            &ft_dir,
        )?,
        &ropts,
    )?;
    step(
        4,
        "evaluate on the QA eval split, before and after fine-tuning",
    );
    let before = qa_loss(o, &pre.checkpoint)?;
    let after = qa_loss(o, &ft.checkpoint)?;
    let qa_before = qa_scores(o, &pre.checkpoint, &o.out.join("qa_report_before.jsonl"))?;
    let qa_after = qa_scores(o, &ft.checkpoint, &o.out.join("qa_report_after.jsonl"))?;
    eprintln!("QA eval answer loss: before fine-tuning {before:.4}, after {after:.4}");
    eprintln!(
        "QA eval ({} questions, greedy): exact match {:.3} -> {:.3}, token F1 {:.3} -> {:.3}",
        qa_after.questions, qa_before.exact_match, qa_after.exact_match, qa_before.f1, qa_after.f1
    );
    step(5, "answer a sample question");
    let pairs = read_qa_jsonl(&fixtures::data().join("qa_eval.jsonl"))?;
    let sample = pairs.first().context("the QA eval split is empty")?;
    let one = o.out.join("sample_answer.jsonl");
    let only = [sample.clone()];
    let ck = checkpoint::load(&ft.checkpoint)?;
    let tok = tokenizer::load(&fixtures::tokenizer(), ck.config.vocab_size)?;
    let mut engine = device::engine(&o.device, &ck.config, ck.params)?;
    // The sample answer curbs the small model's loops with a repetition penalty.
    evaluate_qa(
        engine.as_mut(),
        &tok,
        &only,
        1,
        o.max_new_tokens.max(48),
        1.3,
        &one,
    )?;
    let rec: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&one)?
            .lines()
            .next()
            .unwrap_or("{}"),
    )?;
    let answer = rec["answer"].as_str().unwrap_or_default().to_string();
    println!(
        "Question: {}\nAnswer:   {answer}\n(reference: {})",
        sample.question, sample.answer
    );
    let report = QuickstartReport {
        pretrain_final_loss: pre.losses.last().copied().unwrap_or(f64::NAN),
        pretrain_val_loss: pre.val_loss,
        qa_eval_loss_before: before,
        qa_eval_loss_after: after,
        qa_before,
        qa_after,
        sample_question: sample.question.clone(),
        sample_answer: answer,
        seconds: started.elapsed().as_secs_f64(),
    };
    let path = o.out.join("quickstart_report.json");
    reference::fs::atomic_write(&path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    eprintln!(
        "\nquickstart done in {:.0} s; report in {}",
        report.seconds,
        path.display()
    );
    Ok(report)
}
