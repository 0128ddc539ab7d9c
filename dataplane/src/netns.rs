//! Network namespaces: opened by path (`/var/run/netns/<name>`, `/proc/<pid>/ns/net`).
//! `setns` moves only the calling thread, so it is only ever called on a thread that
//! [`NetNs::run_in`] spawns for the purpose and that exits afterwards.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// An open handle to a network namespace. Holding it keeps the namespace alive.
#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
}

impl NetNs {
    /// Opens the namespace at `path`; `Error::Netns` names the path if it is missing or is
    /// not a network namespace.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| Error::Netns {
            path: path.clone(),
            source,
        })?;
        // A bind-mounted nsfs file reports NSFS_MAGIC; anything else (a plain file, a
        // directory) is not a namespace.
        let st = nix::sys::statfs::fstatfs(&file).map_err(|e| Error::Netns {
            path: path.clone(),
            source: e.into(),
        })?;
        if st.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
            return Err(Error::Netns {
                path,
                source: std::io::Error::other("not a network namespace (not on nsfs)"),
            });
        }
        Ok(NetNs { file, path })
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Self> {
        Self::open("/proc/thread-self/ns/net")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns its result.
    /// The thread exits afterwards, so no other code ever runs in the wrong namespace.
    pub fn run_in<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let fd = self
            .file
            .try_clone()
            .map_err(|e| Error::io("dup netns fd", e))?;
        let path = self.path.clone();
        std::thread::Builder::new()
            .name("twill-netns".into())
            .spawn(move || -> Result<T> {
                nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                    Error::Netns {
                        path,
                        source: e.into(),
                    }
                })?;
                Ok(f())
            })
            .map_err(|e| Error::io("spawn netns thread", e))?
            .join()
            .map_err(|_| Error::Invalid("netns thread panicked".into()))?
    }
}
