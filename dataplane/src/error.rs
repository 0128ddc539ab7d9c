use std::path::PathBuf;

/// Errors of the kernel layer. Each carries what was being done and on what object.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("netlink: {op}: {source}")]
    Netlink {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    /// A netlink request that got no answer within its bound (`--netlink-timeout`).
    #[error("netlink: {op}: no answer within {after:?}")]
    Timeout {
        op: String,
        after: std::time::Duration,
    },
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("link {0} not found")]
    LinkNotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("nftables: {0}")]
    Nft(String),
    /// An entry that twill would write is held by someone else: left alone.
    #[error("conflict: {0}")]
    Conflict(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn netlink(op: impl Into<String>, source: rtnetlink::Error) -> Self {
        Error::Netlink {
            op: op.into(),
            source,
        }
    }

    pub fn io(op: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            op: op.into(),
            source,
        }
    }

    /// A request that ran out of time ([`Error::Timeout`]).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// The kernel's errno behind a netlink error, if there is one (e.g. `libc::EEXIST`): the
    /// one errno check of the crate and its callers.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Netlink { source, .. } => crate::netlink::errno(source),
            Error::Io { source, .. } | Error::Netns { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// The kernel's answer that the object is not there (ENOENT, ESRCH, ENODEV): what a delete
    /// of something already gone gets.
    pub fn is_missing(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::ENOENT | libc::ESRCH | libc::ENODEV)
        )
    }
}
