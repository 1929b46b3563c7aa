//! When a schedule fires: its cron expression read in its time zone ([`Timetable`]), and what
//! a scheduler does with a schedule whose cursor is due ([`decide`]). Pure logic on times: no
//! I/O.
//!
//! Ticks are wall-clock times of the schedule's time zone, turned into instants by `croner`,
//! whose daylight-saving rules are the product's (`docs/workflows.md#schedules`):
//!
//! - a wall time skipped when the clock springs forward: an expression with a fixed time of
//!   day (second, minute and hour each one value, `30 2 * * *`) fires once, at the first
//!   instant after the gap (03:00 when 02:00 jumps to 03:00); any other expression has no tick
//!   in the missing hour, which never happens;
//! - a wall time repeated when the clock falls back: an expression with a fixed time of day
//!   fires once, at the first of the two instants; any other expression (`*/15 * * * *`,
//!   `0 * * * *`) fires at both, as each is a tick of elapsed time.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// Why a cron expression or time zone was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimetableError {
    /// The expression has neither 5 nor 6 fields.
    #[error(
        "cron must have 5 fields (minute hour day-of-month month day-of-week) or 6 (with seconds first); {0:?} has {1}"
    )]
    FieldCount(String, usize),
    /// The expression does not parse.
    #[error("cron {0:?} is not valid: {1}")]
    Invalid(String, String),
    /// The time zone is not an IANA name.
    #[error("timezone {0:?} is not an IANA time zone name (such as \"Europe/Paris\" or \"UTC\")")]
    UnknownZone(String),
}

/// A schedule's cron expression in its time zone.
#[derive(Debug, Clone)]
pub struct Timetable {
    cron: Cron,
    zone: Tz,
}

impl Timetable {
    /// Reads a cron expression of 5 fields (or 6, seconds first) in an IANA time zone.
    pub fn parse(cron: &str, timezone: &str) -> Result<Self, TimetableError> {
        let fields = cron.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(TimetableError::FieldCount(cron.to_owned(), fields));
        }
        let parser = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build();
        let parsed = parser
            .parse(cron)
            .map_err(|error| TimetableError::Invalid(cron.to_owned(), error.to_string()))?;
        let zone =
            Tz::from_str(timezone).map_err(|_| TimetableError::UnknownZone(timezone.to_owned()))?;
        Ok(Self { cron: parsed, zone })
    }

    /// Returns the time zone.
    pub fn zone(&self) -> Tz {
        self.zone
    }

    /// Returns the first tick strictly after `instant`; none if the expression has no tick
    /// left (a date that never comes, such as the 30th of February).
    pub fn next_after(&self, instant: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&instant.with_timezone(&self.zone), false)
            .ok()
            .map(|tick| tick.with_timezone(&Utc))
    }

    /// Returns the latest tick at or before `instant`.
    pub fn latest_at_or_before(&self, instant: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&instant.with_timezone(&self.zone), true)
            .ok()
            .map(|tick| tick.with_timezone(&Utc))
    }

    /// Returns up to `count` ticks after `instant`, in the schedule's time zone.
    pub fn upcoming(&self, instant: DateTime<Utc>, count: usize) -> Vec<DateTime<Tz>> {
        let mut ticks = Vec::with_capacity(count);
        let mut after = instant;
        while ticks.len() < count {
            let Some(tick) = self.next_after(after) else {
                break;
            };
            ticks.push(tick.with_timezone(&self.zone));
            after = tick;
        }
        ticks
    }
}

/// What a schedule does with ticks it missed by more than the grace (the schedulers were
/// down).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    /// They are skipped; the next run is the next tick to come.
    None,
    /// One run is started, for the latest of them.
    Last,
}

impl CatchUp {
    /// Returns the policy of its stored name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "none" => Some(Self::None),
            "last" => Some(Self::Last),
            _ => None,
        }
    }

    /// Returns the policy's stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Last => "last",
        }
    }
}

/// What to do with a tick while the schedule's previous run is unfinished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    /// Start its run all the same.
    Allow,
    /// Skip it.
    Skip,
}

impl Overlap {
    /// Returns the policy of its stored name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "allow" => Some(Self::Allow),
            "skip" => Some(Self::Skip),
            _ => None,
        }
    }

    /// Returns the policy's stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Skip => "skip",
        }
    }
}

