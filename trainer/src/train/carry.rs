//! Stateful training (`[train] carry_state`): the final state (conv window and SSM state) of a
//! row's window is the initial state of that row's next window, as the stream loader
//! ([`crate::data::stream`]) lines the windows up.
//!
//! - `carry_state = "detach"` (or `true`): the state is carried without gradient (truncated
//!   back-propagation through one window).
//! - `carry_state = k` (an integer): each micro-batch is `k` consecutive windows per row,
//!   back-propagated through all `k`. The windows are first run forward only, keeping the `k`
//!   initial states; then from the last window to the first, each is run forward again and
//!   back-propagated with the gradient its final state received from the window after it
//!   ([`TrainingEngine::loss_and_backward_carry`]). Memory grows with `k` (one state per
//!   window), not with the record; compute is one extra forward per window but the last.
//!   The state between two micro-batches is carried detached.
//!
//! With `carry_streams = m` ([`crate::data::stream`]'s interleaved groups) the carry keeps one
//! state per group of rows and each micro-batch continues its own group's.
//!
//! The carried states are this process's rows only (under data parallelism each rank carries
//! its own) and are saved in every checkpoint as `carry_state.rank{r}.safetensors` (in a
//! data-parallel checkpoint beside the optimizer shards, in `zero/`); resume needs the same
//! number of ranks.

use std::path::Path;

use anyhow::{bail, Context, Result};
use reference::io::{read_tensors, write_tensors, TensorOut};
use reference::model::Batch;
use reference::{MambaConfig, State, TrainingEngine};
use serde::{Deserialize, Serialize};

use super::source::{Source, TrainBatch};

/// `[train] carry_state`: off (the default), detached, or back-propagated through `k` windows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CarryState {
    #[default]
    Off,
    Detach,
    Windows(usize),
}

impl CarryState {
    pub fn is_off(&self) -> bool {
        *self == CarryState::Off
    }

    /// Windows back-propagated through per micro-batch (1 for detach); `None` when off.
    pub fn windows(&self) -> Option<usize> {
        match *self {
            CarryState::Off => None,
            CarryState::Detach => Some(1),
            CarryState::Windows(k) => Some(k),
        }
    }
}

impl Serialize for CarryState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match *self {
            CarryState::Off => s.serialize_bool(false),
            CarryState::Detach => s.serialize_str("detach"),
            CarryState::Windows(k) => s.serialize_u64(k as u64),
        }
    }
}

impl<'de> Deserialize<'de> for CarryState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Int(i64),
            Str(String),
        }
        let bad = |what: String| {
            serde::de::Error::custom(format!(
                "`train.carry_state` is {what}: give true, false, \"detach\" or a number of \
                 windows k >= 1 (an integer)"
            ))
        };
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(CarryState::Detach),
            Raw::Bool(false) => Ok(CarryState::Off),
            Raw::Int(k) if k >= 1 => Ok(CarryState::Windows(k as usize)),
            Raw::Int(k) => Err(bad(k.to_string())),
            Raw::Str(s) if s == "detach" => Ok(CarryState::Detach),
            Raw::Str(s) => match s.parse::<usize>() {
                Ok(k) if k >= 1 => Ok(CarryState::Windows(k)),
                _ => Err(bad(format!("{s:?}"))),
            },
        }
    }
}

/// The file holding rank `rank`'s carried states in a checkpoint directory.
pub fn carry_file(rank: usize) -> String {
    format!("carry_state.rank{rank}.safetensors")
}

/// The carried states of this process's rows.
pub struct Carry {
    k: usize,
    rank: usize,
    /// One per interleaved group of rows; `None` until its first window (all zeros).
    states: Vec<Option<State<f32>>>,
}

/// What one micro-batch of `k` windows did.
#[derive(Clone, Copy, Debug)]
pub struct CarryOutput {
    /// The mean of the windows' losses.
    pub loss: f64,
    pub tokens: usize,
}

