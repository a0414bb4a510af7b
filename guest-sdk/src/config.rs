use serde::de::DeserializeOwned;
use serde_json::Value;

/// The stage's `config` value from the pipeline file, as handed to [`Transform::init`].
///
/// [`Transform::init`]: crate::Transform::init
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    value: Value,
}

impl Config {
    /// No config: an empty object, what the host sends when the pipeline gives none.
    pub fn empty() -> Self {
        Config {
            value: Value::Object(Default::default()),
        }
    }

    /// Parses the JSON text the host passes to `init`. Blank text counts as no config.
    pub fn from_json_str(raw: &str) -> Result<Self, String> {
        if raw.trim().is_empty() {
            return Ok(Config::empty());
        }
        serde_json::from_str(raw)
            .map(Config::from_value)
            .map_err(|e| format!("config is not valid JSON: {e}"))
    }

    pub fn from_value(value: Value) -> Self {
        Config { value }
    }

    /// Deserialises the config into the plugin's own type. Give that type
    /// `#[serde(deny_unknown_fields)]` so typos in pipeline files are refused at upload,
    /// and `#[serde(default)]` on optional fields. A JSON `null` reads as `{}`.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, String> {
        let result = if self.value.is_null() {
            T::deserialize(&Value::Object(Default::default()))
        } else {
            T::deserialize(&self.value)
        };
        result.map_err(|e| format!("invalid config: {e}"))
    }

    pub fn value(&self) -> &Value {
        &self.value
    }

    /// `true` for `{}` and `null`.
    pub fn is_empty(&self) -> bool {
        match &self.value {
            Value::Null => true,
            Value::Object(map) => map.is_empty(),
            _ => false,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Settings {
        #[serde(default = "default_version")]
        version: String,
        #[serde(default)]
        table: Option<String>,
    }

    fn default_version() -> String {
        "v1".to_owned()
    }

    #[test]
    fn parses_typed_config_with_defaults() {
        for raw in ["", "  ", "{}", "null"] {
            let s: Settings = Config::from_json_str(raw).unwrap().parse().unwrap();
            assert_eq!(
                s,
                Settings {
                    version: "v1".into(),
                    table: None
                },
                "{raw:?}"
            );
        }
        let s: Settings = Config::from_json_str(r#"{"version":"v2","table":"t"}"#)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(s.version, "v2");
        assert_eq!(s.table.as_deref(), Some("t"));
    }

    #[test]
    fn reports_bad_config() {
        let err = Config::from_json_str("{oops").unwrap_err();
        assert!(err.starts_with("config is not valid JSON"), "{err}");

        let err = Config::from_json_str(r#"{"versoin":"v2"}"#)
            .unwrap()
            .parse::<Settings>()
            .unwrap_err();
        assert!(err.contains("unknown field `versoin`"), "{err}");
    }

    #[test]
    fn emptiness() {
        assert!(Config::empty().is_empty());
        assert!(Config::from_json_str("null").unwrap().is_empty());
        assert!(!Config::from_json_str(r#"{"a":1}"#).unwrap().is_empty());
    }
}
