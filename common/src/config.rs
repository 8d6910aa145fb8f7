//! Configuration-file plumbing shared by `tessera-server` and `tessera-agent`: the error type
//! (one line naming the file and the dotted key), TOML parsing with those errors, keyword
//! enums, and the value deserializers behind the documented value forms.
//!
//! Each binary keeps its own typed configuration struct and cross-key checks; this module
//! only knows how to read values.

use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, Visitor};
use tessera_spiffe::TrustDomain;

#[doc(hidden)]
pub use serde as __serde;

/// Longest Unix socket path accepted, in bytes (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH_LEN: usize = 107;

/// The shortest TTL a configuration accepts.
pub const MIN_TTL: Duration = Duration::from_secs(1);

/// The longest TTL a configuration accepts: about 100 years, which keeps every certificate
/// date representable.
pub const MAX_TTL: Duration = Duration::from_secs(36525 * 86400);

/// Declares a configuration enum spelled by fixed keywords, with `ALL`, `as_str`, `Display`,
/// `FromStr` and a `Deserialize` whose errors list the accepted spellings.
#[macro_export]
macro_rules! keyword_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every value, in documentation order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The configuration spelling of this value.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                $crate::config::find_keyword(s, Self::ALL, Self::as_str)
            }
        }

        impl<'de> $crate::config::__serde::Deserialize<'de> for $name {
            fn deserialize<D: $crate::config::__serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                $crate::config::keyword(deserializer, Self::ALL, Self::as_str)
            }
        }
    };
}

keyword_enum! {
    /// `log_level`: the most verbose level logged.
    pub enum LogLevel {
        /// Errors only.
        Error = "error",
        /// Warnings and errors.
        Warn = "warn",
        /// The default.
        Info = "info",
        /// Debugging detail.
        Debug = "debug",
        /// Everything.
        Trace = "trace",
    }
}

keyword_enum! {
    /// `log_format`: how log lines on stderr are written.
    pub enum LogFormat {
        /// Human-readable lines (the default).
        Text = "text",
        /// One JSON object per line.
        Json = "json",
    }
}

/// A setting that is accepted but deserves a warning once logging is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    /// The dotted key concerned.
    pub key: &'static str,
    /// What is suspicious about it.
    pub message: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config key {}: {}", self.key, self.message)
    }
}

/// Why a configuration file was refused. Displays as one line naming the file and, when the
/// problem is a key, the dotted key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read (missing, unreadable, not UTF-8, a directory, ...).
    #[error("cannot read config file {}: {message}", file.display())]
    Read {
        /// The file named on the command line.
        file: PathBuf,
        /// The operating system's reason.
        message: String,
    },
    /// The file is not valid TOML.
    #[error("config file {}: invalid TOML at line {line}, column {column}: {message}", file.display())]
    Syntax {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column, in characters.
        column: usize,
        /// The parser's reason.
        message: String,
    },
    /// A key this version does not know (often a typo).
    #[error("config file {}: unknown key \"{key}\"{} ({expected})", file.display(), on_line(*line))]
    UnknownKey {
        /// The file.
        file: PathBuf,
        /// Dotted path of the unknown key.
        key: String,
        /// 1-based line, when known.
        line: Option<usize>,
        /// The keys accepted at that level.
        expected: String,
    },
    /// A key whose value is missing, of the wrong type, or not acceptable.
    #[error("config file {}: key {key}{}: {message}", file.display(), at_line(*line))]
    Invalid {
        /// The file.
        file: PathBuf,
        /// Dotted path of the key.
        key: String,
        /// 1-based line, when known.
        line: Option<usize>,
        /// What is wrong and what is expected.
        message: String,
    },
}

impl ConfigError {
    /// The configuration file concerned.
    pub fn file(&self) -> &Path {
        match self {
            Self::Read { file, .. }
            | Self::Syntax { file, .. }
            | Self::UnknownKey { file, .. }
            | Self::Invalid { file, .. } => file,
        }
    }

