//! Files the command writes (traces, SVGs), written atomically.
//!
//! A file is written to a temporary file in the same directory and renamed over the target,
//! so a run that fails — or is killed — leaves either the old file or the new one, never a
//! partial one. [`AtomicOutput::prepare`] checks that the target can be written *before* a
//! long run starts, so `dmatx demo --trace /nonexistent/x.json` fails at once instead of after
//! the run.
//!
//! ```no_run
//! use dmatx_cli::output::AtomicOutput;
//!
//! let out = AtomicOutput::prepare("trace.json".as_ref())?; // fails fast: no directory, no permission
//! // ... the long run ...
//! out.write(b"{\"traceEvents\": []}")?;
//! # Ok::<(), dmatx_cli::output::OutputError>(())
//! ```

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A file that could not be written: the path and the operating system's reason.
///
/// Its `Display` is one line: `cannot write PATH: REASON`.
#[derive(Debug)]
pub struct OutputError {
    path: PathBuf,
    reason: io::Error,
}

impl OutputError {
    fn new(path: &Path, reason: io::Error) -> Self {
        Self {
            path: path.to_path_buf(),
            reason,
        }
    }

    /// The file that could not be written.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl fmt::Display for OutputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot write {}: {}", self.path.display(), self.reason)
    }
}

impl std::error::Error for OutputError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.reason)
    }
}

impl From<OutputError> for String {
    fn from(e: OutputError) -> Self {
        e.to_string()
    }
}

/// A target file checked for writability, to be written atomically later.
#[derive(Clone, Debug)]
pub struct AtomicOutput {
    path: PathBuf,
}

impl AtomicOutput {
    /// Checks now that `path` can be written: its directory exists and takes a new file (one is
    /// created and removed), and `path` is not a directory.
    ///
    /// # Errors
    /// [`OutputError`] naming `path` and the reason.
    pub fn prepare(path: &Path) -> Result<Self, OutputError> {
        if path.as_os_str().is_empty() {
            return Err(OutputError::new(
                path,
                io::Error::new(io::ErrorKind::InvalidInput, "empty file name"),
            ));
        }
        if path.is_dir() {
            return Err(OutputError::new(
                path,
                io::Error::new(io::ErrorKind::IsADirectory, "is a directory"),
            ));
        }
        let (file, temp) = create_temp(path).map_err(|e| OutputError::new(path, e))?;
        drop(file);
        fs::remove_file(&temp).map_err(|e| OutputError::new(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    /// The target file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `bytes` to the target atomically (see [`write_atomic`]).
    ///
    /// # Errors
    /// [`OutputError`] naming the path and the reason; the target is then unchanged.
    pub fn write(&self, bytes: &[u8]) -> Result<(), OutputError> {
        write_atomic(&self.path, bytes)
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory, synced and then
/// renamed over `path`: on any failure the temporary file is removed and `path` is untouched.
///
/// # Errors
/// [`OutputError`] naming `path` and the operating system's reason.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), OutputError> {
    let (mut file, temp) = create_temp(path).map_err(|e| OutputError::new(path, e))?;
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| {
            drop(file);
            fs::rename(&temp, path)
        });
    if let Err(e) = written {
        // The temporary file is ours; if it cannot be removed either, the write's error is the
        // one worth reporting.
        let _ = fs::remove_file(&temp);
        return Err(OutputError::new(path, e));
    }
    Ok(())
}

/// Creates a new, uniquely named temporary file next to `path`.
fn create_temp(path: &Path) -> io::Result<(File, PathBuf)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("directory {} does not exist", dir.display()),
        ));
    }
    loop {
        // ORDERING: only uniqueness matters.
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".{}.{n}.tmp", std::process::id()));
        let temp = dir.join(temp_name);
        match OpenOptions::new().write(true).create_new(true).open(&temp) {
            Ok(file) => return Ok((file, temp)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "dmatx-output-{}-{name}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn writes_and_replaces_leaving_no_temporary_file() {
        let dir = scratch("replace");
        let path = dir.join("out.json");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(entries(&dir), ["out.json"]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_directory_is_one_line_naming_the_path() {
        let path = Path::new("/nonexistent-dmatx-dir/x.json");
        let e = AtomicOutput::prepare(path).unwrap_err();
        let message = e.to_string();
        assert!(
            message.contains("/nonexistent-dmatx-dir/x.json"),
            "{message}"
        );
        assert!(message.contains("does not exist"), "{message}");
        assert!(!message.contains('\n'));
        assert!(write_atomic(path, b"x").is_err());
    }

    #[test]
    fn a_directory_is_not_a_target() {
        let dir = scratch("isdir");
        let e = AtomicOutput::prepare(&dir).unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
        // The rename onto a directory fails and the temporary file goes away with it.
        let target = dir.join("sub");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("keep"), b"k").unwrap();
        assert!(write_atomic(&target, b"data").is_err());
        assert_eq!(entries(&dir), ["sub"]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn prepare_leaves_nothing_behind_and_write_goes_through() {
        let dir = scratch("prepare");
        let path = dir.join("plot.svg");
        let out = AtomicOutput::prepare(&path).unwrap();
        assert!(entries(&dir).is_empty());
        out.write(b"<svg/>").unwrap();
        assert_eq!(entries(&dir), ["plot.svg"]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn read_only_directory_fails_up_front() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("readonly");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o555)).unwrap();
        let probe = dir.join("probe");
        // Root ignores directory permissions; the check then has nothing to show.
        let enforced = File::create(&probe).is_err();
        let _ = fs::remove_file(&probe);
        if enforced {
            let path = dir.join("x.json");
            let e = AtomicOutput::prepare(&path).unwrap_err();
            assert!(e.to_string().contains("x.json"), "{e}");
            assert!(write_atomic(&path, b"x").is_err());
            assert!(entries(&dir).is_empty());
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        fs::remove_dir_all(dir).unwrap();
    }
}
