//! twillctl's commands, one file per command.
