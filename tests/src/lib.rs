//! Test harness shared by the integration tests: a real etcd started on free loopback ports,
//! network namespaces with a unique prefix removed on drop, paths to the built binaries.

pub mod bench;
pub mod bins;
pub mod cluster;
pub mod etcd;
pub mod etcd_ha;
pub mod netns;
pub mod podman;