impl Carry {
    /// `None` when `mode` is off.
    pub fn new(mode: CarryState, rank: usize) -> Option<Carry> {
        Carry::with_groups(mode, rank, 1)
    }

    /// [`Carry::new`] with one state per interleaved group of rows (`carry_streams`).
    pub fn with_groups(mode: CarryState, rank: usize, groups: usize) -> Option<Carry> {
        mode.windows().map(|k| Carry {
            k,
            rank,
            states: vec![None; groups.max(1)],
        })
    }

    /// Group 0's carried state (`None` before its first window).
    pub fn state(&self) -> Option<&State<f32>> {
        self.states[0].as_ref()
    }

    /// One micro-batch: `k` consecutive windows of every row from `source`, forward and
    /// backward of `grad_scale` times their mean loss, adding to the engine's gradients;
    /// carries the last window's final state on. A non-finite loss drops the carried state
    /// (the next window starts from zeros) so that one bad step does not poison the rest.
    pub fn micro_batch(
        &mut self,
        engine: &mut dyn TrainingEngine,
        source: &mut Source,
        grad_scale: f64,
    ) -> Result<CarryOutput> {
        let batches: Vec<TrainBatch> = (0..self.k)
            .map(|_| source.next_batch())
            .collect::<Result<_>>()?;
        Ok(self.windows(engine, &batches, grad_scale)?)
    }

    /// Windows per micro-batch (1 for detach).
    pub fn k(&self) -> usize {
        self.k
    }

    /// [`Carry::micro_batch`] on `batches`, this micro-batch's `k` consecutive windows of
    /// every row (the data-parallel driver reads them ahead).
    pub fn windows(
        &mut self,
        engine: &mut dyn TrainingEngine,
        batches: &[TrainBatch],
        grad_scale: f64,
    ) -> reference::Result<CarryOutput> {
        assert_eq!(batches.len(), self.k, "one batch per carried window");
        let b0 = &batches[0];
        let g = b0.group;
        assert!(
            g < self.states.len() && batches.iter().all(|b| b.group == g),
            "a micro-batch's windows are of one of the {} carried groups",
            self.states.len()
        );
        let zeros = || State::zeros(engine.config(), b0.batch);
        let mut states = vec![self.states[g].take().unwrap_or_else(zeros)];
        for b in &batches[..self.k - 1] {
            let prev = states.last().expect("one state per window so far");
            let next = engine.forward_state(&input(b), Some(prev))?;
            states.push(next);
        }
        let (mut grad, mut last, mut loss, mut tokens) = (None, None, 0.0, 0);
        let scale = grad_scale / self.k as f64;
        for (j, b) in batches.iter().enumerate().rev() {
            let (lo, fin) = engine.loss_and_backward_carry(
                &input(b),
                &b.targets,
                b.mask.as_deref(),
                Some(&states[j]),
                grad.as_ref(),
                scale,
            )?;
            if last.is_none() {
                last = Some(fin);
            }
            loss += lo.loss;
            tokens += b.inputs.len();
            grad = Some(lo.grad_state);
        }
        let loss = loss / self.k as f64;
        self.states[g] = last.filter(|s| loss.is_finite() && is_finite(s));
        Ok(CarryOutput { loss, tokens })
    }

    /// Writes the carried state into checkpoint directory `dir` (zeros before the first window).
    /// Group `g > 0` of interleaved streams is saved as `conv.{g}` and `ssm.{g}`.
    pub fn save(&self, dir: &Path, cfg: &MambaConfig, batch: usize) -> Result<()> {
        let t = |name: String, x: &reference::Tensor<f32>| {
            let (shape, data) = (x.shape.clone(), x.data.clone());
            (name, TensorOut::F32 { shape, data })
        };
        let mut out = Vec::new();
        for (g, st) in self.states.iter().enumerate() {
            let st = st.clone().unwrap_or_else(|| State::zeros(cfg, batch));
            out.push(t(group_name("conv", g), &st.conv));
            out.push(t(group_name("ssm", g), &st.ssm));
        }
        let path = dir.join(carry_file(self.rank));
        write_tensors(&path, &out).with_context(|| format!("writing {}", path.display()))
    }

