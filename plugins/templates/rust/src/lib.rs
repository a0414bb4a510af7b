//! {{name}}: a sluice plugin. Adds a `greeting` field to every JSON object it receives.
//! Config (the stage's `config:`): `{"greeting": "hello"}`, optional.

use sluice_guest::prelude::*;

struct Plugin {
    greeting: String,
}

impl Transform for Plugin {
    fn init(config: Config) -> Result<Self, String> {
        let greeting = match config.value().get("greeting") {
            None => "hello".to_string(),
            Some(v) => v.as_str().ok_or("config: `greeting` must be a string")?.to_string(),
        };
        Ok(Plugin { greeting })
    }

    fn transform(&self, record: &Record) -> Result<Output, RecordError> {
        // Not JSON: a `parse` error; JSON but not an object: a `schema` error. Either way the
        // record goes to the dead-letter topic and the batch goes on.
        let mut row = record.json_object()?;
        row.insert("greeting".into(), format!("{} from {{name}}", self.greeting).into());
        Ok(Output::row(row))
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
