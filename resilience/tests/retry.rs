//! Retry policy: backoff, Retry-After, budget and the retry layer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use resilience::circuit_breaker::{CircuitOpen, ManualClock, State};
use resilience::retry::{
    is_idempotent, parse_retry_after, verdict, Backoff, RetryBudget, RetryLayer, RetryPolicy,
    Verdict,
};
type Svc = BoxCloneService<Request<Bytes>, Response<Bytes>, BoxError>;

use tower::util::BoxCloneService;
use tower::{BoxError, Layer, Service, ServiceExt};

const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);

#[test]
fn backoff_ceiling_grows_and_caps() {
    let b = Backoff::new(100 * MS, 2.0, 5 * S);
    assert_eq!(b.ceiling(0), 100 * MS);
    assert_eq!(b.ceiling(1), 200 * MS);
    assert_eq!(b.ceiling(5), 3200 * MS);
    assert_eq!(b.ceiling(6), 5 * S);
    assert_eq!(b.ceiling(u32::MAX), 5 * S);
}

#[test]
fn backoff_full_jitter_range() {
    let seed: u64 = rand::random();
    println!("seed = {seed}");
    let mut rng = SmallRng::seed_from_u64(seed);
    let b = Backoff::new(100 * MS, 2.0, 5 * S);
    for attempt in 0..10 {
        let ceil = b.ceiling(attempt);
        let (mut low, mut high) = (false, false);
        for _ in 0..400 {
            let d = b.delay(attempt, &mut rng);
            assert!(d <= ceil, "seed {seed}: {d:?} > {ceil:?}");
            low |= d < ceil / 4;
            high |= d > ceil * 3 / 4;
        }
        assert!(low && high, "seed {seed}: jitter must span [0, ceiling]");
    }
    assert!(b.delay_for(3) <= b.ceiling(3));
    assert_eq!(b.delay_seeded(4, 99), b.delay_seeded(4, 99));
}

#[test]
fn retry_after_parsing() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let h = |v: &str| {
        let mut m = HeaderMap::new();
        m.insert(http::header::RETRY_AFTER, HeaderValue::from_str(v).unwrap());
        m
    };
    assert_eq!(parse_retry_after(&h("120"), now), Some(120 * S));
    assert_eq!(parse_retry_after(&h(" 0 "), now), Some(Duration::ZERO));
    let date = httpdate::fmt_http_date(now + 30 * S);
    assert_eq!(parse_retry_after(&h(&date), now), Some(30 * S));
    let past = httpdate::fmt_http_date(now - 30 * S);
    assert_eq!(parse_retry_after(&h(&past), now), Some(Duration::ZERO));
    assert_eq!(parse_retry_after(&h("soon"), now), None);
    assert_eq!(parse_retry_after(&h("-5"), now), None);
    assert_eq!(parse_retry_after(&h("1.5"), now), None);
    assert_eq!(parse_retry_after(&HeaderMap::new(), now), None);
}

#[test]
fn budget_exhausts_and_decays() {
    let clock = ManualClock::new();
    let b = RetryBudget::with_clock(10 * S, 0, 0.5, clock.clone());
    assert!(!b.withdraw(), "no deposits, no reserve");
    for _ in 0..4 {
        b.deposit();
    }
    assert!(b.withdraw());
    assert!(b.withdraw());
    assert!(!b.withdraw(), "4 requests at ratio 0.5 allow 2 retries");
    for _ in 0..4 {
        b.deposit();
    }
    clock.advance(11 * S);
    assert!(!b.withdraw(), "deposits expire after ttl");

    let reserve = RetryBudget::with_clock(10 * S, 1, 0.1, clock.clone());
    let n = (0..100).take_while(|_| reserve.withdraw()).count();
    assert_eq!(n, 10, "min 1/s over 10 s");
}

