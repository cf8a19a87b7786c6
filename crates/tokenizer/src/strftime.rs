//! A small `strftime` for the `strftime_now` function that chat templates call (Llama 3 templates
//! print today's date). Time is UTC; no time-zone database is consulted.

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

/// Broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: i64,
    /// 1..=12
    month: u32,
    /// 1..=31
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    /// 0 = Monday .. 6 = Sunday
    weekday: u32,
    /// 1..=366
    day_of_year: u32,
}

impl DateTime {
    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        // 1970-01-01 was a Thursday (3 when Monday is 0).
        let weekday = (days + 3).rem_euclid(7) as u32;
        let day_of_year = (days - days_from_civil(year, 1, 1) + 1) as u32;
        DateTime { year, month, day, hour: rem / 3600, minute: rem / 60 % 60, second: rem % 60, weekday, day_of_year }
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// (year, month, day) to days since 1970-01-01.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Formats the current UTC time.
pub(crate) fn now_utc(format: &str) -> String {
    let secs = match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    };
    format_unix(secs, format)
}

/// Formats `secs` since the Unix epoch (UTC) with the common `strftime` directives:
/// `%Y %y %m %d %e %H %I %M %S %p %B %b %h %A %a %j %Z %z %F %T %D %%`, and the glibc `-` flag
/// (`%-d`) that drops padding. Unknown directives are copied through unchanged.
pub(crate) fn format_unix(secs: i64, format: &str) -> String {
    let t = DateTime::from_unix(secs);
    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars.next();
        let no_pad = spec == Some('-');
        if no_pad {
            spec = chars.next();
        }
        // Writing to a String cannot fail.
        let num = |out: &mut String, v: i64, width: usize| {
            let _ = if no_pad { write!(out, "{v}") } else { write!(out, "{v:0width$}") };
        };
        match spec {
            Some('Y') => num(&mut out, t.year, 4),
            Some('y') => num(&mut out, t.year.rem_euclid(100), 2),
            Some('m') => num(&mut out, t.month.into(), 2),
            Some('d') => num(&mut out, t.day.into(), 2),
            Some('e') => {
                let _ = if no_pad { write!(out, "{}", t.day) } else { write!(out, "{:2}", t.day) };
            }
            Some('H') => num(&mut out, t.hour.into(), 2),
            Some('I') => num(&mut out, ((t.hour + 11) % 12 + 1).into(), 2),
            Some('M') => num(&mut out, t.minute.into(), 2),
            Some('S') => num(&mut out, t.second.into(), 2),
            Some('j') => num(&mut out, t.day_of_year.into(), 3),
            Some('p') => out.push_str(if t.hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(MONTHS[t.month as usize - 1]),
            Some('b') | Some('h') => out.push_str(&MONTHS[t.month as usize - 1][..3]),
            Some('A') => out.push_str(WEEKDAYS[t.weekday as usize]),
            Some('a') => out.push_str(&WEEKDAYS[t.weekday as usize][..3]),
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('F') => out.push_str(&format_unix(secs, "%Y-%m-%d")),
            Some('T') => out.push_str(&format_unix(secs, "%H:%M:%S")),
            Some('D') => out.push_str(&format_unix(secs, "%m/%d/%y")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        // 2024-07-23 14:05:09 UTC, a Tuesday.
        let t = 1_721_743_509;
        assert_eq!(format_unix(t, "%d %b %Y"), "23 Jul 2024");
        assert_eq!(format_unix(t, "%A %B %-d, %Y %H:%M:%S %p"), "Tuesday July 23, 2024 14:05:09 PM");
        assert_eq!(format_unix(t, "%F %T %j %I %y %%"), "2024-07-23 14:05:09 205 02 24 %");
        assert_eq!(format_unix(0, "%a %Y-%m-%d %e"), "Thu 1970-01-01  1");
        // Leap day, and before the epoch.
        assert_eq!(format_unix(951_782_400, "%F %a"), "2000-02-29 Tue");
        assert_eq!(format_unix(-86_400, "%F"), "1969-12-31");
        assert_eq!(format_unix(0, "%Q %"), "%Q %");
    }

    #[test]
    fn civil_round_trips() {
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
