//! `${VAR}` and `${VAR:-default}` expansion; `$$` is a literal `$`.

/// Expands environment references in `text`. An unset variable without a default is an error
/// naming the variable and the line, so a missing secret fails at start, not at first insert.
pub fn expand_env(text: &str, get: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut line = 1usize;
    while let Some(pos) = rest.find('$') {
        let (before, after) = rest.split_at(pos);
        line += before.matches('\n').count();
        out.push_str(before);
        if let Some(tail) = after.strip_prefix("$$") {
            out.push('$');
            rest = tail;
            continue;
        }
        let Some(body_start) = after.strip_prefix("${") else {
            out.push('$');
            rest = &after[1..];
            continue;
        };
        let Some(end) = body_start.find('}') else {
            return Err(format!("line {line}: unterminated ${{...}}"));
        };
        let body = &body_start[..end];
        let (name, default) = match body.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (body, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("line {line}: invalid variable name {name:?}"));
        }
        match (get(name), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!(
                    "line {line}: environment variable {name} is not set (use ${{{name}:-default}} for an optional value)"
                ))
            }
        }
        rest = &body_start[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        (k == "PW").then(|| "secret".to_string())
    }

    #[test]
    fn expands_set_unset_default_and_escape() {
        assert_eq!(
            expand_env("a: ${PW}\nb: ${NOPE:-x}\nc: $$HOME $d", env).expect("ok"),
            "a: secret\nb: x\nc: $HOME $d"
        );
    }

    #[test]
    fn unset_without_default_names_variable_and_line() {
        let e = expand_env("a: 1\nb: ${MISSING}", env).expect_err("unset");
        assert!(e.contains("line 2") && e.contains("MISSING"), "{e}");
    }
}
