//! The readable diff of `sluice plugin test`: per differing input, `-` lines for what
//! `expected.jsonl` says and `+` lines for what the plugin did; rows that differ in a few
//! fields show just those fields (as JSON pointers).

use std::collections::BTreeSet;
use std::fmt::{self, Write as _};

use serde_json::Value;

use super::fixtures::Expected;
use super::runner::{header_map, matches, Actual, TestReport};

/// Long values are cut to this many characters.
const MAX_SHOWN: usize = 300;

fn cut(s: String) -> String {
    match s.char_indices().nth(MAX_SHOWN) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

fn table_str(table: &Option<String>) -> String {
    match table {
        Some(t) => format!(" → table {t:?}"),
        None => String::new(),
    }
}

fn describe_expected(e: &Expected) -> String {
    match e {
        Expected::Row { table, row, .. } => cut(format!("row {row}{}", table_str(table))),
        Expected::Error { kind, message } => match message {
            Some(m) => format!("error {kind}, message containing {m:?}"),
            None => format!("error {kind}"),
        },
    }
}

fn describe_actual(a: &Actual) -> String {
    match a {
        Actual::Row {
            table, row, json, ..
        } => {
            let shown = if *json {
                row.to_string()
            } else {
                format!("(not JSON) {row}")
            };
            cut(format!("row {shown}{}", table_str(table)))
        }
        Actual::Error { kind, message } => cut(format!("error {kind}: {message}")),
    }
}

/// A JSON pointer segment.
fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// `-`/`+` lines for the leaves where `want` and `got` differ.
fn json_diff(path: &str, want: &Value, got: &Value, out: &mut Vec<String>) {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            let keys: BTreeSet<&String> = w.keys().chain(g.keys()).collect();
            for k in keys {
                let p = format!("{path}/{}", escape_pointer(k));
                match (w.get(k.as_str()), g.get(k.as_str())) {
                    (Some(a), Some(b)) => json_diff(&p, a, b, out),
                    (Some(a), None) => out.push(cut(format!("-     {p}: {a}"))),
                    (None, Some(b)) => out.push(cut(format!("+     {p}: {b}"))),
                    (None, None) => {}
                }
            }
        }
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => {
            for (i, (a, b)) in w.iter().zip(g).enumerate() {
                json_diff(&format!("{path}/{i}"), a, b, out);
            }
        }
        _ if want != got => {
            let p = if path.is_empty() { "(the row)" } else { path };
            out.push(cut(format!("-     {p}: {want}")));
            out.push(cut(format!("+     {p}: {got}")));
        }
        _ => {}
    }
}

/// Lines for one expected/actual pair that do not match: a field diff for two rows, else
/// both whole.
fn pair_diff(want: &Expected, got: &Actual, out: &mut Vec<String>) {
    if let (
        Expected::Row {
            table,
            row,
            key,
            headers,
        },
        Actual::Row {
            table: t,
            row: r,
            json: true,
            key: k,
            headers: h,
        },
    ) = (want, got)
    {
        out.push("    row, differing in:".into());
        if table != t {
            out.push(format!(
                "-     table: {}",
                table.as_deref().unwrap_or("(default)")
            ));
            out.push(format!(
                "+     table: {}",
                t.as_deref().unwrap_or("(default)")
            ));
        }
        json_diff("", row, r, out);
        if let Some(key) = key {
            let got = k
                .as_deref()
                .map(|k| String::from_utf8_lossy(k).into_owned());
            if got.as_deref() != Some(key.as_str()) {
                out.push(format!("-     key: {key:?}"));
                out.push(format!(
                    "+     key: {}",
                    got.map_or("(none)".into(), |g| format!("{g:?}"))
                ));
            }
        }
        if let Some(headers) = headers {
            let got = header_map(h);
            if *headers != got {
                out.push(format!("-     headers: {headers:?}"));
                out.push(format!("+     headers: {got:?}"));
            }
        }
        return;
    }
    out.push(format!("-   {}", describe_expected(want)));
    out.push(format!("+   {}", describe_actual(got)));
}

impl fmt::Display for TestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rows = 0;
        let mut errors = 0;
        let mut not_objects = Vec::new();
        for input in &self.inputs {
            for a in self.actual.get(&input.position()).into_iter().flatten() {
                match a {
                    Actual::Row { row, .. } => {
                        rows += 1;
                        if !row.is_object() {
                            not_objects.push(input);
                        }
                    }
                    Actual::Error { .. } => errors += 1,
                }
            }
        }
        let filtered = self
            .inputs
            .iter()
            .filter(|i| !self.actual.contains_key(&i.position()))
            .count();

        if let Some(expected) = &self.expected {
            if !self.differing.is_empty() {
                writeln!(f, "--- expected ({})", self.expect_path.display())?;
                writeln!(
                    f,
                    "+++ actual ({}, {})",
                    self.plugin_path.display(),
                    self.plugin
                )?;
            }
            for &i in &self.differing {
                let input = &self.inputs[i];
                let pos = input.position();
                let mut head = format!(
                    "@@ partition {} offset {} (input line {})",
                    pos.0, pos.1, input.line
                );
                if let Some(note) = &input.note {
                    let _ = write!(head, ": {note}");
                }
                writeln!(f, "{head}")?;
                let want = expected.get(&pos).map_or(&[][..], Vec::as_slice);
                let got = self.actual.get(&pos).map_or(&[][..], Vec::as_slice);
                let mut lines = Vec::new();
                if want.len() == got.len() {
                    for ((_, w), g) in want.iter().zip(got) {
                        if !matches(w, g) {
                            pair_diff(w, g, &mut lines);
                        }
                    }
                } else {
                    if want.is_empty() {
                        lines.push("-   nothing (filtered out)".into());
                    }
                    for (line, w) in want {
                        lines.push(format!(
                            "-   {} (expected line {line})",
                            describe_expected(w)
                        ));
                    }
                    if got.is_empty() {
                        lines.push("+   nothing (filtered out)".into());
                    }
                    for g in got {
                        lines.push(format!("+   {}", describe_actual(g)));
                    }
                }
                for l in lines {
                    writeln!(f, "{l}")?;
                }
            }
        }
        for failure in &self.config_failures {
            writeln!(f, "config: {failure}")?;
        }
        for input in not_objects {
            writeln!(
                f,
                "note: partition {} offset {}: a row that is not a JSON object; the ClickHouse sink would dead-letter it",
                input.partition, input.offset
            )?;
        }
        let counts = format!(
            "{} input(s): {rows} row(s), {errors} error(s), {filtered} filtered out",
            self.inputs.len()
        );
        match (&self.written, self.passed()) {
            (Some(path), _) => write!(f, "{}: {counts}; wrote {}", self.plugin, path.display()),
            (None, true) => write!(f, "ok: {}: {counts}, all as expected", self.plugin),
            (None, false) => write!(
                f,
                "FAILED: {}: {counts}; {} input(s) differ from {}{}",
                self.plugin,
                self.differing.len(),
                self.expect_path.display(),
                if self.config_failures.is_empty() {
                    String::new()
                } else {
                    format!(", {} config check(s) failed", self.config_failures.len())
                }
            ),
        }
    }
}
