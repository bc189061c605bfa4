//! Scratch directories removed when dropped, unless a panic is unwinding (a failed test keeps
//! its files for a post-mortem) or an environment variable asks to keep them.

use std::fs::Permissions;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

/// A fresh, empty directory under the system's temporary directory.
#[derive(Debug)]
pub struct TempDir {
    dir: tempfile::TempDir,
    keep_var: Option<&'static str>,
}

impl TempDir {
    /// Creates `<tmp>/<prefix>XXXXXX`, with the mode `mkdir` would give it: the servers
    /// started in it may drop privileges and still need to find their files.
    pub fn new(prefix: &str) -> io::Result<TempDir> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .permissions(Permissions::from_mode(0o777))
            .tempdir()?;
        Ok(TempDir {
            dir,
            keep_var: None,
        })
    }

    /// Also keeps the directory when the environment variable `var` is set.
    pub fn kept_when_set(mut self, var: &'static str) -> TempDir {
        self.keep_var = Some(var);
        self
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let asked = self
            .keep_var
            .is_some_and(|var| std::env::var_os(var).is_some());
        if std::thread::panicking() || asked {
            self.dir.disable_cleanup(true);
            eprintln!("kept test files in {}", self.dir.path().display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_unless_kept() {
        let dir = TempDir::new("proxy-testkit-tempdir-").expect("a temporary directory");
        let path = dir.path().to_owned();
        assert!(path.is_dir());
        assert!(
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("proxy-testkit-tempdir-"))
        );
        drop(dir);
        assert!(!path.exists());

        let kept = std::thread::spawn(|| {
            let dir = TempDir::new("proxy-testkit-tempdir-").expect("a temporary directory");
            let path = dir.path().to_owned();
            let _dir = dir;
            std::panic::panic_any(path);
        })
        .join()
        .expect_err("the thread panicked");
        let path = kept.downcast::<std::path::PathBuf>().expect("the path");
        assert!(path.is_dir(), "kept after a panic");
        std::fs::remove_dir(*path).expect("removing the kept directory");
    }
}