    /// Reads the carried state from checkpoint directory `dir`, checked against `cfg` and
    /// `batch`; `world`: the ranks of this run (the checkpoint must hold exactly theirs).
    pub fn load(
        &mut self,
        dir: &Path,
        cfg: &MambaConfig,
        batch: usize,
        world: usize,
    ) -> Result<()> {
        let path = dir.join(carry_file(self.rank));
        let extra = dir.join(carry_file(world));
        if extra.is_file() {
            bail!(
                "{} exists: the checkpoint's carried states are from a run with more than {world} \
                 rank(s), whose rows are other streams; resume with the same number of ranks",
                extra.display()
            );
        }
        if !path.is_file() {
            bail!(
                "{} is missing: the checkpoint was written by a run without `train.carry_state` \
                 (or by another rank count); resume it without carry_state, or start afresh",
                path.display()
            );
        }
        let mut tensors = read_tensors(&path)?;
        let mut take = |name: &str| {
            let i = tensors.iter().position(|(n, _)| n == name);
            i.map(|i| tensors.swap_remove(i).1)
                .with_context(|| format!("{}: no tensor `{name}`", path.display()))
        };
        for g in 0..self.states.len() {
            let st = State {
                conv: take(&group_name("conv", g))?,
                ssm: take(&group_name("ssm", g))?,
            };
            st.check(cfg, batch, "carry_state")
                .with_context(|| format!("{}", path.display()))?;
            self.states[g] = Some(st);
        }
        if let Some((name, _)) = tensors.first() {
            bail!(
                "{} holds `{name}`, a state of more than this run's {} group(s) of streams \
                 (`train.carry_streams`): resume with the checkpoint's carry_streams",
                path.display(),
                self.states.len()
            );
        }
        Ok(())
    }
}

/// The tensor name of group `g`'s `what` (`conv` or `ssm`): group 0 has the bare name.
fn group_name(what: &str, g: usize) -> String {
    match g {
        0 => what.to_string(),
        g => format!("{what}.{g}"),
    }
}

fn input(b: &TrainBatch) -> Batch<'_> {
    Batch {
        batch: b.batch,
        seq_len: b.seq_len,
        tokens: &b.inputs,
        resets: Some(&b.resets),
    }
}

fn is_finite(s: &State<f32>) -> bool {
    s.conv.data.iter().chain(&s.ssm.data).all(|v| v.is_finite())
}

/// The run's carry (`None` when `[train] carry_state` is off), restored from checkpoint
/// `resume` when there is one. Stateful training reads token shards only. `dist`: this
/// process's (rank, world) in a data-parallel job, whose checkpoint keeps each rank's carried
/// states beside its optimizer shard (in `zero/`).
pub fn open(
    cfg: &super::run_config::RunConfig,
    mcfg: &MambaConfig,
    resume: Option<&Path>,
    dist: Option<(usize, usize)>,
) -> Result<Option<Carry>> {
    let t = &cfg.train;
    let (rank, world) = dist.unwrap_or((0, 1));
    let Some(mut carry) = Carry::with_groups(t.carry_state, rank, t.carry_streams) else {
        return Ok(None);
    };
    if cfg.stage != super::run_config::Stage::Pretrain || cfg.data.manifest.is_none() {
        bail!(
            "`train.carry_state` is for pretraining on token shards (`data.manifest`); stage {:?} \
             reads QA pairs, whose rows are not streams",
            cfg.stage
        );
    }
    if let Some(dir) = resume {
        let from = match dist {
            Some(_) => dir.join(crate::dist::ckpt::ZERO_DIR),
            None => dir.to_path_buf(),
        };
        carry.load(&from, mcfg, t.batch, world)?;
    }
    Ok(Some(carry))
}