    /// The dotted key concerned, when the error is about one key.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::UnknownKey { key, .. } | Self::Invalid { key, .. } => Some(key),
            Self::Read { .. } | Self::Syntax { .. } => None,
        }
    }

    /// An error about one key found by a check between keys (no line is known).
    pub fn invalid(file: &Path, key: &str, message: String) -> Self {
        Self::Invalid { file: file.to_path_buf(), key: key.to_owned(), line: None, message }
    }
}

/// Reads a configuration file as UTF-8 text.
pub fn read_file(file: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(file)
        .map_err(|error| ConfigError::Read { file: file.to_path_buf(), message: io_message(&error) })
}

/// Parses TOML text into `T`; errors name `file`, the dotted key and the line.
pub fn parse_toml<T: DeserializeOwned>(text: &str, file: &Path) -> Result<T, ConfigError> {
    let deserializer = toml::Deserializer::parse(text).map_err(|error| syntax_error(file, text, &error))?;
    serde_path_to_error::deserialize(deserializer).map_err(|error| value_error(file, text, error))
}

fn at_line(line: Option<usize>) -> String {
    line.map(|line| format!(" (line {line})")).unwrap_or_default()
}

fn on_line(line: Option<usize>) -> String {
    line.map(|line| format!(" on line {line}")).unwrap_or_default()
}

/// The I/O error without Rust's " (os error N)" suffix.
pub fn io_message(error: &std::io::Error) -> String {
    let text = error.to_string();
    match text.find(" (os error ") {
        Some(end) => text[..end].to_owned(),
        None => text,
    }
}

/// Messages are printed on one line whatever the parser says.
fn one_line(message: &str) -> String {
    message.trim().split('\n').map(str::trim).filter(|part| !part.is_empty()).collect::<Vec<_>>().join("; ")
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |last| last.chars().count()) + 1;
    (line, column)
}

fn syntax_error(file: &Path, text: &str, error: &toml::de::Error) -> ConfigError {
    let span = error.span().unwrap_or(0..0);
    let (line, column) = line_col(text, span.start);
    let mut message = one_line(error.message());
    if message == "duplicate key"
        && let Some(key) = text.get(span.clone()).filter(|key| !key.is_empty())
    {
        message = format!("duplicate key {}", key.trim());
    }
    ConfigError::Syntax { file: file.to_path_buf(), line, column, message }
}

fn value_error(file: &Path, text: &str, error: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
    let path = error.path().to_string();
    let error = error.into_inner();
    let line = error.span().map(|span| line_col(text, span.start).0);
    let message = one_line(error.message());
    let file = file.to_path_buf();
    // serde's wording for deny_unknown_fields: "unknown field `x`, expected one of `a`, `b`";
    // the path already ends with the unknown key.
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let expected = rest.split_once("`, ").map_or("", |(_, expected)| expected).to_owned();
        return ConfigError::UnknownKey { file, key: path, line, expected };
    }
    // serde's wording for a required key: "missing field `x`"; the path names its table.
    if let Some(field) = message.strip_prefix("missing field `").and_then(|rest| rest.strip_suffix('`')) {
        let key = if path == "." { field.to_owned() } else { format!("{path}.{field}") };
        return ConfigError::Invalid { file, key, line, message: "is required but missing".to_owned() };
    }
    let key = if path == "." { "(top level)".to_owned() } else { path };
    ConfigError::Invalid { file, key, line, message }
}

// ---------------------------------------------------------------------------------------------
// Value deserializers. Each states the expected form, so a wrong type reads
// "invalid type: integer `5`, expected a duration such as ...".

/// A visitor for string values: `parse` turns the string into the value or an explanation.
struct StrVisitor<T, F> {
    expecting: &'static str,
    parse: F,
    marker: PhantomData<T>,
}

impl<'de, T, F: FnOnce(&str) -> Result<T, String>> Visitor<'de> for StrVisitor<T, F> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<T, E> {
        (self.parse)(value).map_err(E::custom)
    }
}

/// Deserializes a string with `parse`; `expecting` names the form in type errors.
pub fn de_str<'de, D, T>(
    deserializer: D,
    expecting: &'static str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    deserializer.deserialize_str(StrVisitor { expecting, parse, marker: PhantomData })
}

