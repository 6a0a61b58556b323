//! Business hours: a support group's weekly schedule in its IANA time zone, with holidays.
//!
//! The schedule is evaluated in the group's *civil* time: "09:00" means nine o'clock on the wall clocks of
//! the group's time zone, so a change to or from daylight saving time moves the UTC instant at which the
//! group opens. The time-zone database is bundled into the binary (jiff's `tzdb-bundle-always`), so the
//! result does not depend on the machine's `/usr/share/zoneinfo`.
//!
//! An interval is half-open: `"09:00-17:30"` is open from 09:00:00.000 up to, not including, 17:30. When
//! civil time jumps (a gap in spring) or repeats (a fold in autumn), the status is whatever the civil time
//! shown on the wall at that instant says: an hour that is skipped is skipped, an hour that repeats is open
//! (or closed) twice.

use std::collections::BTreeSet;
use std::fmt;

use jiff::Timestamp;
use jiff::civil::{Date, DateTime, Time};
use jiff::tz::{AmbiguousOffset, Offset, TimeZone};
use serde::{Deserialize, Serialize};

const MINUTES_PER_DAY: u16 = 24 * 60;
const MS_PER_MINUTE: i64 = 60_000;

/// The configuration form of a group's business hours (the `hours` block of a group).
///
/// ```yaml
/// hours:
///   time_zone: Europe/Berlin
///   weekly:            # any subset of mon tue wed thu fri sat sun; a missing day is closed all day
///     mon: ["09:00-12:00", "13:00-17:30"]
///     sat: ["10:00-14:00"]
///   holidays: ["2026-12-25", "2027-01-01"]   # closed all day, in the group's time zone
/// ```
///
/// This is only the text as written; [`BusinessHours::new`] validates it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoursSpec {
    /// An IANA time zone name, such as `Europe/Berlin` or `America/New_York`.
    pub time_zone: String,
    /// The opening intervals of each day of the week.
    pub weekly: WeeklySpec,
    /// Dates (`YYYY-MM-DD`, in the group's time zone) on which the group is closed all day.
    #[serde(default)]
    pub holidays: Vec<String>,
}

/// The opening intervals of each day of the week, as `"HH:MM-HH:MM"` strings (the end may be `"24:00"`).
/// A day that is missing or empty is closed all day.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeeklySpec {
    /// Monday.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mon: Vec<String>,
    /// Tuesday.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tue: Vec<String>,
    /// Wednesday.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wed: Vec<String>,
    /// Thursday.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub thu: Vec<String>,
    /// Friday.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fri: Vec<String>,
    /// Saturday.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sat: Vec<String>,
    /// Sunday.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sun: Vec<String>,
}

impl WeeklySpec {
    /// The days with their field names, Monday first.
    fn days(&self) -> [(&'static str, &[String]); 7] {
        [
            ("mon", &self.mon),
            ("tue", &self.tue),
            ("wed", &self.wed),
            ("thu", &self.thu),
            ("fri", &self.fri),
            ("sat", &self.sat),
            ("sun", &self.sun),
        ]
    }
}

/// Why an [`HoursSpec`] was refused. Every variant names the field and the value at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HoursError {
    /// `time_zone` is not in the IANA time-zone database.
    #[error("hours.time_zone: unknown time zone {0:?} (an IANA name such as \"Europe/Berlin\" is expected)")]
    UnknownTimeZone(String),
    /// An interval is not `"HH:MM-HH:MM"`, is out of range, or does not end after it starts.
    #[error("hours.weekly.{day}: bad interval {interval:?}: {reason}")]
    BadInterval {
        /// The day's field name (`mon` ... `sun`).
        day: &'static str,
        /// The interval as written.
        interval: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two intervals of the same day overlap.
    #[error("hours.weekly.{day}: intervals {first:?} and {second:?} overlap")]
    Overlap {
        /// The day's field name (`mon` ... `sun`).
        day: &'static str,
        /// One interval as written.
        first: String,
        /// The other interval as written.
        second: String,
    },
    /// A holiday is not a valid `YYYY-MM-DD` date.
    #[error("hours.holidays: bad date {0:?} (a date such as \"2026-12-25\" is expected)")]
    BadDate(String),
}

/// A validated schedule, ready to answer "is the group open at this instant" and "when does that change".
#[derive(Clone, PartialEq)]
pub struct BusinessHours {
    tz: TimeZone,
    /// Half-open minute ranges `[start, end)` per weekday, Monday first, sorted, touching ranges merged.
    weekly: [Vec<(u16, u16)>; 7],
    holidays: BTreeSet<Date>,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Open every minute of every day, no holidays.
    AlwaysOpen,
    /// No opening interval on any day.
    NeverOpen,
    /// Open every minute of every day except on holidays.
    AllDayExceptHolidays,
    /// Anything else: the status changes at least once a week outside holidays.
    Weekly,
}

impl fmt::Debug for BusinessHours {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusinessHours")
            .field("time_zone", &self.tz.iana_name().unwrap_or("?"))
            .field("weekly", &self.weekly)
            .field("holidays", &self.holidays)
            .field("kind", &self.kind)
            .finish()
    }
}

