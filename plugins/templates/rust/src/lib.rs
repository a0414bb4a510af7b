//! {{name}}: a sluice plugin. Adds a `greeting` field to every JSON object it receives.
//! Config (the stage's `config:`): `{"greeting": "hello"}`, optional.

use sluice_guest::prelude::*;

struct Plugin {
    /// The text written to `greeting`, built once.
    greeting: String,
}

impl Transform for Plugin {
    fn init(config: Config) -> Result<Self, String> {
        let greeting = match config.value().get("greeting") {
            None => "hello",
            Some(v) => v.as_str().ok_or("config: `greeting` must be a string")?,
        };
        Ok(Plugin {
            greeting: format!("{greeting} from {{name}}"),
        })
    }

    fn transform(&self, record: &Record) -> Result<Output, RecordError> {
        // Not JSON: a `parse` error; JSON but not an object: a `schema` error. Either way the
        // record goes to the dead-letter topic and the batch goes on.
        // `json_fields` reads the fields without building a tree, and `RowWriter` copies them
        // through as text: several times cheaper than `json_object()` + `Output::row`.
        let event = record.json_fields()?;
        let mut row = RowWriter::for_input(record);
        row.copy_fields(&event, &["greeting"])
            .str("greeting", &self.greeting);
        Ok(Output::from(row.finish()))
    }
}

sluice_guest::export!(Plugin);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_guest::testing;

    #[test]
    fn greets_objects_and_rejects_the_rest() {
        let out = testing::run_batch::<Plugin>(
            r#"{"greeting": "hi"}"#,
            &[Record::new(r#"{"id": 1}"#), Record::new("[1]"), Record::new("{oops")],
        )
        .expect("init accepts the config");
        assert_eq!(out.outputs.len(), 1);
        assert_eq!(out.outputs[0].value["greeting"], "hi from {{name}}");
        let kinds: Vec<_> = out.errors.iter().map(|e| (e.input, e.kind)).collect();
        assert_eq!(kinds, [(1, ErrorKind::Schema), (2, ErrorKind::Parse)]);
    }
}