/// What a scheduler does with a due schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The tick to start a run for, if any.
    pub fire: Option<DateTime<Utc>>,
    /// The schedule's cursor afterwards; none when it has no tick left.
    pub next: Option<DateTime<Utc>>,
    /// Whether ticks were missed by more than the grace (and `catch_up` applied).
    pub missed: bool,
}

/// Decides what a due schedule, whose cursor (its next tick, at or before `now`) is `cursor`,
/// fires. A tick at most `grace` late is fired as it is, and the cursor moves to the tick
/// after it (so ticks a few seconds late, while another scheduler takes over, are each fired
/// once). A cursor further behind means ticks were missed: with [`CatchUp::None`] none is
/// fired, with [`CatchUp::Last`] one run is started for the latest tick at or before `now`;
/// either way the cursor moves to the first tick after `now`.
pub fn decide(
    timetable: &Timetable,
    cursor: DateTime<Utc>,
    now: DateTime<Utc>,
    grace: Duration,
    catch_up: CatchUp,
) -> Decision {
    let late = (now - cursor).to_std().unwrap_or_default();
    if late <= grace {
        return Decision {
            fire: Some(cursor),
            next: timetable.next_after(cursor),
            missed: false,
        };
    }
    let fire = match catch_up {
        CatchUp::None => None,
        CatchUp::Last => Some(timetable.latest_at_or_before(now).unwrap_or(cursor)),
    };
    Decision {
        fire,
        next: timetable.next_after(now),
        missed: true,
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone as _;

    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("an RFC 3339 time")
            .with_timezone(&Utc)
    }

    /// Returns the ticks of `cron` in `zone` from `from` (exclusive) to `to` (inclusive), as
    /// RFC 3339 times with the zone's offset.
    fn ticks(cron: &str, zone: &str, from: &str, to: &str) -> Vec<String> {
        let timetable = Timetable::parse(cron, zone).expect("a timetable");
        let mut found = Vec::new();
        let mut after = utc(from);
        while let Some(tick) = timetable.next_after(after) {
            if tick > utc(to) {
                break;
            }
            found.push(tick.with_timezone(&timetable.zone()).to_rfc3339());
            after = tick;
        }
        found
    }

    #[test]
    fn expressions_of_5_or_6_fields_in_known_zones_parse() {
        assert!(Timetable::parse("*/5 * * * *", "UTC").is_ok());
        assert!(Timetable::parse("* * * * * *", "Europe/Paris").is_ok());
        assert!(Timetable::parse("0 9 * * MON-FRI", "America/New_York").is_ok());
        let fields = Timetable::parse("* * * *", "UTC").expect_err("4 fields");
        assert_eq!(fields, TimetableError::FieldCount("* * * *".to_owned(), 4));
        assert!(fields.to_string().contains("5 fields"), "{fields}");
        assert!(matches!(
            Timetable::parse("* * * * * * *", "UTC"),
            Err(TimetableError::FieldCount(_, 7))
        ));
        assert!(matches!(
            Timetable::parse("@daily", "UTC"),
            Err(TimetableError::FieldCount(_, 1))
        ));
        assert!(matches!(
            Timetable::parse("61 * * * *", "UTC"),
            Err(TimetableError::Invalid(..))
        ));
        assert!(matches!(
            Timetable::parse("* * * * *", "Mars/Olympus"),
            Err(TimetableError::UnknownZone(_))
        ));
    }

    #[test]
    fn an_expression_without_ticks_left_has_no_next_tick() {
        let never = Timetable::parse("0 0 30 2 *", "UTC").expect("parses");
        assert_eq!(never.next_after(utc("2026-01-01T00:00:00Z")), None);
    }

    #[test]
    fn ticks_are_wall_times_of_the_zone() {
        assert_eq!(
            ticks(
                "0 9 * * *",
                "Europe/Paris",
                "2026-07-01T00:00:00Z",
                "2026-07-02T23:00:00Z"
            ),
            ["2026-07-01T09:00:00+02:00", "2026-07-02T09:00:00+02:00"]
        );
        assert_eq!(
            ticks(
                "*/20 * * * * *",
                "UTC",
                "2026-07-01T00:00:00Z",
                "2026-07-01T00:01:00Z"
            ),
            [
                "2026-07-01T00:00:20+00:00",
                "2026-07-01T00:00:40+00:00",
                "2026-07-01T00:01:00+00:00"
            ]
        );
    }

    #[test]
    fn a_fixed_time_skipped_by_spring_forward_fires_once_after_the_gap() {
        // In Europe/Paris, 2026-03-29 02:00 CET jumps to 03:00 CEST.
        assert_eq!(
            ticks(
                "30 2 * * *",
                "Europe/Paris",
                "2026-03-27T12:00:00Z",
                "2026-03-30T12:00:00Z"
            ),
            [
                "2026-03-28T02:30:00+01:00",
                "2026-03-29T03:00:00+02:00",
                "2026-03-30T02:30:00+02:00"
            ]
        );
        // In America/New_York, 2026-03-08 02:00 EST jumps to 03:00 EDT.
        assert_eq!(
            ticks(
                "15 2 * * *",
                "America/New_York",
                "2026-03-07T12:00:00Z",
                "2026-03-09T12:00:00Z"
            ),
            ["2026-03-08T03:00:00-04:00", "2026-03-09T02:15:00-04:00"]
        );
    }

    #[test]
    fn an_interval_has_no_ticks_in_the_hour_spring_forward_skips() {
        assert_eq!(
            ticks(
                "0,30 * * * *",
                "Europe/Paris",
                "2026-03-29T00:00:00Z",
                "2026-03-29T01:30:00Z"
            ),
            [
                "2026-03-29T01:30:00+01:00",
                "2026-03-29T03:00:00+02:00",
                "2026-03-29T03:30:00+02:00"
            ]
        );
    }

    #[test]
    fn a_fixed_time_repeated_by_fall_back_fires_once_at_its_first_instant() {
        // In Europe/Paris, 2026-10-25 03:00 CEST falls back to 02:00 CET.
        assert_eq!(
            ticks(
                "30 2 * * *",
                "Europe/Paris",
                "2026-10-24T12:00:00Z",
                "2026-10-26T12:00:00Z"
            ),
            ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]
        );
    }

    #[test]
    fn an_interval_fires_in_both_passes_of_a_repeated_hour() {
        assert_eq!(
            ticks(
                "30 * * * *",
                "Europe/Paris",
                "2026-10-24T23:00:00Z",
                "2026-10-25T02:30:00Z"
            ),
            [
                "2026-10-25T01:30:00+02:00",
                "2026-10-25T02:30:00+02:00",
                "2026-10-25T02:30:00+01:00",
                "2026-10-25T03:30:00+01:00"
            ]
        );
    }

    #[test]
    fn every_second_across_fall_back_is_consecutive_instants() {
        let timetable = Timetable::parse("* * * * * *", "Europe/Paris").expect("parses");
        let start = chrono_tz::Europe::Paris
            .with_ymd_and_hms(2026, 10, 25, 2, 59, 58)
            .earliest()
            .expect("a time")
            .with_timezone(&Utc);
        let mut at = start;
        for _ in 0..5 {
            let next = timetable.next_after(at).expect("a tick");
            assert_eq!((next - at).num_seconds(), 1, "{at} -> {next}");
            at = next;
        }
    }

    #[test]
    fn a_tick_within_the_grace_fires_and_one_past_it_follows_catch_up() {
        let every_minute = Timetable::parse("* * * * *", "UTC").expect("parses");
        let cursor = utc("2026-07-01T10:00:00Z");
        let grace = Duration::from_secs(10);
        let on_time = decide(
            &every_minute,
            cursor,
            utc("2026-07-01T10:00:05Z"),
            grace,
            CatchUp::None,
        );
        assert_eq!(
            on_time,
            Decision {
                fire: Some(cursor),
                next: Some(utc("2026-07-01T10:01:00Z")),
                missed: false
            }
        );
        let now = utc("2026-07-01T10:07:30Z");
        let skipped = decide(&every_minute, cursor, now, grace, CatchUp::None);
        assert_eq!(
            skipped,
            Decision {
                fire: None,
                next: Some(utc("2026-07-01T10:08:00Z")),
                missed: true
            }
        );
        let last = decide(&every_minute, cursor, now, grace, CatchUp::Last);
        assert_eq!(
            last,
            Decision {
                fire: Some(utc("2026-07-01T10:07:00Z")),
                next: Some(utc("2026-07-01T10:08:00Z")),
                missed: true
            }
        );
    }
}
