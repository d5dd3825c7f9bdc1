//! When a plan's next run is due: a five-field cron expression read in the plan's time
//! zone, and a window after each scheduled time within which the run may still start.

use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;

use crate::api::plan::Schedule;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("cron {cron:?} is not a valid five-field expression: {message}")]
    Cron { cron: String, message: String },
    #[error("time zone {0:?} is not an IANA time zone name (e.g. Europe/Berlin)")]
    TimeZone(String),
}

impl ScheduleError {
    pub fn category(&self) -> &'static str {
        match self {
            Self::Cron { .. } => "InvalidSchedule",
            Self::TimeZone(_) => "InvalidTimeZone",
        }
    }
}

/// A parsed schedule.
#[derive(Clone, Debug)]
pub struct ParsedSchedule {
    cron: Cron,
    zone: Tz,
    window: chrono::Duration,
}

impl ParsedSchedule {
    pub fn parse(schedule: &Schedule) -> Result<Self, ScheduleError> {
        let cron = Cron::from_str(schedule.cron.trim()).map_err(|err| ScheduleError::Cron {
            cron: schedule.cron.clone(),
            message: err.to_string(),
        })?;
        let zone_name = schedule.time_zone.as_deref().unwrap_or("UTC");
        let zone =
            Tz::from_str(zone_name).map_err(|_| ScheduleError::TimeZone(zone_name.to_string()))?;
        Ok(Self {
            cron,
            zone,
            window: chrono::Duration::minutes(i64::from(schedule.window_minutes)),
        })
    }

    /// The scheduled time a run should start for now, if one is due: the latest
    /// occurrence at or before `now`, later than `last_scheduled`, whose window is open.
    pub fn due(
        &self,
        now: DateTime<Utc>,
        last_scheduled: Option<DateTime<Utc>>,
    ) -> Option<DateTime<Utc>> {
        let local_now = self.zone.from_utc_datetime(&now.naive_utc());
        let previous = self
            .cron
            .find_previous_occurrence(&local_now, true)
            .ok()?
            .with_timezone(&Utc);
        let fresh = last_scheduled.is_none_or(|last| previous > last);
        (fresh && now < previous + self.window).then_some(previous)
    }

    /// The next scheduled time after `now`.
    pub fn next_after(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local_now = self.zone.from_utc_datetime(&now.naive_utc());
        self.cron
            .find_next_occurrence(&local_now, false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(cron: &str, zone: Option<&str>, window: u32) -> ParsedSchedule {
        ParsedSchedule::parse(&Schedule {
            cron: cron.into(),
            time_zone: zone.map(String::from),
            window_minutes: window,
        })
        .unwrap()
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn a_run_is_due_inside_the_window_once() {
        let saturday_two = schedule("0 2 * * 6", None, 60);
        assert_eq!(
            saturday_two.due(at("2026-11-28T02:30:00Z"), None),
            Some(at("2026-11-28T02:00:00Z"))
        );
        assert_eq!(
            saturday_two.due(at("2026-11-28T03:00:00Z"), None),
            None,
            "the window closed"
        );
        assert_eq!(
            saturday_two.due(at("2026-11-28T02:30:00Z"), Some(at("2026-11-28T02:00:00Z"))),
            None,
            "already ran"
        );
        assert_eq!(
            saturday_two.next_after(at("2026-11-28T02:30:00Z")),
            Some(at("2026-12-05T02:00:00Z"))
        );
    }

    #[test]
    fn the_time_zone_is_honoured_across_daylight_saving() {
        let berlin = schedule("0 2 * * *", Some("Europe/Berlin"), 30);
        // 02:00 in Berlin is 01:00 UTC in winter and 00:00 UTC in summer.
        assert_eq!(
            berlin.next_after(at("2026-11-22T12:00:00Z")),
            Some(at("2026-11-23T01:00:00Z"))
        );
        assert_eq!(
            berlin.next_after(at("2026-07-01T12:00:00Z")),
            Some(at("2026-07-02T00:00:00Z"))
        );
    }

    #[test]
    fn bad_schedules_are_named() {
        let bad = |cron: &str, zone: &str| {
            ParsedSchedule::parse(&Schedule {
                cron: cron.into(),
                time_zone: Some(zone.into()),
                window_minutes: 60,
            })
            .unwrap_err()
        };
        assert!(matches!(
            bad("61 * * * *", "UTC"),
            ScheduleError::Cron { .. }
        ));
        assert_eq!(
            bad("0 2 * * *", "Mars/Olympus"),
            ScheduleError::TimeZone("Mars/Olympus".into())
        );
    }
}