impl Default for BusinessHours {
    fn default() -> Self {
        Self::always_open()
    }
}

impl BusinessHours {
    /// Validates a schedule. The error names the offending field and value.
    pub fn new(spec: &HoursSpec) -> Result<BusinessHours, HoursError> {
        let tz =
            TimeZone::get(spec.time_zone.trim()).map_err(|_| HoursError::UnknownTimeZone(spec.time_zone.clone()))?;
        let mut weekly: [Vec<(u16, u16)>; 7] = Default::default();
        for (slot, (day, intervals)) in weekly.iter_mut().zip(spec.weekly.days()) {
            *slot = parse_day(day, intervals)?;
        }
        let holidays = spec
            .holidays
            .iter()
            .map(|text| parse_date(text).ok_or_else(|| HoursError::BadDate(text.clone())))
            .collect::<Result<_, _>>()?;
        Ok(Self::from_parts(tz, weekly, holidays))
    }

    /// A schedule that is always open: the one of a group without `hours`.
    pub fn always_open() -> BusinessHours {
        let weekly = std::array::from_fn(|_| vec![(0, MINUTES_PER_DAY)]);
        Self::from_parts(TimeZone::UTC, weekly, BTreeSet::new())
    }

    fn from_parts(tz: TimeZone, weekly: [Vec<(u16, u16)>; 7], holidays: BTreeSet<Date>) -> BusinessHours {
        let all_day = weekly.iter().all(|day| day.as_slice() == [(0, MINUTES_PER_DAY)]);
        let kind = if weekly.iter().all(Vec::is_empty) {
            Kind::NeverOpen
        } else if all_day && holidays.is_empty() {
            Kind::AlwaysOpen
        } else if all_day {
            Kind::AllDayExceptHolidays
        } else {
            Kind::Weekly
        };
        BusinessHours { tz, weekly, holidays, kind }
    }

    /// The IANA name of the schedule's time zone (`UTC` for [`BusinessHours::always_open`]).
    pub fn time_zone(&self) -> &str {
        self.tz.iana_name().unwrap_or("UTC")
    }

    /// Whether the group is open at `at_ms` (milliseconds since the Unix epoch), judged by the civil time in
    /// the group's time zone at that instant.
    pub fn is_open(&self, at_ms: i64) -> bool {
        match self.kind {
            Kind::AlwaysOpen => true,
            Kind::NeverOpen => false,
            Kind::AllDayExceptHolidays | Kind::Weekly => match Timestamp::from_millisecond(at_ms) {
                Ok(at) => self.open_at(at),
                // Beyond the years -9999..=9999: nobody is at work.
                Err(_) => false,
            },
        }
    }

