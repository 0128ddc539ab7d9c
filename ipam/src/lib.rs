//! twill's address management: the network config (Flannel's net-conf.json), subnet math,
//! the subnet file shared with the CNI plugin, the on-disk pod IP allocator and (feature
//! `etcd`) the etcd lease store. Nothing here touches the kernel.

pub mod alloc;
pub mod fsutil;
pub mod fuzz_checks;
pub mod lease;
pub mod mac;
pub mod netconf;
#[cfg(feature = "etcd")]
pub mod store;
pub mod subnet_file;
pub mod subnets;
