//! Structured logging into the host's log, where each line is tagged with the pipeline,
//! stage and plugin.
//!
//! On wasm this calls the `sluice:plugin/log` import. Natively (unit tests) there is no
//! host, so lines go to stderr instead: the generated import would only panic there.
//!
//! Logging from `transform` costs a host call per line; keep it off the per-record path
//! unless something is unusual.

/// How important a log line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Trace => "TRACE",
            Level::Debug => "DEBUG",
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        }
    }
}

/// Logs `message` with key/value fields.
pub fn log(level: Level, message: &str, fields: &[(&str, &str)]) {
    imp::log(level, message, fields);
}

pub fn trace(message: &str) {
    log(Level::Trace, message, &[]);
}

pub fn debug(message: &str) {
    log(Level::Debug, message, &[]);
}

pub fn info(message: &str) {
    log(Level::Info, message, &[]);
}

pub fn warn(message: &str) {
    log(Level::Warn, message, &[]);
}

pub fn error(message: &str) {
    log(Level::Error, message, &[]);
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use super::Level;
    use crate::__private::bindings::sluice::plugin::log as host;

    pub(super) fn log(level: Level, message: &str, fields: &[(&str, &str)]) {
        let level = match level {
            Level::Trace => host::Level::Trace,
            Level::Debug => host::Level::Debug,
            Level::Info => host::Level::Info,
            Level::Warn => host::Level::Warn,
            Level::Error => host::Level::Error,
        };
        let fields: Vec<host::Field> = fields
            .iter()
            .map(|(key, value)| host::Field {
                key: (*key).to_owned(),
                value: (*value).to_owned(),
            })
            .collect();
        host::log(level, message, &fields);
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use super::Level;
    use std::fmt::Write;

    pub(super) fn log(level: Level, message: &str, fields: &[(&str, &str)]) {
        let mut line = format!("[plugin {}] {message}", level.as_str());
        for (key, value) in fields {
            let _ = write!(line, " {key}={value:?}");
        }
        eprintln!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_logging_does_not_reach_the_wasm_import() {
        // Natively the generated import is an `unreachable!()` stub; these must not panic.
        trace("t");
        debug("d");
        info("i");
        warn("w");
        error("e");
        log(
            Level::Info,
            "with fields",
            &[("input", "3"), ("topic", "events")],
        );
        assert!(Level::Trace < Level::Error);
    }
}
