//! twilld and twillctl: the node daemon and the operator's CLI.
