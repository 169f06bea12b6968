//! Ranges of numbers, the project's named rules, and clap value parsers built from them.
use std::fmt::{self, Display};
use std::str::FromStr;

/// A value refused at the edge: the key or flag, what it must be, and what it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The config key (`learner.rollout.top_p`) or flag (`--top-p`).
    pub key: String,
    /// What the value must be, e.g. "a number in (0, 1]".
    pub requirement: String,
    /// The value as given.
    pub value: String,
}

impl Invalid {
    /// `key` must be `requirement`, and was `value`.
    pub fn new(key: &str, requirement: impl Into<String>, value: impl Display) -> Self {
        Self {
            key: key.to_string(),
            requirement: requirement.into(),
            value: value.to_string(),
        }
    }
}

impl Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} must be {}, got {}",
            self.key, self.requirement, self.value
        )
    }
}

impl std::error::Error for Invalid {}

/// The config structs' `validate()` answer a `String`; `?` converts.
impl From<Invalid> for String {
    fn from(invalid: Invalid) -> String {
        invalid.to_string()
    }
}

/// An interval of finite numbers. NaN and the infinities lie outside every range, so a
/// `NaN` from a typo or a TOML `nan` never reaches a computation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    low: f64,
    low_open: bool,
    high: f64,
    high_open: bool,
}

impl Range {
    /// Any finite number.
    pub const FINITE: Range = Range::new(f64::NEG_INFINITY, true, f64::INFINITY, true);
    /// Finite and above 0.
    pub const POSITIVE: Range = Range::above(0.0);
    /// Finite and at least 0.
    pub const NON_NEGATIVE: Range = Range::at_least(0.0);

    const fn new(low: f64, low_open: bool, high: f64, high_open: bool) -> Self {
        Self {
            low,
            low_open,
            high,
            high_open,
        }
    }

    /// `[low, ∞)`, finite.
    pub const fn at_least(low: f64) -> Self {
        Self::new(low, false, f64::INFINITY, true)
    }

    /// `(low, ∞)`, finite.
    pub const fn above(low: f64) -> Self {
        Self::new(low, true, f64::INFINITY, true)
    }

    /// `[low, high]`.
    pub const fn closed(low: f64, high: f64) -> Self {
        Self::new(low, false, high, false)
    }

    /// `[low, high)`.
    pub const fn closed_open(low: f64, high: f64) -> Self {
        Self::new(low, false, high, true)
    }

    /// `(low, high]`.
    pub const fn open_closed(low: f64, high: f64) -> Self {
        Self::new(low, true, high, false)
    }

    /// Whether `value` is finite and inside.
    pub fn contains(&self, value: f64) -> bool {
        let above_low = if self.low_open {
            value > self.low
        } else {
            value >= self.low
        };
        let below_high = if self.high_open {
            value < self.high
        } else {
            value <= self.high
        };
        value.is_finite() && above_low && below_high
    }

    /// What a value must be, in words: "a finite number > 0", "a number in (0, 1]".
    pub fn requirement(&self) -> String {
        match (self.low.is_finite(), self.high.is_finite()) {
            (false, false) => "a finite number".into(),
            (true, false) => {
                let op = if self.low_open { ">" } else { ">=" };
                format!("a finite number {op} {}", self.low)
            }
            (false, true) => {
                let op = if self.high_open { "<" } else { "<=" };
                format!("a finite number {op} {}", self.high)
            }
            (true, true) => format!(
                "a number in {}{}, {}{}",
                if self.low_open { "(" } else { "[" },
                self.low,
                self.high,
                if self.high_open { ")" } else { "]" }
            ),
        }
    }

    /// `value`, or an [`Invalid`] that names `key`.
    pub fn check(&self, key: &str, value: f64) -> Result<f64, Invalid> {
        if self.contains(value) {
            Ok(value)
        } else {
            Err(Invalid::new(key, self.requirement(), value))
        }
    }
}

