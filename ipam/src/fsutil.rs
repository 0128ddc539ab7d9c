//! Crash-safe file replacement (temp file, fsync, rename), used for the subnet file. The pod
//! IP allocator swaps its state with a reused temp file instead (`alloc::replace_file`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

/// Replaces `path` with `data` crash-safe: a temp file beside it, fsync, rename. After a
/// crash the file is the old or the new version, never a mix. With `sync_dir` the directory
/// is fsynced too, so that the rename itself survives a power cut. The directory is created
/// if missing; the temp file is removed on failure.
pub fn replace_file(path: &Path, data: &[u8], sync_dir: bool) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if sync_dir {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}
