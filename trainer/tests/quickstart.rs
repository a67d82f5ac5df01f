//! The README's main job in small: prepare → pretrain → fine-tune → evaluate → answer, on
//! the bundled data, in about a minute.

use trainer::quickstart::{run, QuickstartOptions};

#[test]
fn quickstart_smoke_runs_the_whole_pipeline_and_fine_tuning_lowers_the_qa_loss() {
    let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("quickstart-smoke");
    let _ = std::fs::remove_dir_all(&out);
    let r = run(&QuickstartOptions::smoke(out.clone())).unwrap();
    assert!(
        r.pretrain_final_loss.is_finite() && r.pretrain_final_loss < 8.0,
        "pretrain loss {}",
        r.pretrain_final_loss
    );
    assert!(
        r.qa_eval_loss_after < r.qa_eval_loss_before,
        "fine-tuning did not lower the QA eval loss: {} -> {}",
        r.qa_eval_loss_before,
        r.qa_eval_loss_after
    );
    assert_eq!(r.qa_after.questions, 4);
    for f in [
        "data/manifest.json",
        "quickstart_report.json",
        "qa_report_after.jsonl",
        "pretrain/metrics.jsonl",
        "finetune/run.toml",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(!r.sample_question.is_empty());
}