/// `"a", "b" or "c"`.
pub fn one_of<T: Copy>(allowed: &[T], name: fn(T) -> &'static str) -> String {
    let names: Vec<String> = allowed.iter().map(|value| format!("{:?}", name(*value))).collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("one of {} or {last}", rest.join(", ")),
        Some((only, _)) => only.clone(),
        None => "nothing".to_owned(),
    }
}

/// The value of `allowed` spelled `value`, or an error listing the spellings.
pub fn find_keyword<T: Copy>(value: &str, allowed: &[T], name: fn(T) -> &'static str) -> Result<T, String> {
    allowed
        .iter()
        .copied()
        .find(|candidate| name(*candidate) == value)
        .ok_or_else(|| format!("invalid value {value:?}: expected {}", one_of(allowed, name)))
}

/// Visitor for [`keyword`]: a string that must be one of `allowed`.
struct KeywordVisitor<T: 'static> {
    expecting: String,
    allowed: &'static [T],
    name: fn(T) -> &'static str,
}

impl<'de, T: Copy> Visitor<'de> for KeywordVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.expecting)
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<T, E> {
        find_keyword(value, self.allowed, self.name).map_err(E::custom)
    }
}

/// Deserializes a string that must be one of `allowed` (spelled by `name`).
pub fn keyword<'de, D: Deserializer<'de>, T: Copy>(
    deserializer: D,
    allowed: &'static [T],
    name: fn(T) -> &'static str,
) -> Result<T, D::Error> {
    deserializer.deserialize_str(KeywordVisitor { expecting: one_of(allowed, name), allowed, name })
}

/// A bare trust domain name; a SPIFFE ID is refused with a hint.
pub fn de_trust_domain<'de, D: Deserializer<'de>>(deserializer: D) -> Result<TrustDomain, D::Error> {
    de_str(deserializer, "a trust domain name such as \"example.org\"", |value| {
        if value.contains(":/") {
            return Err(format!(
                "invalid trust domain {value:?}: expected a bare trust domain name such as \"example.org\", \
                 not a SPIFFE ID"
            ));
        }
        TrustDomain::new(value).map_err(|error| format!("invalid trust domain {value:?}: {error}"))
    })
}

const DURATION_FORM: &str = "a duration such as \"90s\", \"5m\", \"1h\" or \"7d\"";

/// A TTL: a humantime duration, a whole number of seconds between [`MIN_TTL`] and [`MAX_TTL`].
pub fn de_ttl<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    de_str(deserializer, DURATION_FORM, parse_ttl)
}

/// Parses a TTL; see [`de_ttl`].
pub fn parse_ttl(value: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(value)
        .map_err(|error| format!("invalid duration {value:?}: {error}; expected {DURATION_FORM}"))?;
    if ttl < MIN_TTL {
        return Err(format!("duration {value:?} is too short: the minimum is 1s"));
    }
    if ttl > MAX_TTL {
        return Err(format!("duration {value:?} is too long: the maximum is {}", humantime::format_duration(MAX_TTL)));
    }
    if ttl.subsec_nanos() != 0 {
        return Err(format!("duration {value:?} is not a whole number of seconds"));
    }
    Ok(ttl)
}

const SOCKET_ADDR_FORM: &str = "an IP address and port such as \"127.0.0.1:8080\" or \"[::1]:8080\"";

/// Parses `ip:port`.
pub fn parse_socket_addr(value: &str) -> Result<SocketAddr, String> {
    value.parse().map_err(|_| format!("invalid socket address {value:?}: expected {SOCKET_ADDR_FORM}"))
}

/// An `ip:port` listener address.
pub fn de_socket_addr<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    de_str(deserializer, SOCKET_ADDR_FORM, parse_socket_addr)
}

/// An `ip:port` listener address, or `""` for none.
pub fn de_opt_socket_addr<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<SocketAddr>, D::Error> {
    de_str(deserializer, "an IP address and port such as \"127.0.0.1:8080\", or \"\" for none", |value| {
        if value.is_empty() { Ok(None) } else { parse_socket_addr(value).map(Some) }
    })
}

/// A non-empty path.
pub fn de_path<'de, D: Deserializer<'de>>(deserializer: D) -> Result<PathBuf, D::Error> {
    de_str(deserializer, "a path", |value| {
        if value.is_empty() { Err("must not be empty: expected a path".to_owned()) } else { Ok(PathBuf::from(value)) }
    })
}

