//! A hostile plugin for the sandbox tests. Each record is a JSON object whose `action` says how
//! to misbehave; anything else passes through as a row:
//!
//! - `trap`: panics (a trap for the host);
//! - `loop`: spins forever (the host's time limit must stop it);
//! - `alloc`: allocates without bound (the host's memory limit must stop it);
//! - `explode`: returns 100 copies of the record (output limit);
//! - `read_file`, `env`, `socket`: tries to escape the sandbox and reports what it got, so a
//!   test can check that nothing was granted.

use sluice_guest::prelude::*;

pub struct Hostile;

fn escape_attempt(action: &str) -> String {
    match action {
        "read_file" => match std::fs::read_to_string("/etc/passwd") {
            Ok(s) => format!("read {} bytes", s.len()),
            Err(e) => format!("denied: {e}"),
        },
        "env" => {
            let vars: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
            if vars.is_empty() {
                "denied: no environment".into()
            } else {
                format!("got {vars:?}")
            }
        }
        "socket" => match std::net::TcpStream::connect("127.0.0.1:22") {
            Ok(_) => "connected".into(),
            Err(e) => format!("denied: {e}"),
        },
        _ => String::new(),
    }
}

impl Transform for Hostile {
    fn init(_: Config) -> Result<Self, String> {
        Ok(Hostile)
    }

    fn transform(&self, record: &Record) -> Result<Output, RecordError> {
        let mut v = record.json_value()?;
        let action = v
            .get("action")
            .and_then(|a| a.as_str())
            .unwrap_or("")
            .to_string();
        match action.as_str() {
            "trap" => panic!("hostile plugin: trap requested"),
            "loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "explode" => {
                let rows = (0..100).map(|_| v.clone()).collect::<Vec<_>>();
                Ok(Output::many(rows.into_iter().map(Row::new)))
            }
            "read_file" | "env" | "socket" => {
                v["escape"] = escape_attempt(&action).into();
                Ok(Output::row(v))
            }
            _ => Ok(Output::row(v)),
        }
    }
}

sluice_guest::export!(Hostile);
