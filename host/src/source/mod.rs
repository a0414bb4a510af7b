//! Sources: where records come from.

pub mod kafka;
pub mod rewind;