/// `value` if `min <= value <= max`, else an [`Invalid`] that names `key`.
pub fn within<T: PartialOrd + Display + Copy>(
    key: &str,
    value: T,
    min: T,
    max: T,
) -> Result<T, Invalid> {
    if min <= value && value <= max {
        Ok(value)
    } else {
        Err(Invalid::new(key, int_requirement(min, Some(max)), value))
    }
}

/// `value` if `value >= min`, else an [`Invalid`] that names `key`.
pub fn at_least<T: PartialOrd + Display + Copy>(key: &str, value: T, min: T) -> Result<T, Invalid> {
    if value >= min {
        Ok(value)
    } else {
        Err(Invalid::new(key, int_requirement(min, None), value))
    }
}

fn int_requirement<T: Display>(min: T, max: Option<T>) -> String {
    match max {
        Some(max) => format!("in {min}..={max}"),
        None => format!("at least {min}"),
    }
}

/// The project's knobs, one rule each, shared by config keys and flags of the same meaning.
pub mod rules {
    use super::Range;

    /// A learning rate: 0 freezes the model; a negative rate ascends the loss.
    pub const LEARNING_RATE: Range = Range::NON_NEGATIVE;
    /// β of the implicit reward `β · log π_φ/π_ref`: at 0 every reward and the PRM loss's
    /// gradient vanish.
    pub const BETA: Range = Range::POSITIVE;
    /// The truncation of decoupled PPO's behaviour weights `π_old/π_behav`: at 0 no token
    /// would count.
    pub const BEHAVIOR_WEIGHT_CAP: Range = Range::POSITIVE;
    /// A sampling temperature where 0 means greedy.
    pub const TEMPERATURE: Range = Range::NON_NEGATIVE;
    /// The temperature of rollouts, whose log-probs PPO divides by: greedy is not a
    /// distribution.
    pub const ROLLOUT_TEMPERATURE: Range = Range::POSITIVE;
    /// Nucleus sampling mass: 0 keeps no token, 1 keeps all.
    pub const TOP_P: Range = Range::open_closed(0.0, 1.0);
    /// A probability, score or accuracy.
    pub const PROBABILITY: Range = Range::closed(0.0, 1.0);
    /// A discount factor.
    pub const DISCOUNT: Range = Range::closed(0.0, 1.0);
    /// AdamW's β1 and β2: at 1 the moments never move.
    pub const ADAM_MOMENT: Range = Range::closed_open(0.0, 1.0);
    /// AdamW's ε, which keeps the update's denominator away from 0.
    pub const ADAM_EPS: Range = Range::POSITIVE;
    /// A weight of a loss term, a weight decay or a gradient-norm limit (0 turns it off).
    pub const COEFFICIENT: Range = Range::NON_NEGATIVE;
    /// A memory budget in GiB (the sampler's KV cache).
    pub const GIB: Range = Range::POSITIVE;
    /// A time limit or period in seconds: above 0, and at most about 31 years, which is as
    /// far as a `Duration` made from a float goes without overflow to spare.
    pub const SECONDS: Range = Range::open_closed(0.0, 1e9);
    /// The most torch CPU threads asked for (0 lets torch choose).
    pub const MAX_THREADS: i32 = 1024;
}

/// clap value parsers built from the same rules, so a flag is refused with the rule's words
/// ("invalid value 'nan' for '--top-p <TOP_P>': must be a number in (0, 1]"), before anything
/// else happens.
pub mod arg {
    use super::*;