/// A path, or `""` for none.
pub fn de_opt_path<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<PathBuf>, D::Error> {
    de_str(deserializer, "a path, or \"\" for none", |value| Ok((!value.is_empty()).then(|| PathBuf::from(value))))
}

/// A Unix socket path that fits in `sun_path`.
pub fn de_socket_path<'de, D: Deserializer<'de>>(deserializer: D) -> Result<PathBuf, D::Error> {
    de_str(deserializer, "a Unix socket path", |value| {
        if value.is_empty() {
            return Err("must not be empty: expected a Unix socket path".to_owned());
        }
        if value.len() > MAX_SOCKET_PATH_LEN {
            return Err(format!(
                "socket path {value:?} is {} bytes long: a Unix socket path is at most {MAX_SOCKET_PATH_LEN} bytes",
                value.len()
            ));
        }
        Ok(PathBuf::from(value))
    })
}

/// A string, or `""` for none.
pub fn de_opt_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    de_str(deserializer, "a string, or \"\" for none", |value| Ok((!value.is_empty()).then(|| value.to_owned())))
}

/// A nested table. Asking for a map (rather than a struct) refuses arrays, which serde would
/// otherwise read as positional fields, and words the error as "expected a table".
pub fn de_table<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<T, D::Error> {
    struct TableVisitor<T>(PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for TableVisitor<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a table")
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(de::value::MapAccessDeserializer::new(map))
        }
    }
    deserializer.deserialize_map(TableVisitor(PhantomData))
}

/// An optional nested table (see [`de_table`]).
pub fn de_opt_table<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<Option<T>, D::Error> {
    de_table(deserializer).map(Some)
}

const BYTE_SIZE_FORM: &str = "a byte count such as 268435456 or a size such as \"256MiB\", \"1GiB\" or \"500MB\"";

/// A byte count: a non-negative integer, or a string `<number>[ ]<unit>` with unit `B`, `KB`,
/// `MB`, `GB` (powers of 1000) or `KiB`, `MiB`, `GiB` (powers of 1024); a bare number string
/// is bytes.
pub fn parse_byte_size(value: &str) -> Result<u64, String> {
    let invalid = || format!("invalid size {value:?}: expected {BYTE_SIZE_FORM}");
    let trimmed = value.trim();
    let digits_end = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits_end);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let multiplier: u64 = match unit.trim_start() {
        "" | "B" => 1,
        "KB" => 1000,
        "MB" => 1000 * 1000,
        "GB" => 1000 * 1000 * 1000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(invalid()),
    };
    number.checked_mul(multiplier).ok_or_else(|| format!("size {value:?} is too large"))
}

struct ByteSizeVisitor;

impl Visitor<'_> for ByteSizeVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(BYTE_SIZE_FORM)
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<u64, E> {
        Ok(value)
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<u64, E> {
        u64::try_from(value).map_err(|_| E::custom(format!("invalid size {value}: must not be negative")))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<u64, E> {
        parse_byte_size(value).map_err(E::custom)
    }
}

/// A byte count (see [`parse_byte_size`]).
pub fn de_byte_size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    deserializer.deserialize_any(ByteSizeVisitor)
}

// ---------------------------------------------------------------------------------------------
// Key lists. Each binary lists its accepted keys for the configuration reference; its tests
// compare that list with the struct fields serde's derive knows, read by this probe.

/// A deserializer that only records the field list serde's derive passes to
/// `deserialize_struct`.
struct FieldProbe;

#[derive(Debug)]
struct Probed(Option<&'static [&'static str]>);

impl fmt::Display for Probed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::error::Error for Probed {}

impl de::Error for Probed {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Probed(None)
    }
}

