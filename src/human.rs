//! Durations as people read them in logs and error messages.

use std::fmt;
use std::time::Duration;

/// A duration as people write it: `850 ms`, `2.5 s`, `3 min 20 s`, `1 h 5 min`.
pub(crate) struct HumanDuration(pub(crate) Duration);

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        let s = self.0.as_secs();
        match s {
            0 => write!(f, "{ms} ms"),
            1..60 => write!(f, "{:.1} s", self.0.as_secs_f64()),
            60..3600 => write!(f, "{} min {} s", s / 60, s % 60),
            _ => write!(f, "{} h {} min", s / 3600, s / 60 % 60),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_in_the_unit_people_use() {
        let text = |d: Duration| HumanDuration(d).to_string();
        assert_eq!(text(Duration::from_nanos(231)), "0 ms");
        assert_eq!(text(Duration::from_millis(850)), "850 ms");
        assert_eq!(text(Duration::from_millis(2_500)), "2.5 s");
        assert_eq!(text(Duration::from_secs(200)), "3 min 20 s");
        assert_eq!(text(Duration::from_secs(3_900)), "1 h 5 min");
    }
}
