//! Prometheus metrics: the recorder, the HTTP middleware, and the
//! `GET /metrics` answer (served by [`admin`](crate::admin), behind its token).
//!
//! Two kinds of series make up a scrape:
//!
//! - **Events**, counted where they happen through the `metrics` facade and
//!   kept by the process-wide recorder that [`install`] sets up: HTTP
//!   requests ([`track_http`]), breaker transitions (the breakers'
//!   state-change listener, see [`crate::stack::default_breaker`]), relay
//!   attempts and delivery latency, idempotency replays and refusals (in
//!   `resilience`, behind its `metrics` feature).
//! - **State**, sampled at scrape time from what the service already keeps:
//!   the outbox counts (one query), the breakers' snapshots, the database
//!   pool and the feed consumers' lag. These are rendered by a recorder made
//!   for the one scrape, so a process running both services (the tests) still
//!   answers each with its own state. Nothing is added to the breaker's
//!   per-call path.
//!
//! Label values are bounded: route templates (never raw paths), methods,
//! status codes, breaker destinations (at most the registry's capacity), feed
//! names and outcome words. No ids, no keys.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use resilience::circuit_breaker::{State, StateChange};

/// The `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Buckets of `http_request_duration_seconds`: 1 ms to 10 s.
const HTTP_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets of `batch_requests`: powers of two up to the route's limit.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Buckets of `outbox_delivery_seconds` (commit to 2xx): 5 ms to an hour,
/// since a delivery may wait out an outage.
const DELIVERY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// How often histogram data is folded in between scrapes.
const UPKEEP: Duration = Duration::from_secs(5);

/// The breaker states, in the order of the `circuit_breaker_state` series.
const STATES: [State; 6] = [
    State::Closed,
    State::Open,
    State::HalfOpen,
    State::ForcedOpen,
    State::Disabled,
    State::MetricsOnly,
];

/// The transitions a breaker makes on its own, counted from zero so that
/// `rate()` and `increase()` work before the first one happens.
const AUTOMATIC: [(State, State); 4] = [
    (State::Closed, State::Open),
    (State::Open, State::HalfOpen),
    (State::HalfOpen, State::Closed),
    (State::HalfOpen, State::Open),
];

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls return
/// the same handle). `None` if another recorder was installed first: the
/// scrape then carries the sampled state only.
pub fn install() -> Option<&'static PrometheusHandle> {
    RECORDER
        .get_or_init(|| match builder().and_then(PrometheusBuilder::install_recorder) {
            Ok(handle) => {
                describe();
                let upkeep = handle.clone();
                // A thread, not a task: it must outlive whichever runtime
                // happened to install the recorder (each test has its own).
                let spawned = std::thread::Builder::new()
                    .name("metrics-upkeep".into())
                    .spawn(move || loop {
                        std::thread::sleep(UPKEEP);
                        upkeep.run_upkeep();
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "no metrics upkeep thread; scrapes do the upkeep");
                }
                Some(handle)
            }
            Err(e) => {
                tracing::warn!(error = %e, "the Prometheus recorder is not installed");
                None
            }
        })
        .as_ref()
}

fn builder() -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    PrometheusBuilder::new()
        .set_buckets(HTTP_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full("http_request_duration_seconds".into()),
            HTTP_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("outbox_delivery_seconds".into()),
            DELIVERY_BUCKETS,
        )?
        .set_buckets_for_metric(Matcher::Full("batch_requests".into()), BATCH_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("coalesced_requests".into()), BATCH_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full("group_commit_wait_seconds".into()),
            HTTP_BUCKETS,
        )
}

