//! Payload checksums of a run's token shards, checked on a background thread while training
//! starts.
//!
//! Opening a split already checks each shard's header (its own CRC-32), length and manifest
//! entry. The payload CRC-32 needs a pass over every byte, which for a large corpus takes longer
//! than a run should wait before its first step; so one thread streams through the shards
//! (mapped, so memory does not grow) while the loop trains, and the loop asks after every step.
//! A corrupt shard stops the run, naming the shard, before its next checkpoint.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::thread::JoinHandle;

use anyhow::{anyhow, Context, Result};

use super::manifest::Manifest;
use super::shard::Shard;

/// The background check of some shards.
pub struct ShardCheck {
    rx: Receiver<Result<(), String>>,
    thread: Option<JoinHandle<()>>,
    /// Set once the thread has reported success.
    passed: bool,
}

impl ShardCheck {
    /// Starts checking every shard of `splits` of the manifest at `manifest` (file or folder).
    pub fn spawn(manifest: &Path, splits: &[&str]) -> Result<ShardCheck> {
        let (m, dir) = Manifest::load(manifest)?;
        let mut paths: Vec<PathBuf> = Vec::new();
        for split in splits {
            paths.extend(m.split(split)?.shards.iter().map(|e| dir.join(&e.file)));
        }
        ShardCheck::spawn_paths(paths)
    }

    /// Starts checking the shards at `paths`, in order.
    pub fn spawn_paths(paths: Vec<PathBuf>) -> Result<ShardCheck> {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("shard-checksums".into())
            .spawn(move || {
                let result = paths
                    .iter()
                    .try_for_each(|p| Shard::open(p).and_then(|s| s.verify()))
                    .map_err(|e| e.to_string());
                // The receiver may be gone (the run ended another way): nothing to tell.
                let _ = tx.send(result);
            })
            .context("starting the shard checksum thread")?;
        Ok(ShardCheck {
            rx,
            thread: Some(thread),
            passed: false,
        })
    }

    /// `Err` naming the shard when the check has found a corrupt one; `Ok` while it runs.
    pub fn poll(&mut self) -> Result<()> {
        if self.passed {
            return Ok(());
        }
        match self.rx.try_recv() {
            Ok(r) => self.finish(r),
            Err(TryRecvError::Empty) => Ok(()),
            Err(TryRecvError::Disconnected) => self.finish(Err("the checksum thread died".into())),
        }
    }

    /// Waits for the check to end; `Err` naming the shard when one is corrupt.
    pub fn wait(&mut self) -> Result<()> {
        if self.passed {
            return Ok(());
        }
        let r = self
            .rx
            .recv()
            .unwrap_or_else(|_| Err("the checksum thread died".into()));
        self.finish(r)
    }

    fn finish(&mut self, r: Result<(), String>) -> Result<()> {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        match r {
            Ok(()) => {
                self.passed = true;
                Ok(())
            }
            Err(e) => Err(anyhow!(
                "{e}; the training data is damaged: re-run vet-data prepare (vet-data inspect checks a shard)"
            )),
        }
    }
}
