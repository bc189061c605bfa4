//! Copying a directory tree: test fixtures (the monitoring files with their addresses
//! rewritten, systemd's units for `systemd-analyze`) and the RustSec snapshot that
//! cargo-deny must own. Symbolic links are copied as links; every file is written anew, so the
//! copy is writable whatever the source's modes.

use std::io;
use std::path::Path;

/// Copies `from` into `to` (created if missing), each regular file's bytes passed through
/// `edit(path relative to from, bytes)` on the way.
pub fn copy_tree(
    from: &Path,
    to: &Path,
    edit: &dyn Fn(&Path, Vec<u8>) -> Vec<u8>,
) -> io::Result<()> {
    copy_below(from, to, Path::new(""), edit)
}

fn copy_below(
    from: &Path,
    to: &Path,
    relative: &Path,
    edit: &dyn Fn(&Path, Vec<u8>) -> Vec<u8>,
) -> io::Result<()> {
    let (source, dest) = (from.join(relative), to.join(relative));
    std::fs::create_dir_all(&dest).map_err(|e| with_path(e, &dest))?;
    for entry in std::fs::read_dir(&source).map_err(|e| with_path(e, &source))? {
        let entry = entry?;
        let relative = relative.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_below(from, to, &relative, edit)?;
        } else if kind.is_symlink() {
            let target = std::fs::read_link(entry.path())?;
            std::os::unix::fs::symlink(target, to.join(&relative))
                .map_err(|e| with_path(e, &to.join(&relative)))?;
        } else {
            let bytes = std::fs::read(entry.path()).map_err(|e| with_path(e, &entry.path()))?;
            std::fs::write(to.join(&relative), edit(&relative, bytes))
                .map_err(|e| with_path(e, &to.join(&relative)))?;
        }
    }
    Ok(())
}

/// `error`, saying which path it is about.
fn with_path(error: io::Error, path: &Path) -> io::Error {
    io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::TempDir;

    #[test]
    fn copies_files_links_and_subfolders_editing_files() {
        let source = TempDir::new("tree-source").expect("temp dir");
        let dest = TempDir::new("tree-dest").expect("temp dir");
        let (from, to) = (source.path(), dest.path().join("copy"));
        std::fs::create_dir_all(from.join("rules")).expect("mkdir");
        std::fs::write(from.join("rules/a.yml"), "job=\"proxy\"").expect("write");
        std::fs::write(from.join("top.txt"), "kept").expect("write");
        std::fs::set_permissions(from.join("top.txt"), std::fs::Permissions::from_mode(0o444))
            .expect("chmod");
        std::os::unix::fs::symlink("/dev/null", from.join("masked.service")).expect("symlink");

        copy_tree(from, &to, &|path, bytes| {
            if path == Path::new("rules/a.yml") {
                String::from_utf8_lossy(&bytes)
                    .replace("proxy", "edge")
                    .into_bytes()
            } else {
                bytes
            }
        })
        .expect("copy");

        assert_eq!(
            std::fs::read_to_string(to.join("rules/a.yml")).expect("read"),
            "job=\"edge\""
        );
        assert_eq!(
            std::fs::read_to_string(to.join("top.txt")).expect("read"),
            "kept"
        );
        let mode = std::fs::metadata(to.join("top.txt"))
            .expect("meta")
            .permissions()
            .mode();
        assert!(mode & 0o200 != 0, "the copy is writable: {mode:o}");
        assert_eq!(
            std::fs::read_link(to.join("masked.service")).expect("a link"),
            Path::new("/dev/null")
        );
    }
}
