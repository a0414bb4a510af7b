use serde::Serialize;

use crate::Header;

/// One row a transform produces: a JSON object whose fields name the table's columns.
///
/// The value is serialised when the row is built; if that fails, or the value is not a
/// JSON object, the whole input is reported as an `other` error instead of producing rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub(crate) table: Option<String>,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) value: Result<Vec<u8>, String>,
    pub(crate) headers: Vec<Header>,
}

impl Row {
    /// A row for the pipeline's default table.
    pub fn new(value: impl Serialize) -> Self {
        let value = match serde_json::to_vec(&value) {
            // serde_json writes no leading whitespace, so the first byte tells objects apart.
            Ok(bytes) if bytes.first() == Some(&b'{') => Ok(bytes),
            Ok(_) => Err("output row is not a JSON object".to_owned()),
            Err(e) => Err(format!("cannot serialise output row: {e}")),
        };
        Row {
            table: None,
            key: None,
            value,
            headers: Vec::new(),
        }
    }

    /// A row from JSON bytes known to be one object (built by [`crate::RowWriter`]).
    pub(crate) fn from_object_bytes(bytes: Vec<u8>) -> Self {
        Row {
            table: None,
            key: None,
            value: Ok(bytes),
            headers: Vec::new(),
        }
    }

    /// Sends this row to `table` instead of the pipeline's default table.
    pub fn for_table(mut self, table: impl Into<String>) -> Self {
        self.table = Some(table.into());
        self
    }

    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push(Header {
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// The destination table, `None` for the pipeline's default.
    pub fn table(&self) -> Option<&str> {
        self.table.as_deref()
    }

    /// The serialised JSON object, or why it could not be produced.
    pub fn value(&self) -> Result<&[u8], &str> {
        match &self.value {
            Ok(bytes) => Ok(bytes),
            Err(msg) => Err(msg),
        }
    }
}

/// What one input produced: zero, one or many rows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Output {
    pub(crate) rows: Vec<Row>,
}

impl Output {
    /// No row: the input is filtered out on purpose (not an error).
    pub fn none() -> Self {
        Output { rows: Vec::new() }
    }

    /// One row for the pipeline's default table.
    pub fn row(value: impl Serialize) -> Self {
        Row::new(value).into()
    }

    /// One row for `table`.
    pub fn row_to(table: impl Into<String>, value: impl Serialize) -> Self {
        Row::new(value).for_table(table).into()
    }

    /// Any number of rows, in order.
    pub fn many(rows: impl IntoIterator<Item = Row>) -> Self {
        Output {
            rows: rows.into_iter().collect(),
        }
    }

    pub fn push(&mut self, row: Row) {
        self.rows.push(row);
    }

    /// Sets the key of every row.
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        let key = key.into();
        for row in &mut self.rows {
            row.key = Some(key.clone());
        }
        self
    }

    /// Adds a header to every row.
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        let header = Header {
            key: key.into(),
            value: value.into(),
        };
        for row in &mut self.rows {
            row.headers.push(header.clone());
        }
        self
    }

    pub fn rows(&self) -> &[Row] {
        &self.rows
    }
}

impl From<Row> for Output {
    fn from(row: Row) -> Self {
        Output { rows: vec![row] }
    }
}

impl FromIterator<Row> for Output {
    fn from_iter<I: IntoIterator<Item = Row>>(iter: I) -> Self {
        Output::many(iter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeMap;

    #[test]
    fn rows_must_be_objects() {
        assert!(Row::new(json!({"a": 1})).value().is_ok());
        assert_eq!(
            Row::new(json!([1])).value(),
            Err("output row is not a JSON object")
        );
        assert!(Row::new(42).value().is_err());

        #[derive(Serialize)]
        struct Out {
            id: u32,
        }
        assert_eq!(Row::new(Out { id: 7 }).value(), Ok(&b"{\"id\":7}"[..]));

        // Maps with non-string keys cannot be JSON objects.
        let bad: BTreeMap<Vec<u8>, u8> = BTreeMap::from([(vec![1], 1)]);
        let err = Row::new(bad).value().unwrap_err().to_owned();
        assert!(err.starts_with("cannot serialise output row"), "{err}");
    }

    #[test]
    fn builders() {
        let out = Output::row_to("audit", json!({"a": 1}))
            .with_key("k")
            .with_header("h", "v");
        assert_eq!(out.rows().len(), 1);
        let row = &out.rows()[0];
        assert_eq!(row.table(), Some("audit"));
        assert_eq!(row.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(row.headers.len(), 1);

        let many: Output = (0..3).map(|i| Row::new(json!({ "i": i }))).collect();
        assert_eq!(many.rows().len(), 3);
        assert!(Output::none().rows().is_empty());
    }
}
