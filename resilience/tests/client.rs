//! HTTP client against a real local server.

use std::time::Duration;

use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use resilience::circuit_breaker::{classify_error, Outcome};
use resilience::client::{ClientError, HttpClient};
use resilience::retry::is_retryable_error;
use tower::{Service, ServiceExt};

async fn server() -> std::net::SocketAddr {
    let app = Router::new()
        .route("/ok", get(|| async { "hello" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        )
        .route(
            "/busy",
            get(|| async { (http::StatusCode::SERVICE_UNAVAILABLE, "busy") }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

fn get_req(url: String) -> http::Request<Bytes> {
    http::Request::get(url).body(Bytes::new()).unwrap()
}

#[tokio::test]
async fn success_and_status_passthrough() {
    let addr = server().await;
    let mut client = HttpClient::new(Duration::from_secs(5)).unwrap();
    let r = client
        .ready()
        .await
        .unwrap()
        .call(get_req(format!("http://{addr}/ok")))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.body(), "hello");
    let r = client
        .clone()
        .call(get_req(format!("http://{addr}/busy")))
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
}

#[tokio::test]
async fn timeout_is_classified() {
    let addr = server().await;
    let mut client = HttpClient::new(Duration::from_millis(200)).unwrap();
    let e = client
        .call(get_req(format!("http://{addr}/slow")))
        .await
        .unwrap_err();
    assert!(e.is_timeout(), "{e:?}");
    assert!(!e.is_connect());
    assert_eq!(classify_error(&e), Outcome::Failure);
    assert!(is_retryable_error(&e));
}

#[tokio::test]
async fn connect_refused_is_classified() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut client = HttpClient::new(Duration::from_secs(5)).unwrap();
    let e = client
        .call(get_req(format!("http://127.0.0.1:{port}/")))
        .await
        .unwrap_err();
    assert!(e.is_connect(), "{e:?}");
    assert!(matches!(e, ClientError::Connect(_)));
    assert_eq!(classify_error(&e), Outcome::Failure);
    assert!(resilience::retry::never_sent(&e));
}

#[tokio::test]
async fn invalid_request_is_ignored_by_breaker() {
    let mut client = HttpClient::new(Duration::from_secs(1)).unwrap();
    let e = client
        .call(get_req("/relative-only".to_string()))
        .await
        .unwrap_err();
    assert!(e.is_request(), "{e:?}");
    assert_eq!(classify_error(&e), Outcome::Ignored);
}

/// The stack the outbox relay uses: retry → per-destination breaker →
/// fault injection → timeout → HttpClient, against a real server.
#[tokio::test]
async fn full_stack_opens_per_destination_and_reports_retry_after() {
    use resilience::circuit_breaker::{BreakerRegistry, CircuitBreakerConfig, CircuitOpen, State};
    use resilience::fault::{FaultConfig, FaultLayer};
    use resilience::retry::{Backoff, RetryLayer, RetryPolicy};
    use tower::ServiceBuilder;

    let addr = server().await;
    let registry = BreakerRegistry::new(
        CircuitBreakerConfig::builder()
            .count_window(10)
            .minimum_calls(4)
            .open_duration(Duration::from_secs(60))
            .build()
            .unwrap(),
        128,
    );
    let faults = FaultLayer::new(FaultConfig::default(), 7).unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new(
            RetryPolicy::default()
                .max_attempts(2)
                .backoff(Backoff::new(
                    Duration::from_millis(1),
                    2.0,
                    Duration::from_millis(5),
                ))
                .max_delay(Duration::from_secs(1)),
        ))
        .layer(resilience::circuit_breaker::PerAuthorityLayer::new(
            registry.clone(),
        ))
        .layer(faults.clone())
        .timeout(Duration::from_secs(2))
        .service(HttpClient::new(Duration::from_secs(2)).unwrap());

    // 2 requests x 2 attempts of 503 = 4 failures: the breaker opens.
    for _ in 0..2 {
        let r = svc
            .ready()
            .await
            .unwrap()
            .call(get_req(format!("http://{addr}/busy")))
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
    }
    let breaker = registry
        .get(&addr.to_string())
        .expect("breaker per authority");
    assert_eq!(breaker.state(), State::Open);
    // Open for 60 s > max_delay 1 s: the retry layer gives the rejection back.
    let e = svc
        .ready()
        .await
        .unwrap()
        .call(get_req(format!("http://{addr}/ok")))
        .await
        .unwrap_err();
    let open = CircuitOpen::find(&*e).expect("CircuitOpen");
    assert!(open.retry_after() > Duration::from_secs(55));

    // Injected drops count as failures for the breaker too.
    breaker.reset();
    faults
        .handle()
        .set(FaultConfig {
            drop_request: 1.0,
            ..FaultConfig::default()
        })
        .unwrap();
    for _ in 0..2 {
        let _ = svc
            .ready()
            .await
            .unwrap()
            .call(get_req(format!("http://{addr}/ok")))
            .await;
    }
    assert_eq!(breaker.state(), State::Open);
    assert_eq!(faults.handle().snapshot().dropped, 4);
}
