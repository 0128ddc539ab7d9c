//! Crash-safe file replacement, the two ways twill does it:
//!
//! - [`replace_file`] / [`replace_file_with`]: a fresh temp file beside the target, written,
//!   given its mode, fsynced, renamed over the target, the directory fsynced. Used for the
//!   subnet file, the installed CNI plugin and conflist, and twillctl's diag archive.
//! - [`swap_file`]: the pod IP allocator's state, swapped with a spare copy that is reused on
//!   every write (`renameat2(RENAME_EXCHANGE)`): the CNI plugin writes it on every ADD and
//!   DEL, so no inode is created or freed per write, and the previous version stays on disk
//!   as a good copy to recover from (`alloc`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The marker in the name of [`replace_file`]'s temp files, `.<name>.twill-tmp.<pid>`: a
/// temp file left by a crash can be found and removed by this name. The name never ends in
/// `.conf`, `.conflist` or `.json`, so libcni never loads a temp file as a config.
pub const TMP_MARKER: &str = ".twill-tmp.";

/// The directory that holds `path` (`.` for a bare file name).
fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// The temp file [`replace_file`] writes before renaming it over `path`.
pub fn temp_path(path: &Path) -> std::io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("path has no file name"))?;
    Ok(dir_of(path).join(format!(
        ".{}{TMP_MARKER}{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// Replaces `path` with `data`, crash-safe, with permission bits `mode` (exactly: not
/// filtered by the umask). See [`replace_file_with`].
pub fn replace_file(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    replace_file_with(path, mode, |f| f.write_all(data))
}

/// Replaces `path` with what `write` writes, crash-safe: a temp file beside it
/// ([`temp_path`]), `write`, chmod `mode`, fsync, rename over `path`, fsync of the directory
/// (so that the rename itself survives a power cut). Readers see the old or the new file,
/// never a part of one. The directory is created if missing; the temp file is removed on
/// failure.
pub fn replace_file_with(
    path: &Path,
    mode: u32,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = dir_of(path);
    std::fs::create_dir_all(dir)?;
    let tmp = temp_path(path)?;
    let res = (|| {
        // A temp file of the same name left by a crash is truncated (in a container twilld
        // is often PID 1 on every start).
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        write(&mut f)?;
        // open(2)'s mode is filtered by the umask, and an existing file keeps its own.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Fsyncs the directory holding `path`, so that a rename in it survives a power cut.
pub fn sync_dir(path: &Path) -> std::io::Result<()> {
    File::open(dir_of(path))?.sync_all()
}

/// Overwrites `path` in place with `data` (created if missing, cut to its length) and
/// fsyncs it. Not atomic: for a file that has a good copy elsewhere while it is written.
pub fn overwrite_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    f.write_all_at(data, 0)?;
    f.set_len(data.len() as u64)?;
    f.sync_all()
}

/// Replaces `path` with `data` through the spare copy `spare` beside it: `data` is written
/// into `spare` (the previous version's file, reused: no inode is created or freed) and
/// fsynced, then the two are swapped in one atomic rename (`renameat2(RENAME_EXCHANGE)`) and
/// the directory is fsynced. At every instant one of the two files is a complete, fsynced
/// version: `path` while the spare is being written, both after the swap, when `spare`
/// holds the previous version. Where the file system cannot exchange, and for the first
/// write (no `path` yet), a plain rename.
pub fn swap_file(path: &Path, spare: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    if path.file_name().is_none() {
        return Err(std::io::Error::other("path has no file name"));
    }
    overwrite_file(spare, data)?;
    let c =
        |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (from, to) = (c(spare)?, c(path)?);
    // SAFETY: two NUL-terminated paths that live across the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r != 0 {
        match std::io::Error::last_os_error() {
            // No file at `path` yet, or a file system without RENAME_EXCHANGE.
            e if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
            ) =>
            {
                std::fs::rename(spare, path)?
            }
            e => return Err(e),
        }
    }
    // The swap is on disk before this returns: `path` is then the version just written,
    // and `spare` the previous one.
    sync_dir(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn replace_sets_the_exact_mode_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/file");
        replace_file(&path, b"one", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o600);
        // A wider mode than the umask lets open(2) give is set too.
        replace_file(&path, b"two", 0o755).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o755);
        assert_eq!(names(path.parent().unwrap()), ["file"]);
    }

    #[test]
    fn a_stale_temp_of_the_same_name_is_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        let tmp = temp_path(&path).unwrap();
        assert!(tmp.to_string_lossy().contains(TMP_MARKER));
        std::fs::write(&tmp, b"a much longer leftover of a crashed write").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
        replace_file(&path, b"new", 0o644).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o644);
        assert!(!tmp.exists());
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_removes_the_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        replace_file(&path, b"old", 0o644).unwrap();
        let e = replace_file_with(&path, 0o644, |f| {
            f.write_all(b"half")?;
            Err(std::io::Error::other("writer failed"))
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "writer failed");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["f"]);
        // A directory in the way: the rename fails, nothing is left behind.
        let d = dir.path().join("d");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("x"), b"").unwrap();
        assert!(replace_file(&d, b"x", 0o644).is_err());
        assert_eq!(names(dir.path()), ["d", "f"]);
    }

    #[test]
    fn swap_reuses_the_spare_and_keeps_the_previous_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let spare = dir.path().join(".state.json.next");
        swap_file(&path, &spare, b"version one, the longest").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"version one, the longest");
        assert!(!spare.exists(), "the first write is a plain rename");
        swap_file(&path, &spare, b"version two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"version two");
        assert_eq!(std::fs::read(&spare).unwrap(), b"version one, the longest");
        // The previous version's file is reused and cut to the new length.
        let inodes = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let before = [inodes(&path), inodes(&spare)];
        swap_file(&path, &spare, b"v3").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"v3");
        assert_eq!(std::fs::read(&spare).unwrap(), b"version two");
        assert_eq!(
            [inodes(&spare), inodes(&path)],
            before,
            "the inodes swapped"
        );
    }

    #[test]
    fn overwrite_cuts_to_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        overwrite_file(&path, b"long content").unwrap();
        overwrite_file(&path, b"s").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"s");
    }
}
