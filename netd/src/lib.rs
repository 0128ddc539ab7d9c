//! twilld and twillctl: the node daemon and the operator's CLI.

pub mod cli;
pub mod ctl;
pub mod daemon;
pub mod install_cni;
pub mod logging;