    /// A float inside `range`.
    pub fn float(
        range: Range,
    ) -> impl Fn(&str) -> Result<f64, String> + Clone + Send + Sync + 'static {
        move |text: &str| {
            let value: f64 = text
                .trim()
                .parse()
                .map_err(|_| format!("expected a number, must be {}", range.requirement()))?;
            if range.contains(value) {
                Ok(value)
            } else {
                Err(format!("must be {}", range.requirement()))
            }
        }
    }

    /// An integer in `min..=max`.
    pub fn int<T>(
        min: T,
        max: T,
    ) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
    where
        T: FromStr + PartialOrd + Display + Copy + Send + Sync + 'static,
    {
        move |text: &str| {
            let value: T = text
                .trim()
                .parse()
                .map_err(|_| format!("expected an integer in {min}..={max}"))?;
            if min <= value && value <= max {
                Ok(value)
            } else {
                Err(format!("must be in {min}..={max}"))
            }
        }
    }

    /// An integer of at least `min`.
    pub fn at_least<T>(min: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
    where
        T: FromStr + PartialOrd + Display + Copy + Send + Sync + 'static,
    {
        move |text: &str| {
            let value: T = text
                .trim()
                .parse()
                .map_err(|_| format!("expected an integer of at least {min}"))?;
            if value >= min {
                Ok(value)
            } else {
                Err(format!("must be at least {min}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_refuse_nan_infinities_and_their_bounds_as_written() {
        let top_p = rules::TOP_P;
        for ok in [1e-9, 0.5, 1.0] {
            assert_eq!(top_p.check("top_p", ok), Ok(ok));
        }
        for bad in [0.0, -0.1, 1.0 + 1e-12, f64::NAN, f64::INFINITY] {
            let e = top_p.check("learner.rollout.top_p", bad).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("learner.rollout.top_p must be a number in (0, 1], got {bad}")
            );
        }
        assert!(Range::NON_NEGATIVE.contains(0.0));
        assert!(!Range::POSITIVE.contains(0.0));
        assert!(!Range::POSITIVE.contains(f64::INFINITY));
        assert!(!Range::FINITE.contains(f64::NEG_INFINITY));
        assert!(Range::FINITE.contains(-1e300));
        assert!(!rules::ADAM_MOMENT.contains(1.0));
        assert!(rules::SECONDS.contains(1e9) && !rules::SECONDS.contains(1.1e9));
        assert_eq!(Range::POSITIVE.requirement(), "a finite number > 0");
        assert_eq!(Range::at_least(1.0).requirement(), "a finite number >= 1");
        assert_eq!(rules::ADAM_MOMENT.requirement(), "a number in [0, 1)");
    }

    #[test]
    fn every_rule_makes_a_duration_without_panicking() {
        for seconds in [1e-12, 1.0, 1e9] {
            assert!(rules::SECONDS.contains(seconds));
            let _ = std::time::Duration::from_secs_f64(seconds);
        }
    }

    #[test]
    fn integers_name_their_bounds() {
        assert_eq!(within("--threads", 4, 0, 8), Ok(4));
        assert_eq!(
            within("--threads", -1, 0, 8).unwrap_err().to_string(),
            "--threads must be in 0..=8, got -1"
        );
        assert_eq!(
            at_least("learner.algo.mini_batches", 0usize, 1)
                .unwrap_err()
                .to_string(),
            "learner.algo.mini_batches must be at least 1, got 0"
        );
        let message: String = at_least("k", 0, 1).unwrap_err().into();
        assert!(message.starts_with("k must"));
    }

    #[test]
    fn value_parsers_use_the_rules_words() {
        let parse = arg::float(rules::TOP_P);
        assert_eq!(parse("0.9"), Ok(0.9));
        assert_eq!(parse(" 1 "), Ok(1.0));
        for bad in ["0", "NaN", "nan", "inf", "-1", "1.5"] {
            assert_eq!(
                parse(bad),
                Err("must be a number in (0, 1]".into()),
                "{bad}"
            );
        }
        assert!(parse("abc").unwrap_err().contains("expected a number"));
        assert!(parse("").is_err());
        let threads = arg::int(0i32, 8);
        assert_eq!(threads("0"), Ok(0));
        assert_eq!(threads("-1"), Err("must be in 0..=8".into()));
        assert!(threads("2.5").unwrap_err().contains("expected an integer"));
        let positive = arg::at_least(1usize);
        assert_eq!(positive("3"), Ok(3));
        assert_eq!(positive("0"), Err("must be at least 1".into()));
        assert!(positive("-3").is_err());
    }
}