fn ok_then(statuses: Vec<(u16, Option<&'static str>)>) -> (Svc, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let statuses = Arc::new(statuses);
    let svc = tower::service_fn(move |_req: Request<Bytes>| {
        let i = c.fetch_add(1, Ordering::SeqCst);
        let (code, ra) = statuses[i.min(statuses.len() - 1)];
        async move {
            let mut r = Response::new(Bytes::from_static(b"x"));
            *r.status_mut() = StatusCode::from_u16(code).unwrap();
            if let Some(v) = ra {
                r.headers_mut()
                    .insert(http::header::RETRY_AFTER, HeaderValue::from_static(v));
            }
            Ok::<_, BoxError>(r)
        }
    });
    (BoxCloneService::new(svc), calls)
}

fn policy() -> RetryPolicy {
    RetryPolicy::default()
        .max_attempts(3)
        .backoff(Backoff::new(10 * MS, 2.0, S))
        .max_delay(10 * S)
}

fn req(method: &str) -> Request<Bytes> {
    Request::builder()
        .method(method)
        .uri("http://peer/x")
        .body(Bytes::from_static(b"body"))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn get_retried_until_attempts_run_out() {
    let (inner, calls) = ok_then(vec![(503, None)]);
    let mut svc = RetryLayer::new(policy()).layer(inner);
    let r = svc.ready().await.unwrap().call(req("GET")).await.unwrap();
    assert_eq!(r.status(), 503, "last response returned");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn post_without_key_not_retried_with_key_retried() {
    assert!(!is_idempotent(&req("POST")));
    let (inner, calls) = ok_then(vec![(503, None), (200, None)]);
    let mut svc = RetryLayer::new(policy()).layer(inner);
    let r = svc.ready().await.unwrap().call(req("POST")).await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let (inner, calls) = ok_then(vec![(503, None), (200, None)]);
    let mut svc = RetryLayer::new(policy()).layer(inner);
    let mut keyed = req("POST");
    keyed
        .headers_mut()
        .insert("Idempotency-Key", HeaderValue::from_static("k-1"));
    assert!(is_idempotent(&keyed));
    let r = svc.ready().await.unwrap().call(keyed).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn non_retryable_status_not_retried() {
    let (inner, calls) = ok_then(vec![(404, None)]);
    let mut svc = RetryLayer::new(policy()).layer(inner);
    let r = svc.ready().await.unwrap().call(req("GET")).await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn retry_after_honoured_and_capped() {
    let (inner, calls) = ok_then(vec![(429, Some("5")), (200, None)]);
    let mut svc = RetryLayer::new(policy()).layer(inner);
    let t0 = tokio::time::Instant::now();
    let r = svc.ready().await.unwrap().call(req("GET")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(t0.elapsed(), 5 * S);

    let (inner, _) = ok_then(vec![(503, Some("3600")), (200, None)]);
    let mut svc = RetryLayer::new(policy().max_delay(2 * S)).layer(inner);
    let t0 = tokio::time::Instant::now();
    svc.ready().await.unwrap().call(req("GET")).await.unwrap();
    assert_eq!(t0.elapsed(), 2 * S, "capped by max_delay");
}

fn breaker_then_ok(retry_after: Duration) -> (Svc, Arc<Mutex<Vec<tokio::time::Instant>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let svc = tower::service_fn(move |_req: Request<Bytes>| {
        let mut v = s.lock().unwrap();
        v.push(tokio::time::Instant::now());
        let first = v.len() == 1;
        async move {
            if first {
                let now = tokio::time::Instant::now().into_std();
                Err(Box::new(CircuitOpen::new(State::Open, now, retry_after)) as BoxError)
            } else {
                Ok(Response::new(Bytes::new()))
            }
        }
    });
    (BoxCloneService::new(svc), seen)
}

#[tokio::test(start_paused = true)]
async fn circuit_open_not_retried_before_its_time() {
    let (inner, seen) = breaker_then_ok(3 * S);
    // Even a POST: a rejected request never left.
    let mut svc = RetryLayer::new(policy()).layer(inner);
    svc.ready().await.unwrap().call(req("POST")).await.unwrap();
    let v = seen.lock().unwrap().clone();
    assert_eq!(v.len(), 2);
    assert!(v[1] - v[0] >= 3 * S, "retried after {:?}", v[1] - v[0]);

    let (inner, seen) = breaker_then_ok(60 * S);
    let mut svc = RetryLayer::new(policy()).layer(inner);
    let e = svc
        .ready()
        .await
        .unwrap()
        .call(req("GET"))
        .await
        .unwrap_err();
    assert_eq!(
        e.downcast_ref::<CircuitOpen>().unwrap().retry_after(),
        60 * S
    );
    assert_eq!(seen.lock().unwrap().len(), 1, "beyond max_delay: give up");
}

#[tokio::test(start_paused = true)]
async fn budget_stops_retries() {
    let clock = ManualClock::new();
    let budget = Arc::new(RetryBudget::with_clock(10 * S, 0, 0.5, clock));
    let (inner, calls) = ok_then(vec![(503, None)]);
    let mut svc = RetryLayer::new(policy().max_attempts(10).budget(budget.clone())).layer(inner);
    // One request deposits 1 unit; a retry costs 2: no retry at all.
    svc.ready().await.unwrap().call(req("GET")).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    for _ in 0..3 {
        budget.deposit();
    }
    // 3 + 1 deposits = 2 retries.
    svc.ready().await.unwrap().call(req("GET")).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1 + 3);
}

#[test]
fn verdicts() {
    let now = SystemTime::now();
    let resp = |code: u16| {
        let mut r = Response::new(());
        *r.status_mut() = StatusCode::from_u16(code).unwrap();
        r
    };
    assert_eq!(verdict(Ok(&resp(200)), now), Verdict::Success);
    assert_eq!(verdict(Ok(&resp(409)), now), Verdict::Fail);
    assert_eq!(verdict(Ok(&resp(503)), now), Verdict::Retry { after: None });
    let co = CircuitOpen::new(State::Open, std::time::Instant::now(), 7 * S);
    assert_eq!(
        verdict::<()>(Err(&co), now),
        Verdict::Retry { after: Some(7 * S) }
    );
    let elapsed: BoxError = Box::new(tower::timeout::error::Elapsed::new());
    assert_eq!(
        verdict::<()>(Err(&*elapsed), now),
        Verdict::Retry { after: None }
    );
    let other = std::io::Error::other("x");
    assert_eq!(verdict::<()>(Err(&other), now), Verdict::Fail);
}
