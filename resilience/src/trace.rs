//! W3C Trace Context (`traceparent`, `tracestate`): strict parsing and
//! formatting, no dependencies.
//!
//! The delivery machinery only reads it: the relay and the feed consumer put
//! the `trace_id` of the message they work on into a span, so every log line
//! of that work carries it. Making ids (and the request middleware) is the
//! application's job.

/// The `traceparent` header name.
pub const TRACEPARENT: &str = "traceparent";
/// The `tracestate` header name.
pub const TRACESTATE: &str = "tracestate";

/// A parsed `traceparent` (always written back as version `00`), with the
/// `tracestate` that travels with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    /// 32 lower-case hex digits, not all zero.
    pub trace_id: String,
    /// The parent (span) id: 16 lower-case hex digits, not all zero.
    pub parent_id: String,
    /// The trace flags (bit 0: sampled).
    pub flags: u8,
    /// The vendors' `tracestate`, passed on unchanged when it is well formed.
    pub tracestate: Option<String>,
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl TraceParent {
    /// Parses a `traceparent` value per the W3C spec: `00-<32 hex>-<16 hex>-<2 hex>`
    /// (lower case; ids not all zero; version `ff` invalid; a later version
    /// is read by its first four fields). `None` when it is not valid: the
    /// caller then starts a new trace. `tracestate` is kept only if it is a
    /// plausible header value (visible ASCII, at most 512 characters).
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let tp = traceparent.trim_matches(|c| c == ' ' || c == '\t');
        if tp.len() < 55 || !tp.is_ascii() {
            return None;
        }
        let version = &tp[0..2];
        if !is_lower_hex(version) || version == "ff" {
            return None;
        }
        if version == "00" && tp.len() != 55 {
            return None;
        }
        if tp.len() > 55 && tp.as_bytes()[55] != b'-' {
            return None;
        }
        let b = tp.as_bytes();
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let (trace_id, parent_id, flags) = (&tp[3..35], &tp[36..52], &tp[53..55]);
        if !is_lower_hex(trace_id) || !is_lower_hex(parent_id) || !is_lower_hex(flags) {
            return None;
        }
        if trace_id.bytes().all(|c| c == b'0') || parent_id.bytes().all(|c| c == b'0') {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        let tracestate = tracestate
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.len() <= 512)
            .filter(|s| s.bytes().all(|c| (0x20..0x7f).contains(&c)))
            .map(str::to_owned);
        Some(Self {
            trace_id: trace_id.to_owned(),
            parent_id: parent_id.to_owned(),
            flags,
            tracestate,
        })
    }

    /// The `traceparent` header value (version `00`).
    pub fn header(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id, self.parent_id, self.flags)
    }
}

/// The trace id of a `traceparent` value, if it is a valid one.
pub fn trace_id_of(traceparent: &str) -> Option<String> {
    TraceParent::parse(traceparent, None).map(|t| t.trace_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_formats_the_spec_example() {
        let t = TraceParent::parse(OK, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent_id, "00f067aa0ba902b7");
        assert_eq!(t.flags, 1);
        assert_eq!(t.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        assert_eq!(t.header(), OK);
    }

    #[test]
    fn refuses_what_the_spec_refuses() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(TraceParent::parse(bad, None).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_by_its_first_fields() {
        let v = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever";
        let t = TraceParent::parse(v, None).unwrap();
        assert_eq!(t.header(), OK);
        assert!(TraceParent::parse(&format!("{OK}x"), None).is_none());
    }

    #[test]
    fn a_bad_tracestate_is_dropped() {
        let t = TraceParent::parse(OK, Some("a=\u{1}")).unwrap();
        assert_eq!(t.tracestate, None);
        assert_eq!(
            trace_id_of(OK).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }
}
