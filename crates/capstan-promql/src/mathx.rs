//! Numeric helpers shared by aggregations and functions.

/// Compensated (Neumaier) summation step: adds `inc` to `sum` with running
/// compensation `c`; returns the new sum and compensation.
pub fn kahan_inc(inc: f64, sum: f64, c: f64) -> (f64, f64) {
    let t = sum + inc;
    let c = if t.is_infinite() {
        0.0
    } else if sum.abs() >= inc.abs() {
        c + ((sum - t) + inc)
    } else {
        c + ((inc - t) + sum)
    };
    (t, c)
}

/// The φ-quantile of `values` by linear interpolation between closest ranks; NaN
/// sorts lowest. `values` is reordered.
pub fn quantile(q: f64, values: &mut [f64]) -> f64 {
    if values.is_empty() || q.is_nan() {
        return f64::NAN;
    }
    if q < 0.0 {
        return f64::NEG_INFINITY;
    }
    if q > 1.0 {
        return f64::INFINITY;
    }
    values.sort_by(nan_first_cmp);
    let n = values.len() as f64;
    let rank = q * (n - 1.0);
    let lower = rank.floor().max(0.0);
    let upper = (lower + 1.0).min(n - 1.0);
    let weight = rank - rank.floor();
    values[lower as usize] * (1.0 - weight) + values[upper as usize] * weight
}

/// Orders floats with NaN below everything.
pub fn nan_first_cmp(a: &f64, b: &f64) -> std::cmp::Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => std::cmp::Ordering::Equal,
        (true, false) => std::cmp::Ordering::Less,
        (false, true) => std::cmp::Ordering::Greater,
        _ => a.partial_cmp(b).unwrap(),
    }
}

/// Relative comparison with NaN equal to NaN, as the promqltest scripts compare.
pub fn almost_equal(a: f64, b: f64, epsilon: f64) -> bool {
    const MIN_NORMAL: f64 = f64::MIN_POSITIVE;
    if a.is_nan() && b.is_nan() {
        return true;
    }
    if a == b {
        return true;
    }
    let abs_sum = a.abs() + b.abs();
    let diff = (a - b).abs();
    if a == 0.0 || b == 0.0 || abs_sum < MIN_NORMAL {
        return diff < epsilon * MIN_NORMAL;
    }
    diff / abs_sum.min(f64::MAX) < epsilon
}

/// A float as Prometheus formats sample values: shortest round-trip form,
/// `NaN`, `+Inf`, `-Inf`; exponent form below 1e-6 and from 1e21 on.
pub fn format_value(v: f64) -> String {
    let mut s = Vec::new();
    write_value(&mut s, v);
    String::from_utf8(s).unwrap_or_default()
}

/// Pairs of decimal digits, "00" to "99".
const DIGIT_PAIRS: &[u8; 200] = b"\
0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

/// Appends the decimal digits of `n` (faster than the formatting machinery).
pub fn push_int(out: &mut Vec<u8>, n: i64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    let mut m = n.unsigned_abs();
    while m >= 100 {
        let d = (m % 100) as usize * 2;
        m /= 100;
        i -= 2;
        buf[i..i + 2].copy_from_slice(&DIGIT_PAIRS[d..d + 2]);
    }
    if m >= 10 {
        let d = m as usize * 2;
        i -= 2;
        buf[i..i + 2].copy_from_slice(&DIGIT_PAIRS[d..d + 2]);
    } else {
        i -= 1;
        buf[i] = b'0' + m as u8;
    }
    if n < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&buf[i..]);
}

/// Appends [`format_value`]'s text to `out` (no allocation in the common case).
pub fn write_value(out: &mut Vec<u8>, v: f64) {
    use std::io::Write;
    if v.is_nan() {
        out.extend_from_slice(b"NaN");
        return;
    }
    if v.is_infinite() {
        out.extend_from_slice(if v > 0.0 { b"+Inf" } else { b"-Inf" });
        return;
    }
    let a = v.abs();
    if a != 0.0 && a < 1e15 && v.fract() == 0.0 {
        // Whole numbers (most counters) print as integers; integer formatting is
        // several times faster than float formatting.
        push_int(out, v as i64);
        return;
    }
    if a != 0.0 && !(1e-6..1e21).contains(&a) {
        // Go's 'g'-like exponent form: 1e+21, 1.5e-05.
        let s = format!("{v:e}");
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        let e: i32 = e.parse().unwrap_or(0);
        let sign = if e < 0 { '-' } else { '+' };
        let _ = write!(out, "{m}e{sign}{:02}", e.abs());
        return;
    }
    let _ = write!(out, "{v}");
}

/// A float as Go's `strconv.FormatFloat(v, 'f', -1, 64)` writes it (count_values).
pub fn format_plain(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        };
    }
    format!("{v}")
}

/// The larger of two floats; NaN if either is NaN (unlike `f64::max`).
pub fn max_nan(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// The smaller of two floats; NaN if either is NaN (unlike `f64::min`).
pub fn min_nan(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.min(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_prometheus() {
        assert_eq!(format_value(1.0), "1");
        assert_eq!(format_value(-0.0), "-0");
        for n in [0i64, 7, -7, 10, 1_795_000_123, i64::MIN, i64::MAX] {
            let mut s = Vec::new();
            push_int(&mut s, n);
            assert_eq!(s, n.to_string().as_bytes());
        }
        assert_eq!(format_value(-1234567.0), "-1234567");
        assert_eq!(format_value(999_999_999_999_999.0), "999999999999999");
        assert_eq!(format_value(1e15), "1000000000000000");
        assert_eq!(format_value(1e20), "100000000000000000000");
        assert_eq!(format_value(0.1), "0.1");
        assert_eq!(format_value(1e21), "1e+21");
        assert_eq!(format_value(1.5e-7), "1.5e-07");
        assert_eq!(format_value(1.5e-5), "0.000015");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_plain(1e21), "1000000000000000000000");
    }

    #[test]
    fn quantiles_interpolate() {
        let mut v = vec![1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(0.5, &mut v), 2.5);
        assert_eq!(quantile(2.0, &mut v), f64::INFINITY);
        assert!(quantile(f64::NAN, &mut v).is_nan());
    }
}