/// HELP lines of the event series.
fn describe() {
    describe_counter!(
        "http_requests_total",
        "HTTP requests answered, by route template, method and status"
    );
    describe_histogram!(
        "http_request_duration_seconds",
        Unit::Seconds,
        "Time to answer an HTTP request, by route template and method"
    );
    describe_counter!(
        "circuit_breaker_transitions_total",
        "Circuit breaker state changes, by destination (host:port)"
    );
    describe_counter!(
        "outbox_delivery_attempts_total",
        "Outbox sends made by the relay, by outcome (delivered, retry, dead)"
    );
    describe_counter!(
        "outbox_relay_gave_way_total",
        "Claims the relay put off while POST /orders was busy (RELAY_GIVE_WAY_*)"
    );
    describe_histogram!(
        "outbox_delivery_seconds",
        Unit::Seconds,
        "Time from the commit that enqueued a message to its 2xx"
    );
    describe_histogram!(
        "coalesced_requests",
        "Requests written in one group by group commit (two or more; requests alone are not counted)"
    );
    describe_histogram!(
        "group_commit_wait_seconds",
        "Time a POST /orders waited in the group-commit queue before its group started (not part of http_request_duration_seconds)"
    );
    describe_counter!(
        "group_commit_shed_total",
        "Requests dropped from the group-commit queue before they ran: client_gone (nothing answered), waited_too_long (answered 503)"
    );
    describe_histogram!(
        "batch_requests",
        "Requests per received POST /batch, by outcome (committed together, or one_by_one after a refusal)"
    );
    describe_counter!(
        "idempotency_replays_total",
        "Requests answered with the stored response of an earlier one with the same Idempotency-Key"
    );
    describe_counter!(
        "idempotency_conflicts_total",
        "Requests refused with 409 because one with the same Idempotency-Key was in flight"
    );
    describe_counter!(
        "idempotency_mismatches_total",
        "Requests refused with 422 because their Idempotency-Key was used for a different request"
    );
    // Counted from zero, so that `rate()` works before the first event.
    for name in [
        "idempotency_replays_total",
        "idempotency_conflicts_total",
        "idempotency_mismatches_total",
        "outbox_relay_gave_way_total",
    ] {
        counter!(name).increment(0);
    }
    for outcome in ["delivered", "retry", "dead"] {
        counter!("outbox_delivery_attempts_total", "outcome" => outcome).increment(0);
    }
}

/// The label value of a breaker state (as `/admin/breakers` spells it).
fn state_label(s: State) -> &'static str {
    match s {
        State::Closed => "closed",
        State::Open => "open",
        State::HalfOpen => "half-open",
        State::ForcedOpen => "forced-open",
        State::Disabled => "disabled",
        State::MetricsOnly => "metrics-only",
    }
}

/// The breakers' state-change listener: counts the transition. Runs on
/// transitions only, never on a call the breaker merely admits.
pub fn count_transition(change: &StateChange) {
    counter!(
        "circuit_breaker_transitions_total",
        "destination" => change.name.to_string(),
        "from" => state_label(change.from),
        "to" => state_label(change.to),
    )
    .increment(1);
}

/// A request method as a label: the standard ones, else `other`.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "other",
    }
}

/// Middleware: counts and times every request by route template
/// (`/orders/{id}`, from axum's [`MatchedPath`]; `unmatched` for requests
/// no route took), method and status. Add it with `Router::layer` after
/// every route is in place, so each route (and the fallback) gets it.
pub async fn track_http(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(req.method());
    let start = Instant::now();
    let res = next.run(req).await;
    let elapsed = start.elapsed().as_secs_f64();
    counter!(
        "http_requests_total",
        "route" => route.clone(),
        "method" => method,
        "status" => res.status().as_u16().to_string(),
    )
    .increment(1);
    metrics::histogram!(
        "http_request_duration_seconds",
        "route" => route,
        "method" => method,
    )
    .record(elapsed);
    res
}

/// The service's state at scrape time, gathered before it is rendered.
struct Sampled {
    outbox: Option<resilience::outbox::OutboxStats>,
    breakers: Vec<(String, resilience::circuit_breaker::Snapshot)>,
    pool_size: u32,
    pool_idle: usize,
    pool_max: u32,
    feeds: Vec<resilience::feed::ConsumerStatus>,
}

/// What a scrape samples: the service's delivery machinery (the admin
/// state's parts, passed in so this module does not depend on the admin
/// router that serves it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sources<'a> {
    pub(crate) outbox: &'a resilience::outbox::Outbox,
    pub(crate) breakers: &'a resilience::circuit_breaker::BreakerRegistry,
    pub(crate) db: &'a resilience::store::Db,
    pub(crate) feeds: &'a [resilience::feed::ConsumerHandle],
}

async fn sample(s: &Sources<'_>) -> Sampled {
    let outbox = match s.outbox.stats().await {
        Ok(stats) => Some(stats),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: cannot read the outbox counts");
            None
        }
    };
    let breakers = s
        .breakers
        .authorities()
        .into_iter()
        .filter_map(|a| s.breakers.get(&a).map(|h| (a, h.snapshot())))
        .collect();
    let pool = s.db.pool();
    Sampled {
        outbox,
        breakers,
        pool_size: pool.size(),
        pool_idle: pool.num_idle(),
        pool_max: pool.options().get_max_connections(),
        feeds: s.feeds.iter().map(|h| h.status()).collect(),
    }
}

