//! Sources: where records come from.

pub mod idle;
pub mod join_watch;
pub mod kafka;
pub mod rewind;
pub mod side_first;
