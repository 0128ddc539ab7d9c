//! STATUS: succeeds when the plugin could serve an ADD (the subnet file is readable and
//! valid, the data dir is usable, the subnet has a free IP); otherwise code 50.

use twill_ipam::alloc::Allocator;

use crate::config::NetConf;
use crate::error::{CniError, Result, code};
use crate::require_version;

pub fn status(conf: &NetConf) -> Result<()> {
    require_version(conf, "STATUS", "1.1.0")?;
    let unavailable = |msg: String| CniError::new(code::NOT_AVAILABLE, msg);
    let subnet = twill_ipam::subnet_file::SubnetFile::read(&conf.subnet_file)
        .map_err(|e| unavailable(e.to_string()))?;
    let locked = Allocator::new(&conf.data_dir, &conf.name)
        .lock()
        .map_err(|e| unavailable(e.to_string()))?;
    let net = subnet.node_subnet();
    let used = locked
        .reservations()
        .iter()
        .filter(|r| net.contains(&r.ip))
        .count() as u128;
    let host_bits = (net.max_prefix_len() - net.prefix_len()) as u32;
    // Every address but network, gateway and broadcast.
    let capacity = 2u128.saturating_pow(host_bits).saturating_sub(3);
    if used >= capacity {
        return Err(unavailable(format!(
            "no free IP left in subnet {net} ({used} reserved)"
        )));
    }
    Ok(())
}
