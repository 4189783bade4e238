//! Fault injection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use resilience::circuit_breaker::{classify_error, Outcome};
use resilience::fault::{FaultConfig, FaultHandle, FaultLayer, InjectedFault, InvalidFaultConfig};
type Svc = BoxCloneService<Request<Bytes>, Response<Bytes>, BoxError>;

use tower::util::BoxCloneService;
use tower::{BoxError, Layer, Service, ServiceExt};

fn counting() -> (Svc, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let svc = tower::service_fn(move |_: Request<Bytes>| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, BoxError>(Response::new(Bytes::from_static(b"peer"))) }
    });
    (BoxCloneService::new(svc), calls)
}

fn only(f: impl FnOnce(&mut FaultConfig)) -> FaultConfig {
    let mut c = FaultConfig::default();
    f(&mut c);
    c
}

#[test]
fn same_seed_same_decisions() {
    let seed: u64 = rand::random();
    println!("seed = {seed}");
    let cfg = FaultConfig {
        drop_request: 0.3,
        drop_response: 0.3,
        error_503: 0.3,
        latency_rate: 0.3,
        latency: Duration::from_millis(5),
    };
    let a = FaultHandle::new(cfg, seed).unwrap();
    let b = FaultHandle::new(cfg, seed).unwrap();
    let c = FaultHandle::new(cfg, seed ^ 1).unwrap();
    let da: Vec<_> = (0..200).map(|_| a.next_decision()).collect();
    let db: Vec<_> = (0..200).map(|_| b.next_decision()).collect();
    let dc: Vec<_> = (0..200).map(|_| c.next_decision()).collect();
    assert_eq!(da, db, "seed {seed}");
    assert_ne!(da, dc, "seed {seed}");
    let drops = da.iter().filter(|d| d.drop_request).count();
    assert!(
        (30..=90).contains(&drops),
        "seed {seed}: {drops} drops of 200 at 0.3"
    );
}

#[tokio::test]
async fn off_by_default_passes_through() {
    let (inner, calls) = counting();
    let layer = FaultLayer::new(FaultConfig::default(), 1).unwrap();
    let mut svc = layer.layer(inner);
    for _ in 0..10 {
        let r = svc
            .ready()
            .await
            .unwrap()
            .call(Request::new(Bytes::new()))
            .await
            .unwrap();
        assert_eq!(r.body(), "peer");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 10);
    let s = layer.handle().snapshot();
    assert_eq!(
        (s.requests, s.dropped, s.lost, s.synthetic_503, s.delayed),
        (10, 0, 0, 0, 0)
    );
}

#[tokio::test]
async fn drop_request_never_reaches_peer() {
    let (inner, calls) = counting();
    let layer = FaultLayer::new(only(|c| c.drop_request = 1.0), 1).unwrap();
    let mut svc = layer.layer(inner);
    let e = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(Bytes::new()))
        .await
        .unwrap_err();
    assert_eq!(
        e.downcast_ref::<InjectedFault>(),
        Some(&InjectedFault::RequestDropped)
    );
    assert_eq!(classify_error(&*e), Outcome::Failure);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(layer.handle().snapshot().dropped, 1);
}

#[tokio::test]
async fn drop_response_calls_peer_once_then_errors() {
    let (inner, calls) = counting();
    let layer = FaultLayer::new(only(|c| c.drop_response = 1.0), 1).unwrap();
    let mut svc = layer.layer(inner);
    let e = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(Bytes::new()))
        .await
        .unwrap_err();
    assert_eq!(
        e.downcast_ref::<InjectedFault>(),
        Some(&InjectedFault::ResponseLost)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(layer.handle().snapshot().lost, 1);
}

#[tokio::test]
async fn error_503_is_synthesized() {
    let (inner, calls) = counting();
    let layer = FaultLayer::new(only(|c| c.error_503 = 1.0), 1).unwrap();
    let mut svc = layer.layer(inner);
    let r = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(Bytes::new()))
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn latency_delays_the_call_and_rates_change_at_run_time() {
    let (inner, calls) = counting();
    let layer = FaultLayer::new(
        only(|c| {
            c.latency_rate = 1.0;
            c.latency = Duration::from_secs(2);
        }),
        1,
    )
    .unwrap();
    let handle = layer.handle().clone();
    let mut svc = layer.layer(inner);
    let t0 = tokio::time::Instant::now();
    svc.ready()
        .await
        .unwrap()
        .call(Request::new(Bytes::new()))
        .await
        .unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(2));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    handle.disable();
    let t0 = tokio::time::Instant::now();
    svc.ready()
        .await
        .unwrap()
        .call(Request::new(Bytes::new()))
        .await
        .unwrap();
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(handle.snapshot().delayed, 1);
}

#[test]
fn rates_are_validated() {
    assert!(only(|c| c.drop_request = 1.5).validate().is_err());
    assert!(only(|c| c.error_503 = -0.1).validate().is_err());
    let e = only(|c| c.latency_rate = f64::NAN).validate().unwrap_err();
    assert!(matches!(
        e,
        InvalidFaultConfig::Rate {
            field: "latency_rate",
            ..
        }
    ));
    assert!(e.to_string().starts_with("invalid fault config"));
    // A minute of latency is the most; one millisecond more is refused.
    let minute = Duration::from_secs(60);
    assert!(only(|c| c.latency = minute).validate().is_ok());
    let e = only(|c| c.latency = minute + Duration::from_millis(1))
        .validate()
        .unwrap_err();
    assert!(
        matches!(e, InvalidFaultConfig::Latency { ms: 60_001, .. }),
        "{e}"
    );
    let h = FaultHandle::new(FaultConfig::default(), 0).unwrap();
    assert!(h.set(only(|c| c.drop_response = 2.0)).is_err());
    assert_eq!(
        h.get(),
        FaultConfig::default(),
        "rejected config not applied"
    );
    assert!(FaultHandle::new(only(|c| c.drop_request = 7.0), 0).is_err());
}

#[test]
fn config_round_trips_through_json() {
    let c = FaultConfig {
        drop_request: 0.1,
        drop_response: 0.2,
        error_503: 0.0,
        latency_rate: 0.5,
        latency: Duration::from_millis(250),
    };
    let json = serde_json::to_string(&c).unwrap();
    assert!(json.contains("\"latency\":250"), "{json}");
    assert_eq!(serde_json::from_str::<FaultConfig>(&json).unwrap(), c);
    let partial: FaultConfig = serde_json::from_str(r#"{"error_503":0.5}"#).unwrap();
    assert_eq!(partial.error_503, 0.5);
    assert_eq!(partial.drop_request, 0.0);
}
