//! One process per folder: a training run's `out_dir`, a `vet-data prepare` output, the
//! quickstart's folder.
//!
//! The lock is an advisory `flock` (through the `fs4` crate) on `DIR/.vet-lock`, held for as
//! long as the [`DirLock`] lives. The operating system releases it when the process ends, however
//! it ends (`kill -9` included), so a lock left by a dead process is simply taken over by the
//! next one. The holder writes its PID (and host) into the file for the message a second process
//! prints: "DIR is already in use by PID N". The file itself is never deleted: deleting a lock
//! file that another process may have just opened would let two processes hold "the" lock.
//!
//! `vet-data prepare --part i/n` runs share the folder: each takes the folder's lock shared and
//! its own part's lock (`.vet-lock-part-I-of-N`) exclusively, so two runs of the same part, or a
//! part and a whole run, still exclude each other.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use fs4::FileExt;

/// The lock file's name inside a locked folder.
pub const LOCK_FILE: &str = ".vet-lock";

/// A held folder lock; released on drop (or when the process dies).
#[derive(Debug)]
pub struct DirLock {
    file: File,
    path: PathBuf,
    /// Exclusive holders write their PID into the file and clear it on release.
    exclusive: bool,
}

/// How a folder is locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No other process may hold the lock.
    Exclusive,
    /// Others may hold it shared too (parts of one `prepare`), but not exclusively.
    Shared,
}

impl DirLock {
    /// Locks `dir` (created if missing) through `dir/.vet-lock`, failing at once with
    /// "DIR is already in use by PID N" when another live process holds it.
    pub fn acquire(dir: &Path) -> Result<DirLock> {
        DirLock::acquire_file(dir, LOCK_FILE, Mode::Exclusive)
    }

    /// Locks `dir/name` in `mode`; see [`DirLock::acquire`].
    pub fn acquire_file(dir: &Path, name: &str, mode: Mode) -> Result<DirLock> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(name);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        // Trait paths: std's own `File::try_lock` is newer than this crate's minimum Rust.
        let got = match mode {
            Mode::Exclusive => FileExt::try_lock(&file),
            Mode::Shared => FileExt::try_lock_shared(&file),
        };
        match got {
            Ok(()) => {}
            Err(fs4::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                bail!(
                    "{} is already in use by {} (lock file {}): wait for it to finish, or use another folder",
                    dir.display(),
                    holder(&text),
                    path.display()
                );
            }
            Err(fs4::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
        let exclusive = mode == Mode::Exclusive;
        if exclusive {
            let me = format!("{} {}\n", std::process::id(), host());
            file.set_len(0)
                .and_then(|()| file.rewind())
                .and_then(|()| file.write_all(me.as_bytes()))
                .with_context(|| format!("writing lock file {}", path.display()))?;
        }
        Ok(DirLock {
            file,
            path,
            exclusive,
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        if self.exclusive {
            // Still holding the lock: no one else reads a half-cleared file.
            let _ = self.file.set_len(0);
        }
        let _ = FileExt::unlock(&self.file);
    }
}

/// "PID N" (on host H when that is not this host) from a lock file's text.
fn holder(text: &str) -> String {
    let mut words = text.split_whitespace();
    let here = host();
    match (
        words.next().and_then(|p| p.parse::<u32>().ok()),
        words.next(),
    ) {
        (Some(pid), Some(h)) if h != here => format!("PID {pid} on host {h}"),
        // A PID left by a dead exclusive holder while shared holders hold the lock now.
        (Some(pid), _)
            if Path::new("/proc/self").exists() && !Path::new(&format!("/proc/{pid}")).exists() =>
        {
            "another process".into()
        }
        (Some(pid), _) => format!("PID {pid}"),
        // Shared holders (prepare --part runs) do not write their PID.
        _ => "another process".into(),
    }
}

/// This machine's name, for lock files on a shared file system.
fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty() && !h.contains(char::is_whitespace))
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vet-lock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_second_holder_is_refused_naming_the_first_and_gets_the_lock_once_it_is_released() {
        let d = scratch("second");
        let first = DirLock::acquire(&d).unwrap();
        let err = format!("{:#}", DirLock::acquire(&d).unwrap_err());
        let want = format!("already in use by PID {}", std::process::id());
        assert!(
            err.contains(&want) && err.contains(&*d.to_string_lossy()),
            "{err}"
        );
        drop(first);
        let again = DirLock::acquire(&d).unwrap();
        assert!(again.path().is_file());
        drop(again);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn shared_holders_coexist_but_exclude_an_exclusive_one() {
        let d = scratch("shared");
        let a = DirLock::acquire_file(&d, LOCK_FILE, Mode::Shared).unwrap();
        let b = DirLock::acquire_file(&d, LOCK_FILE, Mode::Shared).unwrap();
        let err = format!("{:#}", DirLock::acquire(&d).unwrap_err());
        assert!(err.contains("already in use by another process"), "{err}");
        drop((a, b));
        DirLock::acquire(&d).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }
}
