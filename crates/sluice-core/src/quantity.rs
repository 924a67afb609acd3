//! Kubernetes quantities (`4Gi`, `1e9`, `5000`) and Go-style durations (`60s`, `200ms`).

use std::fmt;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A Kubernetes resource quantity, kept as written (an integer or a string such as `4Gi`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Quantity {
    /// A plain integer.
    Int(i64),
    /// A quantity string with an optional suffix.
    Str(String),
}

impl JsonSchema for Quantity {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Quantity".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": true
        })
    }
}

/// A quantity or duration that could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a valid {what}: {why}")]
pub struct ParseError {
    input: String,
    what: &'static str,
    why: &'static str,
}

impl Quantity {
    /// The quantity as an unsigned integer (fractions are rounded up, as Kubernetes does
    /// for `Value()`).
    pub fn to_u64(&self) -> Result<u64, ParseError> {
        match self {
            Quantity::Int(v) => u64::try_from(*v).map_err(|_| ParseError {
                input: v.to_string(),
                what: "quantity",
                why: "must not be negative",
            }),
            Quantity::Str(s) => parse_quantity(s),
        }
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Quantity::Int(v) => write!(f, "{v}"),
            Quantity::Str(s) => f.write_str(s),
        }
    }
}

/// Parses a Kubernetes quantity (`123`, `1.5k`, `4Gi`, `1e9`) into a whole number.
pub fn parse_quantity(input: &str) -> Result<u64, ParseError> {
    let err = |why| ParseError {
        input: input.to_owned(),
        what: "quantity",
        why,
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(err("empty"));
    }
    const SUFFIXES: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("Pi", 1_125_899_906_842_624.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
    ];
    let (number, factor) = SUFFIXES
        .iter()
        .find_map(|(suffix, factor)| s.strip_suffix(suffix).map(|n| (n, *factor)))
        .unwrap_or((s, 1.0));
    let value: f64 = number
        .parse()
        .map_err(|_| err("expected a number with an optional suffix (k, M, G, Ki, Mi, Gi, ...)"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(err("must be a finite, non-negative number"));
    }
    let scaled = (value * factor).ceil();
    if scaled > u64::MAX as f64 {
        return Err(err("too large"));
    }
    Ok(scaled as u64)
}

/// Parses a Go duration string (`1h2m3.5s`, `200ms`, `90s`, `0`).
pub fn parse_duration(input: &str) -> Result<Duration, ParseError> {
    let err = |why| ParseError {
        input: input.to_owned(),
        what: "duration",
        why,
    };
    let s = input.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(err("empty"));
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| err("missing unit (ns, us, ms, s, m, h)"))?;
        if digits == 0 {
            return Err(err("expected a number before the unit"));
        }
        let value: f64 = rest[..digits].parse().map_err(|_| err("bad number"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(err("unknown unit (use ns, us, ms, s, m, h)")),
        };
        total += value * seconds;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| err("out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        for (input, want) in [
            ("5000", 5000),
            ("4Gi", 4 << 30),
            ("1e9", 1_000_000_000),
            ("1.5k", 1500),
        ] {
            assert_eq!(parse_quantity(input), Ok(want), "{input}");
        }
        assert!(parse_quantity("-1").is_err());
        assert!(
            parse_quantity("lots")
                .unwrap_err()
                .to_string()
                .contains("lots")
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }
}
