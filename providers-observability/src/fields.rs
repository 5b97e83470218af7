//! Span fields as JSON, appended to rather than rewritten.
//!
//! `tracing-subscriber`'s `JsonFields` parses a span's stored fields and writes them all
//! again on every `Span::record`; the host's spans record five or six fields after they open
//! (tenant, status, outcome, duration...), which made that the largest cost of a logged
//! request. These fields are written once each: a recorded field is appended to the stored
//! object. A field recorded twice appears twice, and the last one wins when it is read.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

/// The JSON field formatter of the log layer.
#[derive(Debug, Default)]
pub struct AppendJson;

/// `"name":value` pairs, comma separated, without the braces; always UTF-8.
#[derive(Default)]
struct Pairs(Vec<u8>);

impl Pairs {
    fn key(&mut self, field: &Field) {
        if !self.0.is_empty() {
            self.0.push(b',');
        }
        quote(&mut self.0, field.name());
        self.0.push(b':');
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

fn quote(out: &mut Vec<u8>, s: &str) {
    // serde_json escapes quotes, control characters and the rest exactly as JSON wants,
    // straight into the buffer.
    let _ = serde_json::to_writer(out, s);
}

impl Visit for Pairs {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.key(field);
        quote(&mut self.0, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        let _ = std::io::Write::write_fmt(&mut self.0, format_args!("{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        let _ = std::io::Write::write_fmt(&mut self.0, format_args!("{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        let _ = std::io::Write::write_fmt(&mut self.0, format_args!("{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        // JSON has no NaN or infinity.
        if value.is_finite() {
            let _ = std::io::Write::write_fmt(&mut self.0, format_args!("{value}"));
        } else {
            quote(&mut self.0, &value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.key(field);
        quote(&mut self.0, &format!("{value:?}"));
    }
}

impl<'writer> FormatFields<'writer> for AppendJson {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut pairs = Pairs::default();
        fields.record(&mut pairs);
        write!(writer, "{{{}}}", pairs.as_str())
    }

    fn add_fields(
        &self,
        current: &'writer mut tracing_subscriber::fmt::FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut pairs = Pairs::default();
        fields.record(&mut pairs);
        if pairs.0.is_empty() {
            return Ok(());
        }
        let stored = &mut current.fields;
        match stored.strip_suffix('}') {
            Some(open) if open.len() > 1 => {
                stored.pop();
                stored.push(',');
            }
            _ => {
                stored.clear();
                stored.push('{');
            }
        }
        stored.push_str(pairs.as_str());
        stored.push('}');
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn recorded_fields_are_appended_as_valid_json_whatever_they_hold() {
        let buffer = Buffer::default();
        let out = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .fmt_fields(AppendJson)
            .with_writer(move || out.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "request",
                id = "a\"b\n\u{1}",
                n = 7u64,
                empty = tracing::field::Empty,
                x = tracing::field::Empty,
                d = tracing::field::Empty,
            );
            span.record("x", f64::NAN);
            span.record("d", tracing::field::debug("q\""));
            span.record("n", -3i64);
            span.in_scope(|| tracing::info!(ok = true, "inside"));
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(
            line["span"],
            serde_json::json!({"name": "request", "id": "a\"b\n\u{1}", "n": -3, "x": "NaN", "d": "\"q\\\"\""}),
            "{text}"
        );
        assert_eq!(line["spans"][0], line["span"]);
        assert_eq!(line["fields"]["ok"], true);
    }
}