impl<'de> Deserializer<'de> for FieldProbe {
    type Error = Probed;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Probed> {
        Err(Probed(None))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Probed> {
        Err(Probed(Some(fields)))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
        unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

/// The field names of a struct deriving `Deserialize` (`None` for anything else), in
/// declaration order.
pub fn struct_fields<T: for<'de> Deserialize<'de>>() -> Option<&'static [&'static str]> {
    match T::deserialize(FieldProbe) {
        Err(Probed(fields)) => fields,
        Ok(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        #[serde(deserialize_with = "de_ttl")]
        ttl: Duration,
        #[serde(default, deserialize_with = "de_opt_socket_addr")]
        listen: Option<SocketAddr>,
        #[serde(default)]
        level: Option<LogLevel>,
    }

    fn sample(text: &str) -> Result<Sample, ConfigError> {
        parse_toml(text, Path::new("/etc/tessera/sample.toml"))
    }

    #[test]
    fn ttl_bounds() {
        assert_eq!(parse_ttl("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_secs(7 * 86400));
        assert_eq!(parse_ttl("1h 30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_ttl("0s").unwrap_err().contains("too short"));
        assert!(parse_ttl("500ms").unwrap_err().contains("too short"));
        assert!(parse_ttl("1500ms").unwrap_err().contains("whole number of seconds"));
        assert!(parse_ttl("101y").unwrap_err().contains("too long"));
        assert!(parse_ttl("90").unwrap_err().contains("invalid duration \"90\""));
    }

    #[test]
    fn errors_name_file_key_and_line() {
        assert_eq!(
            sample("ttl = \"1h\"\nlisten = \"nowhere\"").unwrap_err().to_string(),
            "config file /etc/tessera/sample.toml: key listen (line 2): invalid socket address \"nowhere\": \
             expected an IP address and port such as \"127.0.0.1:8080\" or \"[::1]:8080\""
        );
        let unknown = sample("ttl = \"1h\"\nlisen = \"\"").unwrap_err();
        assert_eq!(unknown.key(), Some("lisen"));
        assert!(unknown.to_string().contains("unknown key \"lisen\" on line 2"), "{unknown}");
        let missing = sample("").unwrap_err();
        assert_eq!(
            missing.to_string(),
            "config file /etc/tessera/sample.toml: key ttl (line 1): is required but missing"
        );
        let syntax = sample("ttl = ").unwrap_err();
        assert!(matches!(syntax, ConfigError::Syntax { line: 1, .. }), "{syntax}");
        let keyword = sample("ttl = \"1h\"\nlevel = \"loud\"").unwrap_err().to_string();
        assert!(
            keyword.ends_with("expected one of \"error\", \"warn\", \"info\", \"debug\" or \"trace\""),
            "{keyword}"
        );
        assert_eq!(
            sample("ttl = \"1m\"\nlisten = \"\"\nlevel = \"warn\"").unwrap(),
            Sample { ttl: Duration::from_secs(60), listen: None, level: Some(LogLevel::Warn) }
        );
    }

    #[test]
    fn keywords_round_trip() {
        for level in LogLevel::ALL {
            assert_eq!(level.as_str().parse::<LogLevel>().unwrap(), *level);
        }
        assert_eq!(one_of(&[LogFormat::Json], LogFormat::as_str), "\"json\"");
        assert_eq!(
            "xml".parse::<LogFormat>().unwrap_err(),
            "invalid value \"xml\": expected one of \"text\" or \"json\""
        );
    }

    #[test]
    fn line_and_column() {
        assert_eq!(line_col("a\nbc\nd", 0), (1, 1));
        assert_eq!(line_col("a\nbc\nd", 3), (2, 2));
        assert_eq!(line_col("a\nbc\nd", 5), (3, 1));
        assert_eq!(line_col("é\nx", 99), (2, 2));
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_byte_size("500 MB").unwrap(), 500_000_000);
        assert_eq!(parse_byte_size("42").unwrap(), 42);
        assert!(parse_byte_size("12 parsecs").unwrap_err().contains("invalid size"));
        assert!(parse_byte_size("99999999999999GiB").unwrap_err().contains("too large"));
    }

    #[test]
    fn struct_fields_lists_declared_keys() {
        assert_eq!(struct_fields::<Sample>(), Some(&["ttl", "listen", "level"][..]));
        assert_eq!(struct_fields::<u32>(), None);
    }

    #[test]
    fn io_message_drops_the_os_error_number() {
        let error = std::io::Error::from_raw_os_error(2);
        assert_eq!(io_message(&error), "No such file or directory");
    }
}
