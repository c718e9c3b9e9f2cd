//! Date functions (`hour`, `day_of_week`, …), in UTC.

use promql_parser::parser::Expr;

use crate::engine::Ev;
use crate::value::{Error, Series, Value};
use capstan_tsdb::Labels;

/// Civil date (year, month 1-12, day 1-31) of a day count since 1970-01-01.
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

pub(crate) fn field(name: &str, secs: f64) -> f64 {
    if !secs.is_finite() {
        return f64::NAN;
    }
    let s = secs.trunc() as i64;
    let days = s.div_euclid(86_400);
    let sod = s.rem_euclid(86_400);
    let (y, m, d) = civil(days);
    (match name {
        "minute" => sod / 60 % 60,
        "hour" => sod / 3600,
        "day_of_week" => (days + 4).rem_euclid(7),
        "day_of_month" => d as i64,
        "day_of_year" => (1..m).map(|mm| days_in_month(y, mm) as i64).sum::<i64>() + d as i64,
        "days_in_month" => days_in_month(y, m) as i64,
        "month" => m as i64,
        _ => y,
    }) as f64
}

pub(crate) fn eval(ev: &mut Ev<'_>, name: &str, arg: Option<&Expr>) -> Result<Value, Error> {
    let mut v = match arg {
        Some(a) => ev.eval_vector(a)?,
        None => vec![Series::new(
            Labels::default(),
            (0..ev.steps())
                .map(|i| (ev.ts(i), ev.ts(i) as f64 / 1000.0))
                .collect(),
        )],
    };
    for s in &mut v {
        ev.drop_name(s);
        for p in &mut s.points {
            p.1 = field(name, p.1);
        }
    }
    Ok(Value::Vector(ev.dedup(v)?))
}

#[cfg(test)]
mod tests {
    use super::field;

    #[test]
    fn dates_in_utc() {
        // 2024-02-29T13:45:00Z, a Thursday.
        let t = 1_709_214_300.0;
        assert_eq!(field("year", t), 2024.0);
        assert_eq!(field("month", t), 2.0);
        assert_eq!(field("day_of_month", t), 29.0);
        assert_eq!(field("days_in_month", t), 29.0);
        assert_eq!(field("day_of_year", t), 60.0);
        assert_eq!(field("day_of_week", t), 4.0);
        assert_eq!(field("hour", t), 13.0);
        assert_eq!(field("minute", t), 45.0);
        assert_eq!(field("year", -1.0), 1969.0);
    }
}
