use std::fmt;

/// Why a record was rejected; the host copies it into the dead-letter record's
/// `sluice.error.kind` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The payload could not be parsed (bad JSON, bad encoding, ...).
    Parse,
    /// The payload parsed but a field is missing or has the wrong type or format.
    Schema,
    /// The payload is well-formed but violates a business rule.
    Invalid,
    /// Anything else.
    Other,
}

impl ErrorKind {
    /// The name used in the WIT contract and in dead-letter headers.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Parse => "parse",
            ErrorKind::Schema => "schema",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Other => "other",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A per-record failure: the record goes to the dead-letter topic and the rest of the
/// batch proceeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError {
    pub kind: ErrorKind,
    pub message: String,
}

impl RecordError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        RecordError {
            kind,
            message: message.into(),
        }
    }

    /// The payload could not be parsed.
    pub fn parse(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Parse, message)
    }

    /// A field is missing or has the wrong type or format.
    pub fn schema(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Schema, message)
    }

    /// The record is well-formed but breaks a business rule.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, message)
    }

    /// Any other reason to reject the record.
    pub fn other(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Other, message)
    }
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for RecordError {}

/// Syntax errors are `parse` errors; a document that parsed but does not fit the target
/// type (missing field, wrong type) is a `schema` error.
impl From<serde_json::Error> for RecordError {
    fn from(err: serde_json::Error) -> Self {
        use serde_json::error::Category;
        let kind = match err.classify() {
            Category::Syntax | Category::Eof => ErrorKind::Parse,
            Category::Data => ErrorKind::Schema,
            Category::Io => ErrorKind::Other,
        };
        RecordError::new(kind, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_errors_are_classified() {
        let syntax = serde_json::from_str::<serde_json::Value>("{\"a\":").unwrap_err();
        assert_eq!(RecordError::from(syntax).kind, ErrorKind::Parse);

        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Event {
            id: String,
        }
        let data = serde_json::from_str::<Event>("{\"id\": 7}").unwrap_err();
        let err = RecordError::from(data);
        assert_eq!(err.kind, ErrorKind::Schema);
        assert!(err.message.contains("invalid type"), "{err}");
    }

    #[test]
    fn display_names_the_kind() {
        assert_eq!(
            RecordError::invalid("amount too large").to_string(),
            "invalid: amount too large"
        );
    }
}
