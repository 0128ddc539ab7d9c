//! STATUS: succeeds when the plugin can serve ADDs at all, and fails (code 50) only when it
//! cannot: the subnet file is missing or invalid, or the allocator's state (data dir, lock,
//! state file) cannot be read. A full subnet is not one of those cases: the runtime would
//! mark the node's network not ready, and Kubernetes would then evict every running pod of
//! the node for what is only a reason to refuse the next ADD (code 11, try again later).

use twill_ipam::alloc::Allocator;

use crate::config::NetConf;
use crate::error::{CniError, Result, code};
use crate::require_version;

pub fn status(conf: &NetConf) -> Result<()> {
    require_version(conf, "STATUS", "1.1.0")?;
    let unavailable = |msg: String| CniError::new(code::NOT_AVAILABLE, msg);
    twill_ipam::subnet_file::SubnetFile::read(&conf.subnet_file)
        .map_err(|e| unavailable(e.to_string()))?;
    // Locking reads and parses the state file: an unreadable one fails every ADD.
    Allocator::new(&conf.data_dir, &conf.name)
        .lock()
        .map_err(|e| unavailable(e.to_string()))?;
    Ok(())
}
