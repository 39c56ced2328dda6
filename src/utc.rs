//! Whole-second UTC times written as RFC 3339 (`2026-12-03T10:15:00Z`), for claims in
//! the desired-state file. Whole seconds, so that a time the daemon writes reads back
//! equal: a reload of its own write must not look like a new desired state.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Seconds since the Unix epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct UtcTime(u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not an RFC 3339 UTC time like \"2026-12-03T10:15:00Z\": {why}")]
pub struct BadTime {
    text: String,
    why: &'static str,
}

impl UtcTime {
    pub fn from_epoch_s(seconds: u64) -> Self {
        Self(seconds)
    }

    /// The second `ms` falls in: a claim until T lives while `now_ms < T * 1000`.
    pub fn of_ms(ms: u64) -> Self {
        Self(ms / 1000)
    }

    /// The wall clock's current second.
    pub fn now() -> Self {
        Self::of_ms(crate::clock::now_ms())
    }

    /// The first whole second at or after `ms`: a claim for N seconds taken at `ms`
    /// lasts at least N seconds.
    pub fn at_or_after_ms(ms: u64) -> Self {
        Self(ms.div_ceil(1000))
    }

    pub fn epoch_s(self) -> u64 {
        self.0
    }

    pub fn epoch_ms(self) -> u64 {
        self.0.saturating_mul(1000)
    }

    pub fn plus_s(self, seconds: u64) -> Self {
        Self(self.0.saturating_add(seconds))
    }

    /// `YYYY-MM-DDTHH:MM:SS` then `Z` (or `+00:00`), with optional fractional seconds,
    /// which are dropped. Other offsets are refused: the file speaks UTC.
    pub fn parse(text: &str) -> Result<Self, BadTime> {
        let bad = |why| BadTime {
            text: text.to_owned(),
            why,
        };
        let bytes = text.as_bytes();
        if bytes.len() < 20 {
            return Err(bad("too short"));
        }
        let layout_ok = bytes[4] == b'-'
            && bytes[7] == b'-'
            && matches!(bytes[10], b'T' | b't')
            && bytes[13] == b':'
            && bytes[16] == b':';
        if !layout_ok {
            return Err(bad("expected YYYY-MM-DDTHH:MM:SS"));
        }
        let number = |range: std::ops::Range<usize>| -> Result<u64, BadTime> {
            let digits = &text[range];
            if digits.bytes().all(|b| b.is_ascii_digit()) {
                Ok(digits.parse().unwrap_or(0))
            } else {
                Err(bad("a field is not a number"))
            }
        };
        let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
        let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
        let mut rest = &text[19..];
        if let Some(fraction) = rest.strip_prefix('.') {
            let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(bad("a '.' without digits"));
            }
            rest = &fraction[digits..];
        }
        if !matches!(rest, "Z" | "z" | "+00:00" | "-00:00") {
            return Err(bad("the time must end in Z (UTC)"));
        }
        if !(1970..=9999).contains(&year) || !(1..=12).contains(&month) {
            return Err(bad("year or month out of range"));
        }
        if day == 0 || day > days_in_month(year, month) {
            return Err(bad("no such day in that month"));
        }
        if hour > 23 || minute > 59 || second > 59 {
            return Err(bad("hour, minute or second out of range"));
        }
        let days = days_from_civil(year, month, day);
        Ok(Self(days * 86_400 + hour * 3600 + minute * 60 + second))
    }
}

impl TryFrom<String> for UtcTime {
    type Error = BadTime;

    fn try_from(text: String) -> Result<Self, BadTime> {
        Self::parse(&text)
    }
}

impl Serialize for UtcTime {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl fmt::Display for UtcTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (days, of_day) = (self.0 / 86_400, self.0 % 86_400);
        let (year, month, day) = civil_from_days(days);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
            of_day / 3600,
            of_day % 3600 / 60,
            of_day % 60
        )
    }
}

fn is_leap(year: u64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: u64, month: u64) -> u64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a date from 1970 on (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year / 400;
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_instants_parse_to_their_epoch_seconds() {
        assert_eq!(UtcTime::parse("1970-01-01T00:00:00Z").unwrap().epoch_s(), 0);
        assert_eq!(
            UtcTime::parse("2026-12-03T10:15:00Z").unwrap().epoch_s(),
            1_796_292_900
        );
        assert_eq!(
            UtcTime::parse("2024-02-29T23:59:59.250+00:00")
                .unwrap()
                .epoch_s(),
            1_709_251_199
        );
    }

    #[test]
    fn malformed_or_non_utc_times_are_refused_with_why() {
        for (text, why) in [
            ("2026-12-03 10:15:00Z", "YYYY-MM-DDTHH:MM:SS"),
            ("2026-12-03T10:15:00", "too short"),
            ("2026-12-03T10:15:00+01:00", "end in Z"),
            ("2025-02-29T10:15:00Z", "no such day"),
            ("2026-13-03T10:15:00Z", "month out of range"),
            ("2026-12-03T24:00:00Z", "hour"),
            ("2026-12-03T10:15:00.Z", "without digits"),
            ("2026-1a-03T10:15:00Z", "not a number"),
        ] {
            let error = UtcTime::parse(text).unwrap_err().to_string();
            assert!(error.contains(why), "{text}: {error}");
        }
    }

    #[test]
    fn a_time_is_written_as_it_is_read() {
        let time = UtcTime::parse("2026-12-03T10:15:00Z").unwrap();
        assert_eq!(time.to_string(), "2026-12-03T10:15:00Z");
        assert_eq!(UtcTime::at_or_after_ms(1_001).epoch_s(), 2);
        assert_eq!(UtcTime::at_or_after_ms(1_000).epoch_s(), 1);
        assert_eq!(UtcTime::of_ms(1_999).epoch_s(), 1);
    }

    proptest! {
        #[test]
        fn display_and_parse_round_trip(seconds in 0u64..253_402_300_799) {
            let time = UtcTime::from_epoch_s(seconds);
            prop_assert_eq!(UtcTime::parse(&time.to_string()).unwrap(), time);
        }
    }
}
