//! Network namespaces: opened by path (`/var/run/netns/<name>`, `/proc/<pid>/ns/net`).
//! `setns` moves only the calling thread, so it is only ever called on a thread that
//! [`NetNs::run_in`] spawns for the purpose and that exits afterwards.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// `NS_GET_NSTYPE` (linux/nsfs.h: `_IO(0xb7, 0x3)`): the CLONE_NEW* type of a namespace fd.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

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
        // nsfs holds every kind of namespace (/proc/self/ns/mnt is on it too): ask the
        // kernel which kind this descriptor is, the one that setns and IFLA_NET_NS_FD use.
        // SAFETY: NS_GET_NSTYPE takes no argument and only reads the descriptor.
        let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
        if kind < 0 {
            return Err(Error::Netns {
                path,
                source: std::io::Error::last_os_error(),
            });
        }
        if kind != libc::CLONE_NEWNET {
            return Err(Error::Netns {
                path,
                source: std::io::Error::other(format!(
                    "not a network namespace (a namespace of type {kind:#x})"
                )),
            });
        }
        Ok(NetNs { file, path })
    }

    /// Whether this is the network namespace the calling process runs in (compared by
    /// device and inode of the open descriptor and of `/proc/self/ns/net`).
    pub fn is_own(&self) -> Result<bool> {
        let mine = nix::sys::stat::fstat(&self.file).map_err(|e| Error::Netns {
            path: self.path.clone(),
            source: e.into(),
        })?;
        let own = nix::sys::stat::stat("/proc/self/ns/net").map_err(|e| Error::Netns {
            path: "/proc/self/ns/net".into(),
            source: e.into(),
        })?;
        Ok(mine.st_dev == own.st_dev && mine.st_ino == own.st_ino)
    }

    /// A second handle on the same namespace (a duplicated descriptor, not a new open).
    pub fn try_clone(&self) -> Result<Self> {
        Ok(NetNs {
            file: self
                .file
                .try_clone()
                .map_err(|e| Error::io("dup netns fd", e))?,
            path: self.path.clone(),
        })
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
        self.spawn_in(f)?
            .join()
            .map_err(|_| Error::Invalid("netns thread panicked".into()))?
    }

    /// [`NetNs::run_in`] without waiting: the thread is started and the caller goes on; its
    /// result comes with `join`. The thread enters this very descriptor (duplicated), never
    /// the path opened again: what was checked is what is entered.
    pub fn spawn_in<T, F>(&self, f: F) -> Result<std::thread::JoinHandle<Result<T>>>
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
                // setns moves only this thread, which exits once `f` returns.
                nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                    Error::Netns {
                        path,
                        source: e.into(),
                    }
                })?;
                Ok(f())
            })
            .map_err(|e| Error::io("spawn netns thread", e))
    }
}
