//! The state directory on disk: created private (0700), files replaced atomically (write a
//! temporary file, fsync, rename), private keys written 0600 from the first byte.
//!
//! Atomic replacement matters twice: a crash or a full disk mid-write never leaves a
//! half-written key in place of a good one, and a reader (another instance sharing the
//! directory, or our own SIGHUP) sees either the old file or the new one. Files that belong
//! together (a certificate and its key) are all written out before any is renamed into
//! place, so a full disk leaves the old pair, never one new file beside one old or missing.

use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of private keys.
pub(crate) const KEY_MODE: u32 = 0o600;
/// Mode of certificates (public).
pub(crate) const CERT_MODE: u32 = 0o644;
/// Mode of the state directory.
pub(crate) const DIR_MODE: u32 = 0o700;

/// Creates `dir` (and parents) with mode 0700, or tightens an existing one to 0700.
pub(crate) fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(dir = %dir.display(), "state directory was readable by others; tightening to 0700");
                fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))?;
            }
            Ok(())
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "exists and is not a directory",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
        }
        Err(e) => Err(e),
    }
}

/// A file that could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {source}")]
pub struct WriteError {
    pub(crate) path: PathBuf,
    #[source]
    pub(crate) source: io::Error,
}

/// Writes every `(path, contents, mode)` atomically, in order: each is first written whole to
/// a temporary file beside it, and only when all are on disk are they renamed into place.
/// A read-only or full file system fails the writing, before anything has been replaced.
pub(crate) fn write_all_atomic(files: &[(&Path, &[u8], u32)]) -> Result<(), WriteError> {
    let mut staged: Vec<PathBuf> = Vec::with_capacity(files.len());
    let result = (|| {
        for &(path, contents, mode) in files {
            let tmp = temp_path(path);
            staged.push(tmp.clone());
            write_synced(&tmp, contents, mode).map_err(|source| WriteError {
                path: path.to_owned(),
                source,
            })?;
        }
        for (&(path, _, _), tmp) in files.iter().zip(&staged) {
            let renamed = fs::rename(tmp, path).and_then(|()| match path.parent() {
                // Make the rename itself durable.
                Some(parent) => fs::File::open(parent)?.sync_all(),
                None => Ok(()),
            });
            renamed.map_err(|source| WriteError {
                path: path.to_owned(),
                source,
            })?;
        }
        Ok(())
    })();
    if result.is_err() {
        for tmp in &staged {
            let _ = fs::remove_file(tmp);
        }
    }
    result
}

fn write_synced(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp.{}", std::process::id()));
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_private_and_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("proxy-state-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        ensure_private_dir(&dir).expect("create dir");
        assert_eq!(
            fs::metadata(&dir).expect("meta").permissions().mode() & 0o777,
            DIR_MODE
        );
        let key = dir.join("k.key");
        write_all_atomic(&[(&key, b"one", KEY_MODE)]).expect("write");
        write_all_atomic(&[(&key, b"two", KEY_MODE)]).expect("rewrite");
        assert_eq!(fs::read(&key).expect("read"), b"two");
        assert_eq!(
            fs::metadata(&key).expect("meta").permissions().mode() & 0o777,
            KEY_MODE
        );
        assert_eq!(
            fs::read_dir(&dir).expect("list").count(),
            1,
            "no temporary file left behind"
        );
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_set_that_cannot_be_written_whole_replaces_nothing() {
        let dir = std::env::temp_dir().join(format!("proxy-state-set-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        ensure_private_dir(&dir).expect("create dir");
        let (key, cert) = (dir.join("leaf.key"), dir.join("leaf.pem"));
        write_all_atomic(&[
            (&key, b"old key", KEY_MODE),
            (&cert, b"old cert", CERT_MODE),
        ])
        .expect("write the first set");
        // The second file's directory does not exist: staging it fails after the first.
        let unwritable = dir.join("missing").join("leaf.pem");
        let err = write_all_atomic(&[
            (&key, b"new key", KEY_MODE),
            (&unwritable, b"new cert", CERT_MODE),
        ])
        .expect_err("the second file cannot be written");
        assert_eq!(err.path, unwritable);
        assert_eq!(fs::read(&key).expect("key"), b"old key");
        assert_eq!(fs::read(&cert).expect("cert"), b"old cert");
        assert_eq!(
            fs::read_dir(&dir).expect("list").count(),
            2,
            "no temporary file left behind"
        );
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