    /// The first instant after `at_ms` at which [`is_open`](Self::is_open) differs from its value at `at_ms`,
    /// in milliseconds since the Unix epoch: when to evaluate the schedule again. `None` when the status never
    /// changes again (always open, never open, or open all day with no holiday left).
    pub fn next_change_after(&self, at_ms: i64) -> Option<i64> {
        if matches!(self.kind, Kind::AlwaysOpen | Kind::NeverOpen) {
            return None;
        }
        let at = Timestamp::from_millisecond(at_ms).ok()?;
        let open = self.open_at(at);
        let changes = |c: &Timestamp| *c > at && self.open_at(*c) != open;

        // The status can change only where civil time crosses a boundary of a day (midnight, a start, an
        // end) or where civil time jumps (a time-zone transition). Walk the boundaries day by day, then the
        // transitions, and take the first candidate at which the status differs.
        let first_day = self.tz.to_datetime(at).date();
        let first_day = first_day.yesterday().unwrap_or(first_day); // a fold can bring yesterday back
        let last_day = add_days(self.holidays.last().copied().unwrap_or(first_day).max(first_day), 10);
        let mut best: Option<Timestamp> = None;
        let mut day = if self.relevant_day(first_day) { Some(first_day) } else { self.next_relevant_day(first_day) };
        while let Some(d) = day {
            if d > last_day {
                break;
            }
            // No candidate of this day or later can come before one already found.
            if let (Some(best), Ok(earliest)) = (best, Offset::MAX.to_timestamp(d.to_datetime(Time::midnight())))
                && best < earliest
            {
                break;
            }
            for minute in self.boundaries(d) {
                for candidate in self.instants(d, minute).into_iter().flatten() {
                    if changes(&candidate) && best.is_none_or(|best| candidate < best) {
                        best = Some(candidate);
                    }
                }
            }
            day = self.next_relevant_day(d);
        }
        let horizon =
            best.or_else(|| Offset::MIN.to_timestamp(add_days(last_day, 1).to_datetime(Time::midnight())).ok());
        for transition in self.tz.following(at) {
            let candidate = transition.timestamp();
            if horizon.is_some_and(|horizon| candidate >= horizon) {
                break;
            }
            if changes(&candidate) {
                best = Some(candidate);
                break;
            }
        }
        best.map(Timestamp::as_millisecond)
    }

    fn open_at(&self, at: Timestamp) -> bool {
        let civil = self.tz.to_datetime(at);
        self.open_at_civil(civil)
    }

    fn open_at_civil(&self, civil: DateTime) -> bool {
        let date = civil.date();
        if self.holidays.contains(&date) {
            return false;
        }
        let time = civil.time();
        let ms_of_day = ((i64::from(time.hour()) * 60 + i64::from(time.minute())) * 60 + i64::from(time.second()))
            * 1000
            + i64::from(time.subsec_nanosecond()) / 1_000_000;
        self.day_intervals(date).iter().any(|&(start, end)| {
            i64::from(start) * MS_PER_MINUTE <= ms_of_day && ms_of_day < i64::from(end) * MS_PER_MINUTE
        })
    }

    fn day_intervals(&self, date: Date) -> &[(u16, u16)] {
        let index = usize::try_from(date.weekday().to_monday_zero_offset()).unwrap_or(0);
        self.weekly.get(index).map_or(&[], Vec::as_slice)
    }

    /// The minutes of day `date` at which the status may change: midnight, and every start and end.
    fn boundaries(&self, date: Date) -> Vec<u16> {
        let mut minutes = vec![0];
        if !self.holidays.contains(&date) {
            for &(start, end) in self.day_intervals(date) {
                minutes.push(start);
                if end < MINUTES_PER_DAY {
                    minutes.push(end);
                }
            }
        }
        minutes
    }

    /// The instants at which civil time shows `minute` on `date`: none in a gap (the transition itself is a
    /// candidate then), two in a fold.
    fn instants(&self, date: Date, minute: u16) -> [Option<Timestamp>; 2] {
        let (Ok(hour), Ok(minute)) = (i8::try_from(minute / 60), i8::try_from(minute % 60)) else {
            return [None, None];
        };
        let Ok(time) = Time::new(hour, minute, 0, 0) else {
            return [None, None];
        };
        let civil = date.to_datetime(time);
        match self.tz.to_ambiguous_timestamp(civil).offset() {
            AmbiguousOffset::Unambiguous { offset } => [offset.to_timestamp(civil).ok(), None],
            AmbiguousOffset::Gap { .. } => [None, None],
            AmbiguousOffset::Fold { before, after } => {
                [before.to_timestamp(civil).ok(), after.to_timestamp(civil).ok()]
            }
        }
    }

    /// Whether the boundaries of `date` need looking at. When every day is open all day, only the edges of
    /// holidays matter; otherwise every day does.
    fn relevant_day(&self, date: Date) -> bool {
        match self.kind {
            Kind::AllDayExceptHolidays => {
                self.holidays.contains(&date) || date.yesterday().is_ok_and(|d| self.holidays.contains(&d))
            }
            _ => true,
        }
    }

    fn next_relevant_day(&self, date: Date) -> Option<Date> {
        match self.kind {
            Kind::AllDayExceptHolidays => {
                let next_holiday =
                    self.holidays.range((std::ops::Bound::Excluded(date), std::ops::Bound::Unbounded)).next();
                let after_holiday = self.holidays.range(date..).next().and_then(|h| h.tomorrow().ok());
                match (next_holiday, after_holiday) {
                    (Some(&a), Some(b)) => Some(a.min(b)),
                    (Some(&a), None) => Some(a),
                    (None, b) => b,
                }
            }
            _ => date.tomorrow().ok(),
        }
    }
}

