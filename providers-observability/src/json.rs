//! JSON log lines, written by a layer of their own.
//!
//! `tracing-subscriber`'s JSON formatter stores each span's fields as a JSON string, and for
//! every line parses the stored string of every span around it back into a
//! `serde_json::Value` to write it again; its field formatter rewrites a span's whole object
//! on every `Span::record`. That made a logged request cost several times the request itself.
//! Here each span keeps its `"name":value` pairs as bytes, a recorded field is appended once,
//! and a line is built by copying those bytes into a per-thread buffer: no parsing, no
//! allocation per line once the buffer has grown.
//!
//! A line is one object: `timestamp` (RFC 3339, microseconds, UTC), `level`, `target`, the
//! event's own fields (`message` among them) and, inside spans, `span` (the innermost, with
//! its `name`) and `spans` (all of them, outermost first). A field recorded twice on a span
//! appears twice; the last one wins when it is read.

use std::cell::RefCell;
use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use crate::writer::Batched;

/// The JSON line layer.
pub(crate) struct JsonLines {
    out: Batched,
}

impl JsonLines {
    pub(crate) fn new(out: Batched) -> Self {
        Self { out }
    }
}

/// A span's fields: `"name":value` pairs, comma separated, without braces; always UTF-8.
#[derive(Default)]
pub(crate) struct Pairs(pub(crate) Vec<u8>);

impl Pairs {
    fn key(&mut self, field: &Field) {
        if !self.0.is_empty() {
            self.0.push(b',');
        }
        quote(&mut self.0, field.name());
        self.0.push(b':');
    }
}

/// Writes `s` as a JSON string: quotes, backslashes and control characters escaped.
fn quote(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    escape(out, s);
    out.push(b'"');
}

/// Which bytes need escaping in a JSON string: control characters, DEL, `"` and `\`.
static ESCAPED: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[0x7f] = true;
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

fn escape(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    // Most strings need no escaping: one table scan, one copy.
    if !bytes.iter().any(|&b| ESCAPED[usize::from(b)]) {
        out.extend_from_slice(bytes);
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !ESCAPED[usize::from(b)] {
            continue;
        }
        let escaped: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f | 0x7f => {
                out.extend_from_slice(&bytes[start..i]);
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escaped);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// Escapes what a `Debug` or `Display` value writes, as it writes it.
struct Escaping<'a>(&'a mut Vec<u8>);

impl fmt::Write for Escaping<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        escape(self.0, s);
        Ok(())
    }
}

