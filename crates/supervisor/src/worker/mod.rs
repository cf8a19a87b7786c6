//! One worker slot: the process and the actor that owns it.
pub mod process;
pub mod slot;