/// `date` plus `n` days, stopping at the last representable date.
fn add_days(date: Date, n: u32) -> Date {
    (0..n).try_fold(date, |d, _| d.tomorrow()).unwrap_or(Date::MAX)
}

/// Parses and checks one day's intervals: sorted, touching intervals merged, overlaps refused.
fn parse_day(day: &'static str, intervals: &[String]) -> Result<Vec<(u16, u16)>, HoursError> {
    let mut parsed = Vec::with_capacity(intervals.len());
    for text in intervals {
        let (start, end) =
            parse_interval(text).map_err(|reason| HoursError::BadInterval { day, interval: text.clone(), reason })?;
        parsed.push((start, end, text));
    }
    parsed.sort_by_key(|&(start, end, _)| (start, end));
    let mut merged: Vec<(u16, u16)> = Vec::with_capacity(parsed.len());
    for pair in parsed.windows(2) {
        if let [(_, first_end, first), (second_start, _, second)] = pair
            && second_start < first_end
        {
            return Err(HoursError::Overlap { day, first: (*first).clone(), second: (*second).clone() });
        }
    }
    for (start, end, _) in parsed {
        match merged.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => merged.push((start, end)),
        }
    }
    Ok(merged)
}

/// `"HH:MM-HH:MM"` as minutes of the day; the end may be `24:00`.
fn parse_interval(text: &str) -> Result<(u16, u16), &'static str> {
    let (start, end) = text.trim().split_once('-').ok_or("expected \"HH:MM-HH:MM\"")?;
    let start = parse_hhmm(start.trim()).ok_or("the start is not a time \"HH:MM\" from 00:00 to 23:59")?;
    let end = parse_hhmm(end.trim()).ok_or("the end is not a time \"HH:MM\" from 00:00 to 24:00")?;
    if start >= MINUTES_PER_DAY {
        return Err("the start is not a time \"HH:MM\" from 00:00 to 23:59");
    }
    if end <= start {
        return Err("the end must be after the start");
    }
    Ok((start, end))
}

/// `"HH:MM"` (two digits each) as minutes of the day, `00:00` to `24:00`.
fn parse_hhmm(text: &str) -> Option<u16> {
    let &[h1, h2, b':', m1, m2] = text.as_bytes() else {
        return None;
    };
    let digit = |b: u8| b.is_ascii_digit().then(|| u16::from(b - b'0'));
    let hours = digit(h1)? * 10 + digit(h2)?;
    let minutes = digit(m1)? * 10 + digit(m2)?;
    if minutes >= 60 {
        return None;
    }
    let total = hours * 60 + minutes;
    (total <= MINUTES_PER_DAY).then_some(total)
}

