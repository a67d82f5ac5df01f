//! Atomic, durable file writes: the one way every crate of the workspace replaces a file.
//!
//! The new contents go to a temporary file beside the target (a `tempfile::NamedTempFile` in
//! the same folder, named `.NAME.XXXXXX.tmp`), which is fsync'd, renamed over the target, and
//! then the folder is fsync'd so the rename itself survives a crash. A crash or an error
//! leaves either the old file or the new one, never half of one; the temporary file is
//! removed on any error.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;

use crate::error::{Error, Result};

/// Writes `bytes` to `path` atomically and durably.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_write_with(path, |f| f.write_all(bytes)).map_err(|e| Error::io(path, e))
}

/// Writes `path` atomically and durably with `write`, which gets the temporary file (empty,
/// opened for writing). Errors are plain `io::Error`s so any crate can wrap them its own way.
pub fn atomic_write_with(
    path: &Path,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let (mut tmp, dir) = temp_beside(path)?;
    write(tmp.as_file_mut())?;
    commit(tmp, path, &dir)
}

/// Like [`atomic_write_with`] for writers that need a path (they create or truncate the file at
/// that path themselves, as `safetensors::serialize_to_file` does).
pub(crate) fn atomic_write_path(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let (tmp, dir) = temp_beside(path).map_err(|e| Error::io(path, e))?;
    write(tmp.path())?;
    // The writer may have replaced the file at the temporary path rather than truncated it:
    // reopen it by path so the fsync reaches what it wrote.
    File::options()
        .write(true)
        .open(tmp.path())
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(tmp.path(), e))?;
    commit(tmp, path, &dir).map_err(|e| Error::io(path, e))
}

/// Makes a rename inside `dir` durable. Not every platform or file system can fsync a folder;
/// what was renamed is already complete and in place, so a failure here is ignored.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A fresh temporary file in `path`'s folder, and that folder.
fn temp_beside(path: &Path) -> io::Result<(NamedTempFile, PathBuf)> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a file path", path.display()),
        )
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let prefix = format!(".{}.", name.to_string_lossy());
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    // A temporary file is private (0600), but what it becomes is an ordinary file: the mode of
    // the file it replaces, else what `File::create` gives (0666 less the umask), so that a
    // colleague, a service user or ollama can read a checkpoint or an export.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).map_or(0o666, |m| m.permissions().mode() & 0o777);
        builder.permissions(std::fs::Permissions::from_mode(mode));
    }
    let tmp = builder.tempfile_in(&dir)?;
    Ok((tmp, dir))
}

/// fsyncs `tmp`, renames it over `path` and fsyncs `dir`. Dropping a `NamedTempFile` (on any
/// error before the rename) removes it.
fn commit(tmp: NamedTempFile, path: &Path, dir: &Path) -> io::Result<()> {
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("reference-fs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_write_replaces_the_file_and_leaves_nothing_beside_it() {
        let dir = scratch("replace");
        let path = dir.join("a.json");
        atomic_write(&path, b"old").unwrap();
        atomic_write(&path, b"new contents").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new contents");
        assert_eq!(entries(&dir), ["a.json"]);
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_removes_the_temporary() {
        let dir = scratch("fail");
        let path = dir.join("a.bin");
        atomic_write(&path, b"old").unwrap();
        let err = atomic_write_with(&path, |f| {
            f.write_all(b"half")?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(entries(&dir), ["a.bin"]);

        let err = atomic_write_path(&path, |tmp| {
            std::fs::write(tmp, b"half").map_err(|e| Error::io(tmp, e))?;
            Err(Error::io(tmp, io::Error::other("no space")))
        })
        .unwrap_err();
        assert!(err.to_string().contains("no space"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(entries(&dir), ["a.bin"]);
    }

    #[test]
    fn a_path_writer_that_recreates_the_file_is_persisted() {
        let dir = scratch("path");
        let path = dir.join("m.safetensors");
        atomic_write_path(&path, |tmp| {
            std::fs::remove_file(tmp).map_err(|e| Error::io(tmp, e))?;
            std::fs::write(tmp, b"recreated").map_err(|e| Error::io(tmp, e))
        })
        .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"recreated");
        assert_eq!(entries(&dir), ["m.safetensors"]);
    }

    #[test]
    fn a_missing_folder_is_an_error_naming_the_file() {
        let dir = scratch("missing");
        let path = dir.join("no/such/folder/x.json");
        let err = atomic_write(&path, b"x").unwrap_err();
        assert!(err.to_string().contains("x.json"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn a_new_file_gets_the_mode_file_create_gives_and_a_replaced_one_keeps_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("mode");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let probe = dir.join("probe");
        File::create(&probe).unwrap();
        let path = dir.join("model.safetensors");
        atomic_write(&path, b"one").unwrap();
        assert_eq!(mode(&path), mode(&probe), "0666 less the umask, not 0600");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        atomic_write(&path, b"two").unwrap();
        assert_eq!(mode(&path), 0o640 & mode(&probe));
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
    }
}
