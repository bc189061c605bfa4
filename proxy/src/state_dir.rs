//! The state directory on disk: created private (0700), files replaced atomically (write a
//! temporary file, fsync, rename), private keys written 0600 from the first byte.
//!
//! Atomic replacement matters twice: a crash or a full disk mid-write never leaves a
//! half-written key in place of a good one, and a reader (another instance sharing the
//! directory, or our own SIGHUP) sees either the old file or the new one.

use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of private keys.
pub const KEY_MODE: u32 = 0o600;
/// Mode of certificates (public).
pub const CERT_MODE: u32 = 0o644;
/// Mode of the state directory.
pub const DIR_MODE: u32 = 0o700;

/// Creates `dir` (and parents) with mode 0700, or tightens an existing one to 0700.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
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

/// Writes `contents` to `path` atomically with the given mode.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(parent) = path.parent() {
            // Make the rename itself durable.
            fs::File::open(parent)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
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
        write_atomic(&key, b"one", KEY_MODE).expect("write");
        write_atomic(&key, b"two", KEY_MODE).expect("rewrite");
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
}
