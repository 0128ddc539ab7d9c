//! The plugin's error: a CNI error code, a message that names the field and the value at
//! fault, and details. Printed on stdout as `{"cniVersion","code","msg","details"}`.

use serde_json::json;

/// CNI spec error codes, and twill's own (≥ 100, see docs/cni.md).
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in the network configuration (or in CNI_ARGS).
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables (CNI_COMMAND, CNI_CONTAINERID, ...).
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO: u32 = 5;
    /// Failed to decode content (stdin is not JSON).
    pub const DECODE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later (the subnet file is not written yet, the subnet is full).
    pub const TRY_AGAIN: u32 = 11;
    /// STATUS: the plugin cannot serve ADD.
    pub const NOT_AVAILABLE: u32 = 50;
    /// twill: the requested IP is reserved by another container.
    pub const IP_TAKEN: u32 = 101;
    /// twill: the allocator's state file is corrupt.
    pub const STATE_CORRUPT: u32 = 102;
    /// twill: the kernel refused a netlink request.
    pub const KERNEL: u32 = 110;
    /// twill: the host veth name ADD would use is taken by a link that is not this
    /// container's twill veth (left alone).
    pub const LINK_NOT_OURS: u32 = 111;
    /// twill: CHECK found the pod's network not as ADD left it.
    pub const CHECK_FAILED: u32 = 120;
}

/// A CNI error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg} ({code}): {details}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The error as the JSON the spec asks for, in the request's version.
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

impl From<twill_ipam::alloc::AllocError> for CniError {
    fn from(e: twill_ipam::alloc::AllocError) -> Self {
        use twill_ipam::alloc::AllocError as A;
        let c = match &e {
            A::Io { .. } => code::IO,
            A::Corrupt { .. } => code::STATE_CORRUPT,
            A::Full { .. } => code::TRY_AGAIN,
            A::OutOfRange { .. } => code::INVALID_CONFIG,
            A::Taken { .. } => code::IP_TAKEN,
        };
        CniError::new(c, e.to_string())
    }
}

impl From<twill_dataplane::Error> for CniError {
    fn from(e: twill_dataplane::Error) -> Self {
        let details = std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_default();
        CniError::new(code::KERNEL, e.to_string()).with_details(details)
    }
}

pub type Result<T, E = CniError> = std::result::Result<T, E>;
