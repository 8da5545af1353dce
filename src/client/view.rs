//! Lenient readers for the daemon's JSON views.
//!
//! The CLI may talk to a daemon of another version, or to one whose answer is cut short, so
//! nothing here trusts a field to exist or to have the expected type: a missing or odd value
//! reads as `None` and prints as "-". Keeping this in one place keeps the tables, the summary
//! and the progress display from each growing their own `unwrap`s.
//!
//! Text is also made safe to print here: names, ids and errors come from workflow documents
//! and remote services, and a control character in one (ESC starting a terminal escape
//! sequence, a carriage return or newline forging a line) would act on the reader's
//! terminal. [`printable`] shows such characters escaped instead.

use serde_json::Value;

/// What a table cell shows for a missing or unreadable value.
pub const MISSING: &str = "-";

/// A string field, or a number/bool rendered as text; `None` for null, missing or containers.
pub fn text(value: &Value, key: &str) -> Option<String> {
    match value.get(key)? {
        Value::String(s) if !s.is_empty() => Some(printable(s)),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// `s` with every control character (C0, DEL, C1, including newlines and tabs) and every
/// bidirectional-text override written as a Rust escape (`\u{1b}`, `\n`), so that what the
/// daemon relays can neither drive the terminal nor reorder or forge lines.
pub fn printable(s: &str) -> String {
    let unsafe_char = |c: char| c.is_control() || is_bidi_control(c);
    if !s.chars().any(unsafe_char) {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The invisible marks that reorder text on display (the "Trojan Source" characters).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A string field for display: the value, or "-".
pub fn cell(value: &Value, key: &str) -> String {
    text(value, key).unwrap_or_else(|| MISSING.to_owned())
}

/// A numeric field, accepting numbers written as strings (some encoders quote u64s).
pub fn number(value: &Value, key: &str) -> Option<f64> {
    match value.get(key)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A non-negative integer field.
pub fn count(value: &Value, key: &str) -> Option<u64> {
    number(value, key)
        .filter(|n| n.is_finite() && *n >= 0.0)
        .map(|n| n as u64)
}

/// An array field as a slice; empty when missing or not an array.
pub fn list<'a>(value: &'a Value, key: &str) -> &'a [Value] {
    value
        .get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// The items of an array field joined with ", " (strings as-is, objects by their "name"),
/// or "-" when there are none.
pub fn joined(value: &Value, key: &str) -> String {
    let items: Vec<String> = list(value, key)
        .iter()
        .filter_map(|item| match item {
            Value::String(s) => Some(printable(s)),
            Value::Number(n) => Some(n.to_string()),
            Value::Object(_) => text(item, "name").or_else(|| text(item, "id")),
            _ => None,
        })
        .collect();
    if items.is_empty() {
        MISSING.to_owned()
    } else {
        items.join(", ")
    }
}

/// The message of an error field, which the daemon writes either as `{"message", "details"}`
/// or as a plain string.
pub fn error_message(value: &Value, key: &str) -> Option<String> {
    match value.get(key)? {
        Value::String(s) if !s.is_empty() => Some(printable(s)),
        obj @ Value::Object(_) => text(obj, "message"),
        _ => None,
    }
}

/// Shortens `s` to at most `max` characters, marking the cut with an ellipsis.
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let kept: String = s.chars().take(max.saturating_sub(1)).collect();
    format!("{kept}…")
}

/// Seconds between two RFC 3339 timestamp fields of `value`, when both parse and are ordered.
pub fn seconds_between(value: &Value, from: &str, to: &str) -> Option<f64> {
    let start = parse_rfc3339(value.get(from)?.as_str()?)?;
    let end = parse_rfc3339(value.get(to)?.as_str()?)?;
    (end >= start).then_some(end - start)
}

/// A duration for people: "850ms", "12.3s", "2m 05s", "1h 02m".
pub fn duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return MISSING.to_owned();
    }
    if seconds < 1.0 {
        return format!("{}ms", (seconds * 1000.0).round() as u64);
    }
    if seconds < 60.0 {
        return format!("{seconds:.1}s");
    }
    let whole = seconds.round() as u64;
    if whole < 3600 {
        format!("{}m {:02}s", whole / 60, whole % 60)
    } else {
        format!("{}h {:02}m", whole / 3600, (whole % 3600) / 60)
    }
}

/// A byte count for people, in powers of 1024.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut scaled = bytes as f64;
    let mut unit = 0;
    while scaled >= 1024.0 && unit + 1 < UNITS.len() {
        scaled /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{scaled:.1} {}", UNITS[unit])
    }
}

/// A timestamp for a table: "2025-01-31 14:02:07" from RFC 3339, the raw text if it does not
/// look like one, "-" when missing.
pub fn timestamp(value: &Value, key: &str) -> String {
    let Some(raw) = value.get(key).and_then(Value::as_str) else {
        return MISSING.to_owned();
    };
    match (raw.get(..10), raw.get(11..19)) {
        (Some(date), Some(time)) if parse_rfc3339(raw).is_some() => format!("{date} {time}"),
        _ => raw.to_owned(),
    }
}

/// Seconds since the Unix epoch for an RFC 3339 timestamp such as `2025-01-31T14:02:07.5Z`
/// or `...+02:00`; `None` for anything else.
pub fn parse_rfc3339(s: &str) -> Option<f64> {
    let at = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339);
    at.ok().map(|at| at.unix_timestamp_nanos() as f64 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_rfc3339_with_fractions_and_offsets() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(parse_rfc3339("2000-03-01T00:00:00Z"), Some(951_868_800.0));
        assert_eq!(parse_rfc3339("1970-01-01T01:00:00+01:00"), Some(0.0));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:01.25Z"), Some(1.25));
        for bad in [
            "",
            "yesterday",
            "2025-13-01T00:00:00Z",
            "2025-01-01T00:00:00",
            "2025-01-01",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn odd_json_reads_as_missing() {
        let v = json!({"a": null, "b": [1], "c": {"x": 1}, "n": "12", "e": {"message": "boom"}});
        assert_eq!(cell(&v, "a"), "-");
        assert_eq!(cell(&v, "b"), "-");
        assert_eq!(cell(&v, "zzz"), "-");
        assert_eq!(count(&v, "n"), Some(12));
        assert_eq!(error_message(&v, "e").as_deref(), Some("boom"));
        assert_eq!(seconds_between(&v, "a", "b"), None);
        assert_eq!(joined(&json!("not an object"), "x"), "-");
    }

    #[test]
    fn formats_durations_and_sizes() {
        assert_eq!(duration(0.25), "250ms");
        assert_eq!(duration(12.34), "12.3s");
        assert_eq!(duration(125.0), "2m 05s");
        assert_eq!(duration(3720.0), "1h 02m");
        assert_eq!(size(512), "512 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(truncate("abcdef", 4), "abc…");
    }
}
