//! Plugin configuration parsing.
//!
//! Meridian passes a plugin's `config` to it as bytes: a TOML table in the
//! edge configuration arrives as JSON, a TOML string arrives verbatim. The
//! default [`crate::Plugin::parse_config`] is [`from_json`].

use serde::de::DeserializeOwned;

/// Deserialise `raw` as JSON into `T`.
///
/// * Empty (or all-whitespace) configuration: `T` is deserialised from `{}`,
///   then from `null`, so a struct whose fields all have defaults, a map,
///   `()` or an `Option` get their empty value; any other `T` gets an error
///   that says which field is missing.
/// * Anything that is not a JSON object, array or string and does not fit
///   `T` is tried as a JSON string holding the raw bytes, so
///   `type Config = String` receives a verbatim string configuration
///   (`hello`, `42` and `true` alike).
/// * Errors name the line and column, as serde_json reports them.
pub fn from_json<T: DeserializeOwned>(raw: &[u8]) -> Result<T, String> {
    if raw.iter().all(u8::is_ascii_whitespace) {
        return serde_json::from_slice::<T>(b"{}").or_else(|e| {
            serde_json::from_slice::<T>(b"null").map_err(|_| {
                let e = e.to_string();
                let e = e.split(" at line ").next().unwrap_or(&e);
                format!("the plugin needs a configuration: {e}")
            })
        });
    }
    match serde_json::from_slice::<T>(raw) {
        Ok(v) => Ok(v),
        Err(e) => {
            let structured = raw
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .is_some_and(|b| matches!(b, b'{' | b'[' | b'"'));
            if !structured
                && let Ok(s) = std::str::from_utf8(raw)
                && let Ok(v) = serde_json::from_value::<T>(serde_json::Value::String(s.to_owned()))
            {
                return Ok(v);
            }
            Err(format!("invalid plugin configuration: {e}"))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, Default, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Defaults {
        a: u32,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Required {
        #[allow(dead_code)]
        secret: String,
    }

    #[test]
    fn empty_config_gives_defaults() {
        assert_eq!(from_json::<Defaults>(b""), Ok(Defaults { a: 0 }));
        assert_eq!(from_json::<Defaults>(b"  \n"), Ok(Defaults { a: 0 }));
        assert_eq!(from_json::<()>(b""), Ok(()));
        assert_eq!(from_json::<Option<u32>>(b""), Ok(None));
    }

    #[test]
    fn empty_config_names_the_missing_field() {
        let e = from_json::<Required>(b"").unwrap_err();
        assert!(e.contains("missing field `secret`"), "{e}");
    }

    #[test]
    fn json_errors_have_a_position() {
        let e = from_json::<Defaults>(b"{\"a\": \"x\"}").unwrap_err();
        assert!(e.contains("line 1 column"), "{e}");
        let e = from_json::<Defaults>(b"{\"b\": 1}").unwrap_err();
        assert!(e.contains("unknown field `b`"), "{e}");
    }

    #[test]
    fn verbatim_strings() {
        assert_eq!(
            from_json::<String>(b"hello world"),
            Ok("hello world".into())
        );
        assert_eq!(from_json::<String>(b"\"quoted\""), Ok("quoted".into()));
        assert_eq!(from_json::<String>(b"42"), Ok("42".into()));
        assert_eq!(from_json::<u32>(b"42"), Ok(42));
        assert!(from_json::<Defaults>(b"not json").is_err());
    }
}
