//! JSON parsing that rejects duplicate object keys.
//!
//! `serde_json::Value` keeps the last of two equal keys, so `{"sub":"a","sub":"b"}` would read
//! as `b` here and possibly as `a` in another parser. For security tokens that difference is an
//! attack surface (a hostile issuer could smuggle a second `sub` or `aud`), so JWT headers and
//! claims are read through this visitor, which fails on the first repeated key at any depth.
//! Keys are compared after JSON unescaping, so `"s\u0075b"` and `"sub"` collide too. Nesting
//! depth stays bounded by serde_json's recursion limit.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// A JSON value whose objects (at every depth) have unique keys.
pub(crate) struct StrictValue(pub(crate) Value);

/// A JSON object with unique keys at every depth.
pub(crate) struct StrictObject(pub(crate) Map<String, Value>);

/// Parses `bytes` as one JSON object with unique keys at every depth.
pub(crate) fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, serde_json::Error> {
    serde_json::from_slice::<StrictObject>(bytes).map(|object| object.0)
}

struct StrictValueVisitor;

impl<'de> Visitor<'de> for StrictValueVisitor {
    type Value = StrictValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Bool(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Number(v.into())))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Number(v.into())))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<StrictValue, E> {
        Number::from_f64(v)
            .map(|number| StrictValue(Value::Number(number)))
            .ok_or_else(|| E::custom("number is not finite"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::String(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::String(v)))
    }

    fn visit_unit<E: de::Error>(self) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Null))
    }

    fn visit_none<E: de::Error>(self) -> Result<StrictValue, E> {
        Ok(StrictValue(Value::Null))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StrictValue, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(StrictValue(Value::Array(items)))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<StrictValue, A::Error> {
        StrictObjectVisitor.visit_map(map).map(|StrictObject(object)| StrictValue(Value::Object(object)))
    }
}

struct StrictObjectVisitor;

impl<'de> Visitor<'de> for StrictObjectVisitor {
    type Value = StrictObject;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StrictObject, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(de::Error::custom(format_args!("duplicate key {key:?}")));
            }
            let StrictValue(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(StrictObject(object))
    }
}

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictValueVisitor)
    }
}

impl<'de> Deserialize<'de> for StrictObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(StrictObjectVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_unique_keys() {
        let object = parse_object(br#"{"a":1,"b":[1,2.5,"x",null,true],"c":{"d":{}}}"#).unwrap();
        assert_eq!(object.len(), 3);
        assert_eq!(object["b"][1], serde_json::json!(2.5));
    }

    #[test]
    fn rejects_duplicates_at_any_depth_and_after_unescaping() {
        for input in [
            &br#"{"sub":"a","sub":"b"}"#[..],
            br#"{"sub":"a","s\u0075b":"b"}"#,
            br#"{"x":{"y":1,"y":2}}"#,
            br#"{"x":[{"y":1,"y":2}]}"#,
        ] {
            let error = parse_object(input).unwrap_err();
            assert!(error.to_string().contains("duplicate key"), "{error}");
        }
    }

    #[test]
    fn rejects_non_objects_and_trailing_data() {
        for input in [&b"[]"[..], b"1", b"\"x\"", b"{} {}", b"", b"{"] {
            assert!(parse_object(input).is_err());
        }
    }
}