/// `"YYYY-MM-DD"`, a real calendar date.
fn parse_date(text: &str) -> Option<Date> {
    let bytes = text.trim().as_bytes();
    let &[y1, y2, y3, y4, b'-', m1, m2, b'-', d1, d2] = bytes else {
        return None;
    };
    let digit = |b: u8| b.is_ascii_digit().then(|| i16::from(b - b'0'));
    let year = ((digit(y1)? * 10 + digit(y2)?) * 10 + digit(y3)?) * 10 + digit(y4)?;
    let month = i8::try_from(digit(m1)? * 10 + digit(m2)?).ok()?;
    let day = i8::try_from(digit(d1)? * 10 + digit(d2)?).ok()?;
    Date::new(year, month, day).ok()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Milliseconds of an RFC 3339 instant, such as `2026-03-27T08:00:00Z`.
    fn ms(text: &str) -> i64 {
        text.parse::<Timestamp>().expect("a valid instant in a test").as_millisecond()
    }

    fn hours(json: serde_json::Value) -> BusinessHours {
        let spec: HoursSpec = serde_json::from_value(json).expect("a valid spec in a test");
        BusinessHours::new(&spec).expect("a valid schedule in a test")
    }

    fn error(json: serde_json::Value) -> HoursError {
        let spec: HoursSpec = serde_json::from_value(json).expect("a well-formed spec in a test");
        BusinessHours::new(&spec).expect_err("an invalid schedule in a test")
    }

    fn weekdays_9_to_17(time_zone: &str) -> BusinessHours {
        let day = ["09:00-17:00"];
        hours(serde_json::json!({
            "time_zone": time_zone,
            "weekly": { "mon": day, "tue": day, "wed": day, "thu": day, "fri": day },
        }))
    }

    #[test]
    fn spring_forward_moves_the_utc_opening_an_hour_earlier() {
        let berlin = weekdays_9_to_17("Europe/Berlin");
        // Friday 2026-03-27, CET (+01): 09:00 local is 08:00 UTC.
        assert!(!berlin.is_open(ms("2026-03-27T07:59:59.999Z")));
        assert!(berlin.is_open(ms("2026-03-27T08:00:00Z")));
        assert!(berlin.is_open(ms("2026-03-27T15:59:59.999Z")));
        assert!(!berlin.is_open(ms("2026-03-27T16:00:00Z")));
        // Clocks go forward on Sunday 2026-03-29. Monday 2026-03-30, CEST (+02): 09:00 local is 07:00 UTC.
        assert!(!berlin.is_open(ms("2026-03-30T06:59:59.999Z")));
        assert!(berlin.is_open(ms("2026-03-30T07:00:00Z")));
        assert!(!berlin.is_open(ms("2026-03-30T15:00:00Z")));
        // The weekend is closed; the next change after Friday's closing is Monday's opening, across the change.
        assert_eq!(berlin.next_change_after(ms("2026-03-27T16:00:00Z")), Some(ms("2026-03-30T07:00:00Z")));
        assert_eq!(berlin.next_change_after(ms("2026-03-30T07:00:00Z")), Some(ms("2026-03-30T15:00:00Z")));
    }

    #[test]
    fn fall_back_moves_the_utc_opening_an_hour_later() {
        let berlin = weekdays_9_to_17("Europe/Berlin");
        // Friday 2026-10-23, CEST: 09:00 local is 07:00 UTC. Clocks go back on Sunday 2026-10-25.
        assert!(berlin.is_open(ms("2026-10-23T07:00:00Z")));
        assert_eq!(berlin.next_change_after(ms("2026-10-23T12:00:00Z")), Some(ms("2026-10-23T15:00:00Z")));
        // Monday 2026-10-26, CET: 09:00 local is 08:00 UTC.
        assert!(!berlin.is_open(ms("2026-10-26T07:30:00Z")));
        assert_eq!(berlin.next_change_after(ms("2026-10-23T15:00:00Z")), Some(ms("2026-10-26T08:00:00Z")));
    }

    #[test]
    fn an_opening_inside_the_skipped_hour_happens_at_the_jump() {
        // 2026-03-29 in Berlin: at 01:00 UTC the clocks jump from 02:00 to 03:00; 02:30 never shows.
        let berlin = hours(serde_json::json!({"time_zone": "Europe/Berlin", "weekly": {"sun": ["02:30-04:00"]}}));
        assert!(!berlin.is_open(ms("2026-03-29T00:59:59.999Z"))); // 01:59:59 CET
        assert!(berlin.is_open(ms("2026-03-29T01:00:00Z"))); // 03:00 CEST
        assert_eq!(berlin.next_change_after(ms("2026-03-29T00:30:00Z")), Some(ms("2026-03-29T01:00:00Z")));
        assert_eq!(berlin.next_change_after(ms("2026-03-29T01:00:00Z")), Some(ms("2026-03-29T02:00:00Z")));
    }

    #[test]
    fn an_interval_inside_the_repeated_hour_is_open_twice() {
        // 2026-10-25 in Berlin: at 01:00 UTC the clocks go back from 03:00 CEST to 02:00 CET.
        let berlin = hours(serde_json::json!({"time_zone": "Europe/Berlin", "weekly": {"sun": ["02:00-02:30"]}}));
        let expected = [
            ("2026-10-24T12:00:00Z", "2026-10-25T00:00:00Z"), // 02:00 CEST: opens
            ("2026-10-25T00:00:00Z", "2026-10-25T00:30:00Z"), // 02:30 CEST: closes
            ("2026-10-25T00:30:00Z", "2026-10-25T01:00:00Z"), // 02:00 CET again: opens
            ("2026-10-25T01:00:00Z", "2026-10-25T01:30:00Z"), // 02:30 CET: closes
            ("2026-10-25T01:30:00Z", "2026-11-01T01:00:00Z"), // next Sunday, 02:00 CET
        ];
        for (after, change) in expected {
            assert_eq!(berlin.next_change_after(ms(after)), Some(ms(change)), "after {after}");
        }
        assert!(berlin.is_open(ms("2026-10-25T00:10:00Z")));
        assert!(!berlin.is_open(ms("2026-10-25T00:40:00Z")));
        assert!(berlin.is_open(ms("2026-10-25T01:10:00Z")));
    }

    #[test]
    fn a_holiday_is_closed_all_day() {
        let berlin = weekdays_9_to_17("Europe/Berlin");
        let spec = HoursSpec { holidays: vec!["2026-12-25".into()], ..berlin_spec() };
        let with_holiday = BusinessHours::new(&spec).expect("valid");
        // Friday 2026-12-25, 10:00 CET.
        assert!(berlin.is_open(ms("2026-12-25T09:00:00Z")));
        assert!(!with_holiday.is_open(ms("2026-12-25T09:00:00Z")));
        assert!(with_holiday.is_open(ms("2026-12-24T09:00:00Z")));
        // After Thursday's closing, the next opening is Monday 2026-12-28, 09:00 CET.
        assert_eq!(with_holiday.next_change_after(ms("2026-12-24T16:00:00Z")), Some(ms("2026-12-28T08:00:00Z")));
    }

    fn berlin_spec() -> HoursSpec {
        serde_json::from_value(serde_json::json!({
            "time_zone": "Europe/Berlin",
            "weekly": { "mon": ["09:00-17:00"], "tue": ["09:00-17:00"], "wed": ["09:00-17:00"],
                        "thu": ["09:00-17:00"], "fri": ["09:00-17:00"] },
        }))
        .expect("valid")
    }

    #[test]
    fn holidays_of_an_always_open_schedule_are_its_only_changes() {
        let all_day = ["00:00-24:00"];
        let h = hours(serde_json::json!({
            "time_zone": "Europe/Berlin",
            "weekly": { "mon": all_day, "tue": all_day, "wed": all_day, "thu": all_day, "fri": all_day,
                        "sat": all_day, "sun": all_day },
            "holidays": ["2026-12-25", "2026-12-26", "2099-01-01"],
        }));
        assert!(h.is_open(ms("2026-06-01T12:00:00Z")));
        // 2026-12-25 00:00 CET is 2026-12-24 23:00 UTC; the closure lasts two days.
        assert_eq!(h.next_change_after(ms("2026-06-01T12:00:00Z")), Some(ms("2026-12-24T23:00:00Z")));
        assert!(!h.is_open(ms("2026-12-25T12:00:00Z")));
        assert_eq!(h.next_change_after(ms("2026-12-24T23:00:00Z")), Some(ms("2026-12-26T23:00:00Z")));
        assert_eq!(h.next_change_after(ms("2026-12-26T23:00:00Z")), Some(ms("2098-12-31T23:00:00Z")));
        assert_eq!(h.next_change_after(ms("2099-01-01T23:00:00Z")), None);
    }

    #[test]
    fn an_interval_may_end_at_midnight_and_continue_the_next_day() {
        let h = hours(serde_json::json!({
            "time_zone": "Europe/Berlin",
            "weekly": { "fri": ["18:00-24:00"], "sat": ["00:00-02:00"], "sun": ["20:00-24:00"] },
        }));
        // Friday 2026-06-05 18:00 CEST (16:00 UTC) to Saturday 02:00 CEST (00:00 UTC), without a break.
        assert!(h.is_open(ms("2026-06-05T21:59:59.999Z"))); // 23:59:59 Friday
        assert!(h.is_open(ms("2026-06-05T22:00:00Z"))); // 00:00 Saturday
        assert_eq!(h.next_change_after(ms("2026-06-05T17:00:00Z")), Some(ms("2026-06-06T00:00:00Z")));
        // Sunday's interval closes at Monday's midnight (22:00 UTC).
        assert!(h.is_open(ms("2026-06-07T21:59:59.999Z")));
        assert!(!h.is_open(ms("2026-06-07T22:00:00Z")));
        assert_eq!(h.next_change_after(ms("2026-06-07T19:00:00Z")), Some(ms("2026-06-07T22:00:00Z")));
    }

    #[test]
    fn new_york_is_evaluated_in_its_own_civil_time() {
        let new_york = weekdays_9_to_17("America/New_York");
        // Monday 2026-01-05 (EST, -05): 09:00 is 14:00 UTC. Monday 2026-07-06 (EDT, -04): 09:00 is 13:00 UTC.
        assert!(!new_york.is_open(ms("2026-01-05T13:30:00Z")));
        assert!(new_york.is_open(ms("2026-01-05T14:00:00Z")));
        assert!(new_york.is_open(ms("2026-07-06T13:00:00Z")));
        assert!(!new_york.is_open(ms("2026-07-06T21:00:00Z")));
        // Friday 2026-03-06 17:00 EST is 22:00 UTC; after the change on 2026-03-08, Monday opens at 13:00 UTC.
        assert_eq!(new_york.next_change_after(ms("2026-03-06T22:00:00Z")), Some(ms("2026-03-09T13:00:00Z")));
        // Monday 2026-01-05 is 23:30 Sunday in New York... but 2026-01-05T03:00Z is Sunday 22:00 EST: closed.
        assert!(!new_york.is_open(ms("2026-01-05T03:00:00Z")));
    }

    #[test]
    fn always_open_and_never_open_never_change() {
        let always = BusinessHours::always_open();
        assert!(always.is_open(i64::MIN));
        assert!(always.is_open(0));
        assert!(always.is_open(i64::MAX));
        assert_eq!(always.next_change_after(ms("2026-01-01T00:00:00Z")), None);
        let never = hours(serde_json::json!({"time_zone": "UTC", "weekly": {}, "holidays": ["2026-01-01"]}));
        assert!(!never.is_open(ms("2026-01-01T12:00:00Z")));
        assert_eq!(never.next_change_after(ms("2026-01-01T12:00:00Z")), None);
    }

    #[test]
    fn extreme_instants_do_not_panic() {
        let h = weekdays_9_to_17("Pacific/Kiritimati");
        for at in [i64::MIN, i64::MIN + 1, -1, 0, 253_402_300_799_999, i64::MAX] {
            let _ = h.is_open(at);
            let _ = h.next_change_after(at);
        }
    }

    #[test]
    fn touching_intervals_merge_and_unordered_intervals_are_sorted() {
        let h = hours(serde_json::json!({
            "time_zone": "UTC", "weekly": {"mon": ["13:00-17:00", "09:00-13:00"]},
        }));
        // Monday 2026-06-01: open 09:00 to 17:00 in one piece.
        assert_eq!(h.next_change_after(ms("2026-06-01T10:00:00Z")), Some(ms("2026-06-01T17:00:00Z")));
        assert!(h.is_open(ms("2026-06-01T13:00:00Z")));
    }

    #[test]
    fn errors_name_the_bad_value() {
        let unknown = error(serde_json::json!({"time_zone": "Europe/Berln", "weekly": {}}));
        assert_eq!(unknown, HoursError::UnknownTimeZone("Europe/Berln".into()));
        assert!(unknown.to_string().contains("Europe/Berln"), "{unknown}");

        for (interval, reason) in [
            ("9:00-17:00", "the start"),
            ("09:00-7:00", "the end"),
            ("17:00-09:00", "after the start"),
            ("09:00-09:00", "after the start"),
            ("09:00-24:30", "the end"),
            ("24:00-24:00", "the start"),
            ("09:60-10:00", "the start"),
            ("0900-1000", "the start"),
            ("", "HH:MM-HH:MM"),
            ("０9:00-10:00", "the start"),
        ] {
            let bad = error(serde_json::json!({"time_zone": "UTC", "weekly": {"wed": ["08:00-08:30", interval]}}));
            let HoursError::BadInterval { day, interval: named, reason: why } = &bad else {
                panic!("{interval:?}: expected BadInterval, got {bad:?}");
            };
            assert_eq!((*day, named.as_str()), ("wed", interval));
            assert!(why.contains(reason), "{interval:?}: {why}");
            let message = bad.to_string();
            assert!(message.contains("hours.weekly.wed") && message.contains(&format!("{interval:?}")), "{message}");
        }

        let overlap = error(serde_json::json!({"time_zone": "UTC", "weekly": {"fri": ["11:00-13:00", "09:00-12:00"]}}));
        assert_eq!(
            overlap,
            HoursError::Overlap { day: "fri", first: "09:00-12:00".into(), second: "11:00-13:00".into() }
        );
        assert!(overlap.to_string().contains("\"09:00-12:00\" and \"11:00-13:00\""), "{overlap}");

        for date in ["2026-02-30", "2026-13-01", "26-12-25", "2026/12/25", "2026-12-25T00:00", "next friday"] {
            let bad = error(serde_json::json!({"time_zone": "UTC", "weekly": {}, "holidays": ["2026-12-24", date]}));
            assert_eq!(bad, HoursError::BadDate(date.into()));
            assert!(bad.to_string().contains(date), "{bad}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let bad = serde_json::from_value::<HoursSpec>(serde_json::json!({"timezone": "UTC", "weekly": {}}));
        assert!(bad.is_err_and(|e| e.to_string().contains("timezone")));
        let bad = serde_json::from_value::<HoursSpec>(serde_json::json!({"time_zone": "UTC", "weekly": {"mo": []}}));
        assert!(bad.is_err_and(|e| e.to_string().contains("mo")));
    }

    /// Zones with and without daylight saving time, with whole, half and three-quarter hour offsets.
    const ZONES: [&str; 6] =
        ["Europe/Berlin", "America/New_York", "UTC", "Australia/Lord_Howe", "Asia/Kathmandu", "America/Santiago"];

    fn arb_day() -> impl Strategy<Value = Vec<String>> {
        // Up to three intervals on a 15-minute grid, overlapping ones dropped.
        proptest::collection::vec((0u16..96, 1u16..40), 0..4).prop_map(|raw| {
            let mut taken: Vec<(u16, u16)> = Vec::new();
            for (start, len) in raw {
                let (start, end) = (start * 15, (start * 15 + len * 15).min(MINUTES_PER_DAY));
                if taken.iter().all(|&(s, e)| end <= s || e <= start) {
                    taken.push((start, end));
                }
            }
            taken.iter().map(|&(s, e)| format!("{:02}:{:02}-{:02}:{:02}", s / 60, s % 60, e / 60, e % 60)).collect()
        })
    }

    fn arb_spec() -> impl Strategy<Value = HoursSpec> {
        let holidays = proptest::collection::vec((3i8..=4, 1i8..=28), 0..3);
        (0..ZONES.len(), proptest::collection::vec(arb_day(), 7), holidays).prop_map(|(zone, days, holidays)| {
            let mut days = days.into_iter();
            let mut next = || days.next().unwrap_or_default();
            HoursSpec {
                time_zone: ZONES[zone].to_string(),
                weekly: WeeklySpec {
                    mon: next(),
                    tue: next(),
                    wed: next(),
                    thu: next(),
                    fri: next(),
                    sat: next(),
                    sun: next(),
                },
                holidays: holidays.iter().map(|(m, d)| format!("2026-{m:02}-{d:02}")).collect(),
            }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// `next_change_after` agrees with a minute-by-minute scan of `is_open` (every zone here changes
        /// offset on whole minutes, and every boundary is on a minute), across the 2026 DST changes.
        #[test]
        fn next_change_agrees_with_a_scan(spec in arb_spec(), offset_min in 0i64..(61 * 24 * 60), sub_ms in 0i64..60_000) {
            let hours = BusinessHours::new(&spec).expect("generated specs are valid");
            // From 2026-03-01 (the spring changes of Europe, America and Lord Howe's April change fall inside).
            let at = ms("2026-03-01T00:00:00Z") + offset_min * MS_PER_MINUTE + sub_ms;
            let open = hours.is_open(at);
            let first_minute = at - at.rem_euclid(MS_PER_MINUTE) + MS_PER_MINUTE;
            let scanned = (0..9 * 24 * 60)
                .map(|i| first_minute + i * MS_PER_MINUTE)
                .find(|&t| hours.is_open(t) != open);
            let next = hours.next_change_after(at);
            match scanned {
                Some(change) => prop_assert_eq!(next, Some(change)),
                None => {
                    let horizon = first_minute + 9 * 24 * 60 * MS_PER_MINUTE;
                    if let Some(next) = next {
                        prop_assert!(next >= horizon);
                        prop_assert_ne!(hours.is_open(next), open);
                    }
                }
            }
        }

        /// Any instant, any schedule: no panic, and a change reported is a change.
        #[test]
        fn a_reported_change_is_a_change(spec in arb_spec(), at in any::<i64>()) {
            let hours = BusinessHours::new(&spec).expect("generated specs are valid");
            if let Some(next) = hours.next_change_after(at) {
                prop_assert!(next > at);
                prop_assert_ne!(hours.is_open(next), hours.is_open(at));
                prop_assert_eq!(hours.is_open(next - 1), hours.is_open(at));
            }
        }
    }
}
