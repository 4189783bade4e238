//! W3C trace context through the services: the request middleware that
//! continues (or starts) a trace and opens the request's span, and the
//! context that travels with what a request leaves behind (an outbox
//! message's `traceparent` header, a feed event's `traceparent` field, a
//! shipment's stored context).
//!
//! Parsing is [`resilience::trace::TraceParent`] (strict, per the spec); an
//! invalid incoming header starts a new trace, never an error.

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use http::HeaderMap;
pub use resilience::trace::{TraceParent, TRACEPARENT, TRACESTATE};
use tracing::Instrument;
use uuid::Uuid;

/// The trace context of a unit of work: its trace, and the id of the span
/// doing the work (the parent of whatever it sends on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext(pub TraceParent);

fn random_span_id() -> String {
    loop {
        let bytes = Uuid::new_v4().into_bytes();
        let id = hex8(&bytes[..8]);
        if id.bytes().any(|b| b != b'0') {
            return id;
        }
    }
}

fn hex8(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl TraceContext {
    /// A new trace (sampled), with a new span.
    pub fn new_root() -> Self {
        // A v4 UUID has its version bits set, so it is never all zero.
        let trace_id = hex8(&Uuid::new_v4().into_bytes());
        TraceContext(TraceParent {
            trace_id,
            parent_id: random_span_id(),
            flags: 1,
            tracestate: None,
        })
    }

    /// A new span in the same trace (same flags and `tracestate`).
    pub fn child(&self) -> Self {
        let mut tp = self.0.clone();
        tp.parent_id = random_span_id();
        TraceContext(tp)
    }

    /// The context as stored or sent: a `traceparent` (and `tracestate`).
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        TraceParent::parse(traceparent, tracestate).map(TraceContext)
    }

    /// The caller's context from request headers, if valid.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let tp = headers.get(TRACEPARENT)?.to_str().ok()?;
        let ts = headers.get(TRACESTATE).and_then(|v| v.to_str().ok());
        Self::parse(tp, ts)
    }

    /// The span of work continuing the caller's trace, or of a new one.
    pub fn continue_or_start(headers: &HeaderMap) -> Self {
        match Self::from_headers(headers) {
            Some(caller) => caller.child(),
            None => Self::new_root(),
        }
    }

    /// The trace id (32 hex digits).
    pub fn trace_id(&self) -> &str {
        &self.0.trace_id
    }

    /// The `traceparent` value naming this span as the parent.
    pub fn traceparent(&self) -> String {
        self.0.header()
    }

    /// The `tracestate`, if any.
    pub fn tracestate(&self) -> Option<&str> {
        self.0.tracestate.as_deref()
    }

    /// The headers to send on (`traceparent`, and `tracestate` if any).
    pub fn headers(&self) -> Vec<(String, String)> {
        let mut h = vec![(TRACEPARENT.to_owned(), self.traceparent())];
        if let Some(ts) = self.tracestate() {
            h.push((TRACESTATE.to_owned(), ts.to_owned()));
        }
        h
    }
}

/// Middleware: continues the caller's W3C trace (or starts one), puts the
/// [`TraceContext`] of this request's span into the request's extensions,
/// and runs the rest of the request inside a `request` span with `trace_id`
/// and the route template, so every log line of the request carries them.
///
/// Sits inside [`crate::detach`] (added before it), so the span covers the
/// task the request runs in.
pub async fn middleware(mut req: Request, next: Next) -> Response {
    let caller = TraceContext::from_headers(req.headers());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let span = tracing::info_span!(
        "request",
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
        method = %req.method(),
        route = %route,
    );
    let ctx = in_trace(&span, caller.as_ref());
    span.record("trace_id", ctx.trace_id());
    span.record("span_id", ctx.0.parent_id.as_str());
    req.extensions_mut().insert(ctx);
    next.run(req).instrument(span).await
}

/// Puts `span` in the trace of `parent` (a new trace when `None`) and
/// returns the context naming `span` as the parent of what it sends on.
///
/// With OTLP export on, the exported span is made a child of `parent` and
/// its ids are the ones returned, so the exported trace and the propagated
/// one are the same; otherwise the ids are made here.
pub fn in_trace(span: &tracing::Span, parent: Option<&TraceContext>) -> TraceContext {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    let mut ctx = match parent {
        Some(p) => p.child(),
        None => TraceContext::new_root(),
    };
    if let Some(p) = parent {
        let remote = SpanContext::new(
            TraceId::from_hex(&p.0.trace_id).unwrap_or(TraceId::INVALID),
            SpanId::from_hex(&p.0.parent_id).unwrap_or(SpanId::INVALID),
            TraceFlags::new(p.0.flags),
            true,
            p.tracestate()
                .and_then(|s| s.parse::<TraceState>().ok())
                .unwrap_or_default(),
        );
        // Fails (harmlessly) when no OpenTelemetry layer is installed.
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
    let otel = span.context();
    let exported = otel.span().span_context().clone();
    if exported.is_valid() {
        ctx.0.trace_id = exported.trace_id().to_string();
        ctx.0.parent_id = exported.span_id().to_string();
    }
    ctx
}

/// The request's trace context (set by [`middleware`]); a new trace when
/// the middleware is not in the stack.
#[derive(Debug, Clone)]
pub struct CurrentTrace(pub TraceContext);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for CurrentTrace {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(CurrentTrace(
            parts
                .extensions
                .get::<TraceContext>()
                .cloned()
                .unwrap_or_else(|| TraceContext::continue_or_start(&parts.headers)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_a_valid_caller_and_restarts_on_garbage() {
        let mut h = HeaderMap::new();
        h.insert(
            TRACEPARENT,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        h.insert(TRACESTATE, "congo=t61rcWkgMzE".parse().unwrap());
        let c = TraceContext::continue_or_start(&h);
        assert_eq!(c.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(c.0.parent_id, "00f067aa0ba902b7");
        assert_eq!(c.tracestate(), Some("congo=t61rcWkgMzE"));
        assert!(TraceContext::parse(&c.traceparent(), None).is_some());

        h.insert(TRACEPARENT, "00-nonsense".parse().unwrap());
        let n = TraceContext::continue_or_start(&h);
        assert_ne!(n.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(n.trace_id().len(), 32);
        assert_eq!(n.tracestate(), None);
        assert!(TraceContext::parse(&n.traceparent(), None).is_some());
    }
}
