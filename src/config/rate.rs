//! `rate = "1000/min"`: a token-bucket refill rate, or `"off"` for no limit.

use serde::Deserialize;
use std::fmt;

/// Why a `rate` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("expected a rate like \"1000/min\" or \"off\", found {0:?}")]
    Shape(String),
    #[error("{0:?} is not a positive number")]
    Count(String),
    #[error("unknown rate unit {0:?} (use s, min or hour)")]
    Unit(String),
}

/// Requests per minute allowed to one destination; `None` means unlimited.
#[derive(Clone, Copy, PartialEq)]
pub struct Rate {
    per_minute: Option<f64>,
}

impl Rate {
    pub fn per_minute(n: f64) -> Rate {
        Rate { per_minute: Some(n) }
    }
    pub fn unlimited() -> Rate {
        Rate { per_minute: None }
    }
    /// Requests per second, `None` when unlimited.
    pub fn per_second(self) -> Option<f64> {
        self.per_minute.map(|n| n / 60.0)
    }

    /// Parses `N/s`, `N/sec`, `N/min`, `N/m`, `N/h`, `N/hour`, or `off`/`unlimited`.
    pub fn parse(s: &str) -> Result<Rate, RateError> {
        let s = s.trim();
        if s == "off" || s == "unlimited" {
            return Ok(Rate::unlimited());
        }
        let (n, unit) = s.split_once('/').ok_or_else(|| RateError::Shape(s.to_string()))?;
        let n: f64 = n
            .trim()
            .parse()
            .ok()
            .filter(|n: &f64| n.is_finite() && *n > 0.0)
            .ok_or_else(|| RateError::Count(n.trim().to_string()))?;
        let factor = match unit.trim() {
            "s" | "sec" | "second" => 60.0,
            "m" | "min" | "minute" => 1.0,
            "h" | "hour" => 1.0 / 60.0,
            other => return Err(RateError::Unit(other.to_string())),
        };
        Ok(Rate::per_minute(n * factor))
    }
}

impl fmt::Debug for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.per_minute {
            Some(n) => write!(f, "{n}/min"),
            None => f.write_str("off"),
        }
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Rate::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(Rate::parse("1000/min").unwrap().per_second(), Some(1000.0 / 60.0));
        assert_eq!(Rate::parse("20/s").unwrap().per_second(), Some(20.0));
        assert_eq!(Rate::parse("3600/hour").unwrap().per_second(), Some(1.0));
        assert_eq!(Rate::parse("off").unwrap().per_second(), None);
        assert_eq!(Rate::parse("1000"), Err(RateError::Shape("1000".into())));
        assert_eq!(Rate::parse("0/min"), Err(RateError::Count("0".into())));
        assert_eq!(Rate::parse("5/fortnight"), Err(RateError::Unit("fortnight".into())));
    }
}