impl Visit for Pairs {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.key(field);
        quote(&mut self.0, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        self.0
            .extend_from_slice(if value { b"true" } else { b"false" });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        self.0
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        self.0
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        // JSON has no NaN or infinity: those are written as strings.
        if value.is_finite() {
            let _ = write!(Escaping(&mut self.0), "{value}");
        } else {
            self.0.push(b'"');
            let _ = write!(Escaping(&mut self.0), "{value}");
            self.0.push(b'"');
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.key(field);
        self.0.push(b'"');
        let _ = write!(Escaping(&mut self.0), "{value:?}");
        self.0.push(b'"');
    }
}

/// Appends `at` as RFC 3339 in UTC with microseconds (`2026-12-04T05:41:30.123456Z`). The
/// date and time up to the second are written once a second per thread, not once a line.
fn timestamp(line: &mut Vec<u8>, at: std::time::SystemTime) {
    let since = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let (secs, micros) = (since.as_secs(), since.subsec_micros());
    SECOND.with(|cell| {
        let mut second = cell.borrow_mut();
        if second.0 != secs || second.1.is_empty() {
            let whole = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            second.0 = secs;
            second.1.clear();
            // `2026-12-04T05:41:30Z` without its `Z`.
            let _ = write!(second.1, "{}", humantime::format_rfc3339_seconds(whole));
            second.1.pop();
        }
        line.extend_from_slice(second.1.as_bytes());
    });
    let mut digits = *b".000000Z";
    let mut rest = micros;
    for d in digits[1..7].iter_mut().rev() {
        *d = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    line.extend_from_slice(&digits);
}

thread_local! {
    /// The second last written by [`timestamp`] on this thread, and its text.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    /// Where a line is put together before it is copied out whole.
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
}

/// `{"name":"<span name>",<pairs>}`.
fn span_object(line: &mut Vec<u8>, name: &str, pairs: Option<&Pairs>) {
    line.extend_from_slice(b"{\"name\":");
    quote(line, name);
    if let Some(pairs) = pairs.filter(|p| !p.0.is_empty()) {
        line.push(b',');
        line.extend_from_slice(&pairs.0);
    }
    line.push(b'}');
}

impl<S> tracing_subscriber::Layer<S> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut pairs = Pairs(Vec::with_capacity(128));
        attrs.record(&mut pairs);
        span.extensions_mut().insert(pairs);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(pairs) = extensions.get_mut::<Pairs>() {
            values.record(pairs);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let write = |line: &mut Vec<u8>| {
            line.clear();
            let meta = event.metadata();
            line.extend_from_slice(b"{\"timestamp\":\"");
            timestamp(line, std::time::SystemTime::now());
            line.extend_from_slice(b"\",\"level\":\"");
            line.extend_from_slice(meta.level().as_str().as_bytes());
            line.extend_from_slice(b"\",\"target\":");
            quote(line, meta.target());
            // The event's pairs follow `target`, each after a comma.
            let mut fields = Pairs(std::mem::take(line));
            event.record(&mut fields);
            *line = fields.0;
            if let Some(scope) = ctx.event_scope(event) {
                // `spans` outermost first, then `span`: the innermost again, copied.
                line.extend_from_slice(b",\"spans\":[");
                let mut innermost = 0..0;
                for (i, span) in scope.from_root().enumerate() {
                    if i > 0 {
                        line.push(b',');
                    }
                    let start = line.len();
                    span_object(line, span.name(), span.extensions().get::<Pairs>());
                    innermost = start..line.len();
                }
                line.extend_from_slice(b"],\"span\":");
                line.extend_from_within(innermost);
            }
            line.extend_from_slice(b"}\n");
            self.out.push(line);
        };
        // A line logged while a line is being written (from a `Debug` impl) gets a buffer of
        // its own.
        LINE.with(|cell| match cell.try_borrow_mut() {
            Ok(mut line) => write(&mut line),
            Err(_) => write(&mut Vec::new()),
        });
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    fn lines(run: impl FnOnce()) -> Vec<serde_json::Value> {
        let (out, flusher) = crate::writer::memory();
        let subscriber = tracing_subscriber::registry().with(JsonLines::new(out.clone()));
        tracing::subscriber::with_default(subscriber, run);
        drop(flusher);
        String::from_utf8(out.taken())
            .expect("UTF-8")
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    #[test]
    fn lines_are_valid_json_whatever_their_fields_hold() {
        let nasty = "a\"b\\c\n\r\t\u{1}\u{7f}é\u{2028}";
        let got = lines(|| {
            let outer = tracing::info_span!(
                "request",
                id = nasty,
                n = 7u64,
                empty = tracing::field::Empty,
                x = tracing::field::Empty,
                d = tracing::field::Empty,
            );
            outer.record("x", f64::NAN);
            outer.record("d", tracing::field::debug("q\""));
            outer.record("n", -3i64);
            let inner = outer.in_scope(|| tracing::info_span!("call", service = "kv", ok = true));
            inner.in_scope(|| tracing::warn!(who = %nasty, f = 1.5, "inside {}", nasty));
            tracing::info!("outside");
        });
        assert_eq!(got.len(), 2, "{got:?}");
        let line = &got[0];
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["target"], module_path!());
        assert_eq!(line["message"], format!("inside {nasty}"));
        assert_eq!(line["who"], nasty);
        assert_eq!(line["f"], 1.5);
        let request = serde_json::json!({"name": "request", "id": nasty, "n": -3, "x": "NaN", "d": "\"q\\\"\""});
        let call = serde_json::json!({"name": "call", "service": "kv", "ok": true});
        assert_eq!(line["span"], call);
        assert_eq!(line["spans"], serde_json::json!([request, call]));
        let stamp = line["timestamp"].as_str().expect("a timestamp");
        assert!(humantime::parse_rfc3339(stamp).is_ok(), "{stamp}");
        assert_eq!(stamp.len(), "2026-12-04T05:41:30.123456Z".len(), "{stamp}");
        assert_eq!(got[1]["message"], "outside");
        assert!(got[1].get("span").is_none() && got[1].get("spans").is_none());
    }

    #[test]
    fn timestamps_match_humantime_across_seconds() {
        let base = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_000_000);
        for offset_us in [
            0u64,
            1,
            999_999,
            1_000_000,
            1_000_001,
            59_999_999,
            86_400_000_123,
        ] {
            let at = base + std::time::Duration::from_micros(offset_us);
            let mut line = Vec::new();
            timestamp(&mut line, at);
            assert_eq!(
                String::from_utf8(line).expect("UTF-8"),
                humantime::format_rfc3339_micros(at).to_string(),
                "{offset_us}"
            );
        }
    }

    #[test]
    fn a_line_without_a_message_or_spans_is_an_object_too() {
        let got = lines(|| {
            let empty = tracing::info_span!("empty");
            empty.in_scope(|| tracing::error!(a = 1));
        });
        assert_eq!(got.len(), 1);
        assert_eq!(
            (&got[0]["level"], &got[0]["a"]),
            (&serde_json::json!("ERROR"), &serde_json::json!(1))
        );
        assert!(got[0].get("message").is_none());
        assert_eq!(got[0]["spans"], serde_json::json!([{"name": "empty"}]));
    }
}