/// Renders the sampled state through a recorder of its own.
fn render_sampled(v: &Sampled) -> String {
    let recorder = PrometheusBuilder::new().build_recorder();
    metrics::with_local_recorder(&recorder, || {
        if let Some(o) = &v.outbox {
            describe_gauge!(
                "outbox_pending_messages",
                "Outbox messages waiting to be delivered (in flight included)"
            );
            gauge!("outbox_pending_messages").set(o.pending as f64);
            describe_gauge!(
                "outbox_in_flight_messages",
                "Outbox messages claimed by a relay under a live lease"
            );
            gauge!("outbox_in_flight_messages").set(o.in_flight as f64);
            describe_gauge!(
                "outbox_dead_messages",
                "Outbox messages dead-lettered (requeue them through /admin)"
            );
            gauge!("outbox_dead_messages").set(o.dead as f64);
            describe_gauge!(
                "outbox_oldest_pending_age_seconds",
                Unit::Seconds,
                "Age of the oldest pending outbox message (0 when none)"
            );
            gauge!("outbox_oldest_pending_age_seconds")
                .set(o.oldest_pending_ms.unwrap_or(0).max(0) as f64 / 1000.0);
        }
        describe_gauge!(
            "circuit_breaker_state",
            "Circuit breaker state by destination: 1 for the current state, 0 for the others"
        );
        describe_counter!(
            "circuit_breaker_rejections_total",
            "Calls a circuit breaker refused, by destination (since its breaker was created)"
        );
        for (dest, snap) in &v.breakers {
            for st in STATES {
                gauge!(
                    "circuit_breaker_state",
                    "destination" => dest.clone(),
                    "state" => state_label(st),
                )
                .set(if snap.state == st { 1.0 } else { 0.0 });
            }
            counter!("circuit_breaker_rejections_total", "destination" => dest.clone())
                .absolute(snap.rejected);
        }
        describe_gauge!(
            "db_pool_connections_in_use",
            "Database connections checked out of the pool"
        );
        gauge!("db_pool_connections_in_use").set(f64::from(v.pool_size) - v.pool_idle as f64);
        describe_gauge!(
            "db_pool_connections_idle",
            "Database connections open and idle in the pool"
        );
        gauge!("db_pool_connections_idle").set(v.pool_idle as f64);
        describe_gauge!(
            "db_pool_connections_max",
            "Most connections the pool opens; in use at this number means callers wait"
        );
        gauge!("db_pool_connections_max").set(f64::from(v.pool_max));
        describe_gauge!(
            "feed_consumer_lag_positions",
            "Positions the feed consumer is behind the producer's head, by feed"
        );
        describe_gauge!(
            "feed_consumer_lag_seconds",
            Unit::Seconds,
            "Age of the oldest event the feed consumer has not applied, by feed (0 when caught up)"
        );
        for f in &v.feeds {
            if let Some(lag) = f.lag_positions {
                gauge!("feed_consumer_lag_positions", "feed" => f.feed.clone()).set(lag as f64);
            }
            if let Some(lag) = f.lag_seconds {
                gauge!("feed_consumer_lag_seconds", "feed" => f.feed.clone()).set(lag);
            }
        }
    });
    recorder.handle().render()
}

/// The `GET /metrics` answer: the process's event series, then this
/// service's state.
pub(crate) async fn render(s: &Sources<'_>) -> Response {
    let sampled = sample(s).await;
    let mut body = String::new();
    if let Some(handle) = install() {
        // Zero the automatic transitions of every current destination.
        for (dest, _) in &sampled.breakers {
            for (from, to) in AUTOMATIC {
                counter!(
                    "circuit_breaker_transitions_total",
                    "destination" => dest.clone(),
                    "from" => state_label(from),
                    "to" => state_label(to),
                )
                .increment(0);
            }
        }
        handle.run_upkeep();
        body = handle.render();
    }
    body.push_str(&render_sampled(&sampled));
    let mut res = body.into_response();
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    res
}

#[cfg(test)]
mod tests {
    use metrics_exporter_prometheus::PrometheusBuilder;
    use resilience::circuit_breaker::BreakerRegistry;

    #[test]
    fn breaker_transitions_are_counted_by_the_listener() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let registry = BreakerRegistry::new(crate::stack::default_breaker(), 4);
        metrics::with_local_recorder(&recorder, || {
            let b = registry.get_or_create("peer:8080");
            b.transition_to_open();
            b.transition_to_half_open();
            b.transition_to_closed();
        });
        let text = recorder.handle().render();
        for (from, to) in [
            ("closed", "open"),
            ("open", "half-open"),
            ("half-open", "closed"),
        ] {
            let line = format!(
                "circuit_breaker_transitions_total{{destination=\"peer:8080\",from=\"{from}\",to=\"{to}\"}} 1"
            );
            assert!(text.contains(&line), "{line} not in:\n{text}");
        }
    }

    #[test]
    fn methods_are_bounded() {
        let odd = axum::http::Method::from_bytes(b"BREW").unwrap_or_default();
        assert_eq!(super::method_label(&odd), "other");
        assert_eq!(super::method_label(&axum::http::Method::POST), "POST");
    }
}
