//! A link's weight: set by hand (a number) or measured ("auto").

use super::*;

/// A weight as set by hand or left to measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightSpec {
    Fixed(u32),
    Auto,
}

impl std::fmt::Display for WeightSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fixed(n) => write!(f, "{n}"),
            Self::Auto => f.write_str("auto"),
        }
    }
}

impl WeightSpec {
    /// A fixed weight, if `n` is one (at most [`MAX_WEIGHT`]).
    pub fn fixed(n: u32) -> Option<Self> {
        (n <= MAX_WEIGHT).then_some(Self::Fixed(n))
    }
}

impl std::str::FromStr for WeightSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(Self::Auto);
        }
        s.parse()
            .ok()
            .and_then(Self::fixed)
            .ok_or_else(|| format!("weight {s:?}: want 0..={MAX_WEIGHT} or \"auto\""))
    }
}

/// A weight in the file: a number, or "auto".
pub(crate) fn weight_spec<'de, D: serde::Deserializer<'de>>(d: D) -> Result<WeightSpec, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = WeightSpec;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a weight 0..={MAX_WEIGHT} or \"auto\"")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<WeightSpec, E> {
            u32::try_from(v)
                .ok()
                .and_then(WeightSpec::fixed)
                .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<WeightSpec, E> {
            self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<WeightSpec, E> {
            v.parse()
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Str(v), &self))
        }
    }
    d.deserialize_any(V)
}

pub(crate) fn opt_weight_spec<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<WeightSpec>, D::Error> {
    weight_spec(d).map(Some)
}

/// Unset, a link is measured: weights are rates (kbit/s), and a guess
/// would steer the datapath wrong.
pub(crate) fn default_weight() -> WeightSpec {
    WeightSpec::Auto
}
