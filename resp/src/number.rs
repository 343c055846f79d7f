//! Numbers as Redis reads and writes them in strings.
//!
//! Clients and tests rely on Redis's exact rules: `INCR` on `"007"` or `" 7"` is an error,
//! not 8, and a double comes back as `1.5`, never `1.5000000000000000`. The request parser
//! uses the same integer rule for its length headers, so `*03` is as invalid as in Redis.

/// Reads a decimal `i64` the strict way Redis does (its `string2ll`): an optional `-`, then
/// digits without leading zeros (`0` alone is fine, `-0` is not), nothing else: no `+`, no
/// spaces, no overflow.
pub fn parse_i64(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, text),
    };
    match digits {
        [b'0'] if !negative => return Some(0),
        [b'1'..=b'9', ..] => {}
        _ => return None,
    }
    let mut magnitude: u64 = 0;
    for &digit in digits {
        if !digit.is_ascii_digit() {
            return None;
        }
        magnitude = magnitude.checked_mul(10)?.checked_add(u64::from(digit - b'0'))?;
    }
    if negative {
        0i64.checked_sub_unsigned(magnitude)
    } else {
        i64::try_from(magnitude).ok()
    }
}

/// Longest text Redis reads as a double (`MAX_LONG_DOUBLE_CHARS`).
const FLOAT_TEXT_MAX: usize = 5 * 1024 - 1;

/// Reads a double the way Redis reads `INCRBYFLOAT`'s argument: a decimal float with an
/// optional sign and exponent, or `inf`/`infinity`; not NaN, no leading or trailing spaces,
/// and not a finite number too large or too small for the type (which would silently turn
/// into infinity or zero).
pub fn parse_f64(text: &[u8]) -> Option<f64> {
    if text.is_empty() || text.len() > FLOAT_TEXT_MAX {
        return None;
    }
    let text = std::str::from_utf8(text).ok()?;
    let value: f64 = text.parse().ok()?;
    if value.is_nan() {
        return None;
    }
    let unsigned = text.trim_start_matches(['+', '-']);
    let spelled_infinite = unsigned.eq_ignore_ascii_case("inf") || unsigned.eq_ignore_ascii_case("infinity");
    if value.is_infinite() && !spelled_infinite {
        return None;
    }
    let mantissa = unsigned.split(['e', 'E']).next().unwrap_or("");
    if value == 0.0 && mantissa.bytes().any(|b| (b'1'..=b'9').contains(&b)) {
        return None;
    }
    Some(value)
}

/// Formats a double the way Redis 7 replies with one: `inf`, `-inf`, `nan`, integral values
/// without a fraction, otherwise the shortest text that reads back to the same value, in
/// exponent form (`1.5e+300`) only where `%.17g` would use it.
pub fn format_double(value: f64) -> String {
    if value.is_nan() {
        return "nan".to_owned();
    }
    if value.is_infinite() {
        return if value > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    // Integral values in this range print exactly as integers (Redis's double2ll does the same).
    const INTEGRAL_MAX: f64 = (i64::MAX / 2) as f64;
    if value.fract() == 0.0 && value.abs() <= INTEGRAL_MAX {
        if value == 0.0 && value.is_sign_negative() {
            return "-0".to_owned();
        }
        return format!("{}", value as i64);
    }
    // Rust's `{:e}` gives the shortest round-tripping digits: `d.ddde[-]x`.
    let scientific = format!("{value:e}");
    let Some((mantissa, exponent)) = scientific.split_once('e') else { return scientific };
    let Ok(exponent) = exponent.parse::<i32>() else { return scientific };
    if (-4..17).contains(&exponent) {
        return format!("{value}");
    }
    let sign = if exponent < 0 { '-' } else { '+' };
    format!("{mantissa}e{sign}{:02}", exponent.unsigned_abs())
}

/// Formats a double for storing as a string value (`INCRBYFLOAT`'s result): never an
/// exponent, no trailing zeros, the shortest digits that read back to the same value.
pub fn format_human(value: f64) -> String {
    if value == 0.0 {
        return "0".to_owned();
    }
    format!("{value}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_parse_only_in_canonical_form() {
        for (text, value) in [
            (&b"0"[..], 0),
            (b"7", 7),
            (b"-7", -7),
            (b"1234567890", 1234567890),
            (b"9223372036854775807", i64::MAX),
            (b"-9223372036854775808", i64::MIN),
        ] {
            assert_eq!(parse_i64(text), Some(value), "{}", text.escape_ascii());
        }
        for text in [
            &b""[..],
            b"-",
            b"-0",
            b"00",
            b"007",
            b"+7",
            b" 7",
            b"7 ",
            b"7a",
            b"1.0",
            b"9223372036854775808",
            b"-9223372036854775809",
            b"99999999999999999999999",
            b"\xff",
        ] {
            assert_eq!(parse_i64(text), None, "{}", text.escape_ascii());
        }
    }

    #[test]
    fn floats_parse_like_redis_reads_them() {
        for (text, value) in [
            (&b"1.5"[..], 1.5),
            (b"-0.25", -0.25),
            (b"+3", 3.0),
            (b"10", 10.0),
            (b".5", 0.5),
            (b"5.", 5.0),
            (b"1e3", 1000.0),
            (b"1E-2", 0.01),
            (b"0", 0.0),
            (b"0.000e10", 0.0),
            (b"inf", f64::INFINITY),
            (b"-Infinity", f64::NEG_INFINITY),
        ] {
            assert_eq!(parse_f64(text), Some(value), "{}", text.escape_ascii());
        }
        for text in [&b""[..], b" 1", b"1 ", b"nan", b"NaN", b"1x", b"1e400", b"-1e400", b"1e-400", b"abc", b"\xff"] {
            assert_eq!(parse_f64(text), None, "{}", text.escape_ascii());
        }
        assert_eq!(parse_f64(&[b'1'; FLOAT_TEXT_MAX + 1]), None);
    }

    #[test]
    fn doubles_format_like_redis() {
        for (value, text) in [
            (0.0, "0"),
            (-0.0, "-0"),
            (3.0, "3"),
            (-17.0, "-17"),
            (0.1, "0.1"),
            (1.5, "1.5"),
            (-2.25, "-2.25"),
            (1e16, "10000000000000000"),
            (2.5e18, "2500000000000000000"),
            (1e20, "1e+20"),
            (1e300, "1e+300"),
            (1.25e-7, "1.25e-07"),
            (0.0001, "0.0001"),
            (3.0e-5, "3e-05"),
            (f64::NAN, "nan"),
            (f64::NEG_INFINITY, "-inf"),
            (1.0 / 3.0, "0.3333333333333333"),
        ] {
            assert_eq!(format_double(value), text, "{value:e}");
        }
    }

    #[test]
    fn formatted_doubles_read_back_to_the_same_value() {
        for value in [0.1, 1.0 / 3.0, 1e300, -4.9e-324, f64::MAX, 123456.789e-20, 2.5e18, 1e20] {
            for text in [format_double(value), format_human(value)] {
                assert_eq!(parse_f64(text.as_bytes()), Some(value), "{text}");
            }
        }
    }

    #[test]
    fn human_doubles_have_no_exponent_and_no_trailing_zeros() {
        assert_eq!(format_human(10.5 + 0.1), "10.6");
        assert_eq!(format_human(3.0), "3");
        assert_eq!(format_human(-0.0), "0");
        assert_eq!(format_human(1e20), "100000000000000000000");
        assert_eq!(format_human(1.25e-7), "0.000000125");
    }
}
