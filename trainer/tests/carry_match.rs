//! What the trainer carries is what the engine computed for the same row: the losses of
//! stateful training's windows (`train::carry::Carry` fed by the stream loader, through an
//! epoch boundary) equal those of one forward over each row's whole stream (the windows
//! concatenated, with their reset flags) from zeros. A carried state dropped, taken from
//! another row or from the wrong window makes them differ. (That the windows tile each row
//! and that the reset flags sit on the document starts is `tests/stream.rs`.)

use reference::model::Batch;
use reference::{InferenceEngine, ReferenceEngine};
use trainer::data::loader::LoaderConfig;
use trainer::train::carry::{Carry, CarryState};
use trainer::train::source::{Source, TrainBatch};

mod common;

const ROWS: usize = 3;
const SEQ: usize = 16;

/// `-log softmax(row)[target]` in f64.
fn nll(row: &[f32], target: u32) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    max + sum.ln() - row[target as usize] as f64
}

/// The mean loss of each window, from one forward over every row's windows concatenated.
fn whole_stream_losses(e: &mut ReferenceEngine<f32>, wins: &[TrainBatch]) -> Vec<f64> {
    let (n, len) = (wins.len(), wins.len() * SEQ);
    let (mut tokens, mut targets, mut resets) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..ROWS {
        for w in wins {
            let s = r * SEQ..(r + 1) * SEQ;
            tokens.extend_from_slice(&w.inputs[s.clone()]);
            targets.extend_from_slice(&w.targets[s.clone()]);
            resets.extend_from_slice(&w.resets[s]);
        }
    }
    let input = Batch {
        batch: ROWS,
        seq_len: len,
        tokens: &tokens,
        resets: Some(&resets),
    };
    let (logits, _) = e.forward(&input, None).unwrap();
    let vocab = e.config().vocab_size;
    let mut out = vec![0.0; n];
    for r in 0..ROWS {
        for t in 0..len {
            let p = r * len + t;
            out[t / SEQ] += nll(&logits.data[p * vocab..(p + 1) * vocab], targets[p]);
        }
    }
    out.iter().map(|s| s / (ROWS * SEQ) as f64).collect()
}

fn check(mode: CarryState, groups: usize) {
    let dir = common::scratch("carry-match", &format!("{mode:?}-{groups}"));
    let manifest = common::byte_shards(&dir, 120);
    let ck = trainer::checkpoint::load(&fixtures::tiny_checkpoint()).unwrap();
    let vocab = ck.config.vocab_size;
    let mut e = ReferenceEngine::<f32>::new(ck.config, ck.params);
    let cfg = LoaderConfig {
        batch: ROWS,
        seq_len: SEQ,
        seed: 3,
        rank: 0,
        world_size: 1,
    };
    let mut carry = Carry::with_groups(mode, 0, groups).unwrap();
    let k = carry.k();
    let mut src = Source::streams(&manifest, "train", cfg, None, vocab)
        .unwrap()
        .interleave(groups, k)
        .unwrap();
    // Into the next epoch (a new deal: every row starts a document), whole turns of the groups.
    let per_epoch = src.steps_per_epoch() as usize;
    let windows = (per_epoch / (k * groups) + 2) * k * groups;
    assert!(windows < 2 * per_epoch, "{per_epoch} windows per epoch");
    let wins: Vec<TrainBatch> = (0..windows).map(|_| src.next_batch().unwrap()).collect();
    let mut want: Vec<std::vec::IntoIter<f64>> = (0..groups)
        .map(|g| {
            let mine: Vec<TrainBatch> = wins.iter().filter(|b| b.group == g).cloned().collect();
            whole_stream_losses(&mut e, &mine).into_iter()
        })
        .collect();
    for (j, group) in wins.chunks(k).enumerate() {
        let got = carry.windows(&mut e, group, 1.0).unwrap().loss;
        let g = group[0].group;
        let mean = (0..k).map(|_| want[g].next().unwrap()).sum::<f64>() / k as f64;
        assert!(
            (got - mean).abs() <= 2e-5 * mean,
            "{mode:?}, group {g}: micro-batch {j}: trainer's loss {got}, one forward over the \
             streams {mean}"
        );
    }
}

#[test]
fn detached_windows_have_the_losses_of_one_forward_over_each_rows_stream() {
    check(CarryState::Detach, 1);
}

#[test]
fn windows_back_propagated_in_pairs_have_the_losses_of_one_forward_over_each_rows_stream() {
    check(CarryState::Windows(2), 1);
}

#[test]
fn interleaved_groups_each_continue_their_own_streams() {
    check(CarryState::Detach, 2);
    check(CarryState::Windows(2), 2);
}
