//! The `eval` stage: validation loss and perplexity on token shards, and on QA pairs the
//! answer-only loss plus greedy answers scored by exact match and token F1.

use anyhow::{Context, Result};
use serde::Serialize;

use super::eval::eval_loss;
use super::qa_eval::{evaluate_qa, QaScores};
use super::run::RunOptions;
use super::run_config::RunConfig;
use super::source::Source;
use crate::data::manifest::sha256_file;
use crate::data::qa::read_qa_jsonl;
use crate::{checkpoint, device, tokenizer};

/// `OUT/eval_report.json`.
#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub val_loss: Option<f64>,
    pub val_perplexity: Option<f64>,
    pub qa_loss: Option<f64>,
    pub qa: Option<QaScores>,
}

/// Evaluates `cfg.model.from` as `cfg` says; writes `eval_report.json` (and
/// `qa_report.jsonl`, one line per answered question) into `cfg.out_dir`.
pub fn evaluate(cfg: &RunConfig, opts: &RunOptions) -> Result<EvalReport> {
    let from = cfg
        .model
        .from
        .as_deref()
        .context("stage eval needs `model.from`")?;
    std::fs::create_dir_all(&cfg.out_dir)
        .with_context(|| format!("creating output directory {}", cfg.out_dir.display()))?;
    let ck = checkpoint::load(from)?;
    let tok_path = cfg
        .data
        .tokenizer
        .clone()
        .unwrap_or_else(|| from.join("tokenizer.json"));
    let tok = tokenizer::load(&tok_path, ck.config.vocab_size)?;
    let mut engine = device::engine(&opts.device, &ck.config, ck.params)?;
    let t = &cfg.train;
    let (batches, limit, max_new) = cfg.eval.as_ref().map_or((20, None, 64), |e| {
        (e.batches, e.qa_limit, e.max_new_tokens)
    });
    let mut report = EvalReport {
        model: from.display().to_string(),
        val_loss: None,
        val_perplexity: None,
        qa_loss: None,
        qa: None,
    };
    if let Some(m) = &cfg.data.manifest {
        let lc = t.loader_config();
        let mut src = Source::tokens(
            m,
            "val",
            lc,
            Some(&sha256_file(&tok_path)?),
            ck.config.vocab_size,
        )?;
        let loss = eval_loss(engine.as_mut(), &mut src, batches)?;
        report.val_loss = Some(loss);
        report.val_perplexity = Some(loss.exp());
        eprintln!("validation loss {loss:.4}, perplexity {:.2}", loss.exp());
    }
    if let Some(q) = &cfg.data.qa_eval {
        let qc = t.qa_config();
        let mut src = Source::qa(q, &tok, qc)?;
        let rows = src.steps_per_epoch().max(1) as usize;
        let loss = eval_loss(engine.as_mut(), &mut src, rows)?;
        let pairs = read_qa_jsonl(q)?;
        let scores = evaluate_qa(
            engine.as_mut(),
            &tok,
            &pairs,
            limit.unwrap_or(pairs.len()),
            max_new,
            1.0,
            &cfg.out_dir.join("qa_report.jsonl"),
        )?;
        eprintln!(
            "QA: answer loss {loss:.4}; {} questions, exact match {:.3}, token F1 {:.3}",
            scores.questions, scores.exact_match, scores.f1
        );
        report.qa_loss = Some(loss);
        report.qa = Some(scores);
    }
    let path = cfg.out_dir.join("eval_report.json");
    reference::fs::atomic_write(&path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    Ok(report)
}
