//! The lines `tessera-loadgen` prints: one `FIGURE` line per figure, with the limit measured in
//! the same run and the ratio, so that machines of different speeds compare fairly.
//!
//! Format (one line, `key=value` fields separated by spaces, stable for scripts):
//!
//! ```text
//! FIGURE name=x509.svids_per_sec value=9120.0 unit=/s limit=18200.0 limit_name=rcgen_csr_sign_all_cores ratio=0.501 target=ratio>=0.50 met=yes
//! ```
//!
//! Latency figures compare "lower is better" values: their ratio is `value / limit` and the
//! target reads `ratio<=2.00`; absolute targets (`p99<500ms`) have no limit (`limit=-`).

use std::fmt;

/// How a figure is judged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// `value / limit` must be at least this (throughput).
    RatioAtLeast(f64),
    /// `value / limit` must be at most this (latency against a floor).
    RatioAtMost(f64),
    /// `value` must be below this absolute number (in the figure's unit).
    Below(f64),
    /// `value` must be exactly zero (failure counts).
    Zero,
    /// Reported only.
    None,
}

/// One measured figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// Dotted name, `mode.metric`.
    pub name: String,
    /// The measured value.
    pub value: f64,
    /// Its unit (`/s`, `us`, `ms`, `count`, `B`, `s`).
    pub unit: &'static str,
    /// The limit it is held to, measured in the same run, and its name.
    pub limit: Option<(f64, String)>,
    /// The target.
    pub target: Target,
}

impl Figure {
    /// A figure without a limit.
    pub fn new(name: impl Into<String>, value: f64, unit: &'static str, target: Target) -> Self {
        Self { name: name.into(), value, unit, limit: None, target }
    }

    /// The same figure held to `limit` (named `limit_name`).
    pub fn against(mut self, limit: f64, limit_name: impl Into<String>) -> Self {
        self.limit = Some((limit, limit_name.into()));
        self
    }

    /// `value / limit`, when there is a non-zero limit.
    pub fn ratio(&self) -> Option<f64> {
        self.limit.as_ref().filter(|(limit, _)| *limit > 0.0).map(|(limit, _)| self.value / limit)
    }

    /// Whether the target is met (`None` for report-only figures).
    pub fn met(&self) -> Option<bool> {
        match self.target {
            Target::RatioAtLeast(goal) => Some(self.ratio().is_some_and(|r| r >= goal)),
            Target::RatioAtMost(goal) => Some(self.ratio().is_some_and(|r| r <= goal)),
            Target::Below(goal) => Some(self.value < goal),
            Target::Zero => Some(self.value == 0.0),
            Target::None => None,
        }
    }
}

/// A figure's number as printed: one decimal from 10 up and for whole numbers, four below 10,
/// so that a small value (0.044 s) is not printed as 0.0.
struct Number(f64);

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let x = self.0;
        if x.abs() >= 10.0 || x.fract() == 0.0 || !x.is_finite() { write!(f, "{x:.1}") } else { write!(f, "{x:.4}") }
    }
}

impl fmt::Display for Figure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FIGURE name={} value={} unit={}", self.name, Number(self.value), self.unit)?;
        match &self.limit {
            Some((limit, name)) => write!(f, " limit={} limit_name={name}", Number(*limit))?,
            None => write!(f, " limit=- limit_name=-")?,
        }
        match self.ratio() {
            Some(ratio) => write!(f, " ratio={ratio:.3}")?,
            None => write!(f, " ratio=-")?,
        }
        let target = match self.target {
            Target::RatioAtLeast(goal) => format!("ratio>={goal:.2}"),
            Target::RatioAtMost(goal) => format!("ratio<={goal:.2}"),
            Target::Below(goal) => format!("value<{goal}"),
            Target::Zero => "value=0".to_owned(),
            Target::None => "-".to_owned(),
        };
        let met = match self.met() {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        write!(f, " target={target} met={met}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_figure_line() {
        let figure = Figure::new("x509.svids_per_sec", 600.0, "/s", Target::RatioAtLeast(0.5)).against(1000.0, "probe");
        assert_eq!(
            figure.to_string(),
            "FIGURE name=x509.svids_per_sec value=600.0 unit=/s limit=1000.0 limit_name=probe ratio=0.600 \
             target=ratio>=0.50 met=yes"
        );
        let slow = Figure::new("x", 400.0, "/s", Target::RatioAtLeast(0.5)).against(1000.0, "probe");
        assert_eq!(slow.met(), Some(false));
    }

    /// Values below 10 keep four decimals, so a short duration is not printed as zero.
    #[test]
    fn small_values_keep_their_digits() {
        let short = Figure::new("all_minted_s", 0.0443, "s", Target::None).against(2.5, "probe");
        assert!(short.to_string().starts_with("FIGURE name=all_minted_s value=0.0443 unit=s limit=2.5000 "), "{short}");
        let whole = Figure::new("failures", 0.0, "count", Target::Zero);
        assert!(whole.to_string().starts_with("FIGURE name=failures value=0.0 unit=count "), "{whole}");
        assert!(Figure::new("n", 3.0, "count", Target::None).to_string().contains(" value=3.0 "));
        assert!(Figure::new("big", 12.345, "ms", Target::None).to_string().contains(" value=12.3 "));
    }

    #[test]
    fn absolute_and_count_figures() {
        assert_eq!(Figure::new("p99", 120.0, "ms", Target::Below(500.0)).met(), Some(true));
        assert_eq!(Figure::new("failures", 1.0, "count", Target::Zero).met(), Some(false));
        assert!(Figure::new("n", 1.0, "count", Target::None).to_string().ends_with("target=- met=-"));
    }
}
