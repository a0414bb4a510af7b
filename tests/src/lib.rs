pub mod bench;
pub mod plugins;
pub mod services;
pub mod sluice;
pub mod workload;
