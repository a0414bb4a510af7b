pub mod bench;
pub mod faults;
pub mod plugins;
pub mod services;
pub mod sluice;
pub mod workload;
