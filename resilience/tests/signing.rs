//! Request signing: the canonical string, the signature, and what the
//! verifier refuses (and why), without a server; then both layers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use resilience::signing::{
    canonical_string, Secret, SecretError, SignRequestLayer, Signer, Verifier, VerifierConfig,
    VerifyError, VerifySignatureLayer, CHALLENGE, DEFAULT_SIGNED_HEADERS, NONCE_HEADER,
    SIGNATURE_HEADER, TIMESTAMP_HEADER,
};
use tower::{service_fn, Layer, ServiceExt};

const SECRET: &str = "0123456789abcdef-secret";
const OLD_SECRET: &str = "the-previous-secret-0000";
const NONCE: &str = "0123456789abcdef0123456789abcdef";
const TS: u64 = 1_700_000_000;

fn signer(secret: &str) -> Signer {
    Signer::new(secret.into()).expect("valid secret")
}

fn verifier(secrets: &[&str]) -> Verifier {
    Verifier::new(VerifierConfig::new(
        secrets.iter().map(|s| Secret::from(*s)),
    ))
    .expect("valid")
}

/// A signed request's parts: method, uri, headers, body.
fn signed(
    secret: &str,
    path: &str,
    body: &[u8],
    ts: u64,
    nonce: &str,
) -> (Method, Uri, HeaderMap, Vec<u8>) {
    let uri: Uri = format!("http://peer:8081{path}").parse().expect("uri");
    let mut headers = HeaderMap::new();
    headers.insert("idempotency-key", HeaderValue::from_static("k-1"));
    signer(secret).sign_with(&Method::POST, &uri, &mut headers, body, ts, nonce);
    (Method::POST, uri, headers, body.to_vec())
}

#[test]
fn canonical_string_is_exactly_the_documented_lines() {
    let mut headers = HeaderMap::new();
    headers.insert("idempotency-key", HeaderValue::from_static("k-1"));
    let c = canonical_string(
        &Method::POST,
        "/shipments?x=1",
        "1700000000",
        NONCE,
        &headers,
        &DEFAULT_SIGNED_HEADERS,
        br#"{"a":1}"#,
    );
    assert_eq!(
        String::from_utf8(c).expect("utf-8"),
        "v1\nPOST\n/shipments?x=1\n1700000000\n0123456789abcdef0123456789abcdef\n\
         idempotency-key:k-1\nx-client-id:\n\
         015abd7f5cc57a2dd94b7590f04ad8084273905ee33ec5cebeae62276a97f862"
    );
}

#[test]
fn signature_headers_match_an_independent_hmac() {
    // Computed with Python's hmac module over the canonical string above.
    let (_, _, headers, _) = signed(SECRET, "/shipments?x=1", br#"{"a":1}"#, TS, NONCE);
    assert_eq!(headers[TIMESTAMP_HEADER], "1700000000");
    assert_eq!(headers[NONCE_HEADER], NONCE);
    assert_eq!(
        headers[SIGNATURE_HEADER],
        "v1=7c9874aa9787f3d02fb0d03209ebafe197d4aedf893a5150eef607fc414f21bb"
    );
}

#[test]
fn a_valid_signature_passes_once() {
    let v = verifier(&[SECRET]);
    let (m, u, h, b) = signed(SECRET, "/shipments", b"{}", TS, NONCE);
    assert_eq!(v.verify_at(&m, &u, &h, &b, TS + 10), Ok(()));
    // The same request again: a replay.
    assert_eq!(
        v.verify_at(&m, &u, &h, &b, TS + 11),
        Err(VerifyError::Replayed)
    );
    // A clone shares the cache.
    assert_eq!(
        v.clone().verify_at(&m, &u, &h, &b, TS + 12),
        Err(VerifyError::Replayed)
    );
}

#[test]
fn anything_changed_after_signing_is_a_mismatch() {
    let v = verifier(&[SECRET]);
    let (m, u, h, b) = signed(SECRET, "/orders/1/shipment-events", b"{\"a\":1}", TS, NONCE);
    // Another body.
    assert_eq!(
        v.verify_at(&m, &u, &h, b"{\"a\":2}", TS),
        Err(VerifyError::Mismatch)
    );
    // Another path, another query.
    let other: Uri = "/orders/2/shipment-events".parse().expect("uri");
    assert_eq!(
        v.verify_at(&m, &other, &h, &b, TS),
        Err(VerifyError::Mismatch)
    );
    let query: Uri = "/orders/1/shipment-events?x=1".parse().expect("uri");
    assert_eq!(
        v.verify_at(&m, &query, &h, &b, TS),
        Err(VerifyError::Mismatch)
    );
    // Another method.
    assert_eq!(
        v.verify_at(&Method::PUT, &u, &h, &b, TS),
        Err(VerifyError::Mismatch)
    );
    // Another idempotency key, or a client id added.
    let mut h2 = h.clone();
    h2.insert("idempotency-key", HeaderValue::from_static("k-2"));
    assert_eq!(v.verify_at(&m, &u, &h2, &b, TS), Err(VerifyError::Mismatch));
    let mut h3 = h.clone();
    h3.insert("x-client-id", HeaderValue::from_static("someone"));
    assert_eq!(v.verify_at(&m, &u, &h3, &b, TS), Err(VerifyError::Mismatch));
    // Another timestamp.
    let mut h4 = h.clone();
    h4.insert(TIMESTAMP_HEADER, HeaderValue::from(TS + 1));
    assert_eq!(v.verify_at(&m, &u, &h4, &b, TS), Err(VerifyError::Mismatch));
    // Another secret.
    let (m, u, h, b) = signed("some-other-secret-0000", "/shipments", b"{}", TS, NONCE);
    assert_eq!(v.verify_at(&m, &u, &h, &b, TS), Err(VerifyError::Mismatch));
    // None of the refusals used up the nonce: the genuine request passes.
    let (m, u, h, b) = signed(SECRET, "/orders/1/shipment-events", b"{\"a\":1}", TS, NONCE);
    assert_eq!(v.verify_at(&m, &u, &h, &b, TS), Ok(()));
}

#[test]
fn the_host_is_not_signed() {
    let v = verifier(&[SECRET]);
    let (m, _, h, b) = signed(SECRET, "/shipments", b"{}", TS, NONCE);
    let origin_form: Uri = "/shipments".parse().expect("uri");
    assert_eq!(v.verify_at(&m, &origin_form, &h, &b, TS), Ok(()));
}

#[test]
fn the_window_applies_both_ways() {
    let v =
        Verifier::new(VerifierConfig::new([Secret::from(SECRET)]).window(Duration::from_secs(60)))
            .expect("valid");
    let (m, u, h, b) = signed(SECRET, "/shipments", b"{}", TS, NONCE);
    let stale = Err(VerifyError::Stale { window_secs: 60 });
    assert_eq!(v.verify_at(&m, &u, &h, &b, TS + 61), stale);
    assert_eq!(v.verify_at(&m, &u, &h, &b, TS - 61), stale);
    assert_eq!(v.verify_at(&m, &u, &h, &b, TS + 60), Ok(()));
    // The default window is 300 s.
    let v = verifier(&[SECRET]);
    let (m, u, h, b) = signed(SECRET, "/shipments", b"{}", TS, "another-nonce-000000");
    assert_eq!(
        v.verify_at(&m, &u, &h, &b, TS + 301),
        Err(VerifyError::Stale { window_secs: 300 })
    );
    assert_eq!(v.verify_at(&m, &u, &h, &b, TS + 300), Ok(()));
}

#[test]
fn missing_and_malformed_headers() {
    let v = verifier(&[SECRET]);
    let (m, u, h, b) = signed(SECRET, "/shipments", b"{}", TS, NONCE);
    for (name, label) in [
        (TIMESTAMP_HEADER, "x-service-timestamp"),
        (NONCE_HEADER, "x-service-nonce"),
        (SIGNATURE_HEADER, "x-service-signature"),
    ] {
        let mut h2 = h.clone();
        h2.remove(&name);
        assert_eq!(
            v.verify_at(&m, &u, &h2, &b, TS),
            Err(VerifyError::Missing(label))
        );
        let mut h3 = h.clone();
        h3.append(&name, h[&name].clone());
        assert_eq!(
            v.verify_at(&m, &u, &h3, &b, TS),
            Err(VerifyError::Malformed(label)),
            "a repeated {label}"
        );
    }
    let sig = h[SIGNATURE_HEADER].to_str().expect("ascii").to_string();
    for (name, value, want) in [
        (
            TIMESTAMP_HEADER,
            "-1".to_string(),
            VerifyError::Malformed("x-service-timestamp"),
        ),
        (
            TIMESTAMP_HEADER,
            "17e8".into(),
            VerifyError::Malformed("x-service-timestamp"),
        ),
        (
            TIMESTAMP_HEADER,
            "9".repeat(30),
            VerifyError::Malformed("x-service-timestamp"),
        ),
        (
            NONCE_HEADER,
            "short".into(),
            VerifyError::Malformed("x-service-nonce"),
        ),
        (
            NONCE_HEADER,
            "x".repeat(65),
            VerifyError::Malformed("x-service-nonce"),
        ),
        (
            NONCE_HEADER,
            "has spaces in it, sixteen+".into(),
            VerifyError::Malformed("x-service-nonce"),
        ),
        (
            SIGNATURE_HEADER,
            sig.replace("v1=", "v2="),
            VerifyError::UnsupportedVersion,
        ),
        (
            SIGNATURE_HEADER,
            sig.replace("v1=", ""),
            VerifyError::Malformed("x-service-signature"),
        ),
        (
            SIGNATURE_HEADER,
            format!("{sig}00"),
            VerifyError::Malformed("x-service-signature"),
        ),
        (
            SIGNATURE_HEADER,
            "v1=zz".into(),
            VerifyError::Malformed("x-service-signature"),
        ),
    ] {
        let mut h2 = h.clone();
        h2.insert(&name, HeaderValue::from_str(&value).expect("header"));
        assert_eq!(
            v.verify_at(&m, &u, &h2, &b, TS),
            Err(want),
            "{name}: {value}"
        );
    }
}

#[test]
fn rotation_accepts_every_configured_secret() {
    // During a rotation the verifier knows both; either signer passes.
    let v = verifier(&[SECRET, OLD_SECRET]);
    let (m, u, h, b) = signed(OLD_SECRET, "/shipments", b"{}", TS, "nonce-from-old-000000");
    assert_eq!(v.verify_at(&m, &u, &h, &b, TS), Ok(()));
    let (m, u, h, b) = signed(SECRET, "/shipments", b"{}", TS, "nonce-from-new-000000");
    assert_eq!(v.verify_at(&m, &u, &h, &b, TS), Ok(()));
    // Once the old secret is dropped, its signatures fail.
    let v = verifier(&[SECRET]);
    let (m, u, h, b) = signed(OLD_SECRET, "/shipments", b"{}", TS, "nonce-from-old-000001");
    assert_eq!(v.verify_at(&m, &u, &h, &b, TS), Err(VerifyError::Mismatch));
}

#[test]
fn secrets_are_validated_and_never_printed() {
    assert_eq!(
        Signer::new("short".into()).err(),
        Some(SecretError::TooShort { len: 5, min: 16 })
    );
    assert_eq!(Signer::new("".into()).err(), Some(SecretError::Empty));
    assert_eq!(
        Verifier::new(VerifierConfig::new([])).err(),
        Some(SecretError::Missing)
    );
    assert_eq!(
        Verifier::new(VerifierConfig::new([Secret::from(SECRET)]).window(Duration::ZERO)).err(),
        Some(SecretError::ZeroWindow)
    );
    let shown = format!(
        "{:?} {:?} {:?}",
        Secret::from(SECRET),
        signer(SECRET),
        verifier(&[SECRET, OLD_SECRET])
    );
    assert!(
        !shown.contains(SECRET) && !shown.contains(OLD_SECRET),
        "{shown}"
    );
    assert!(!shown.contains("0123456789abcdef"), "{shown}");
}

#[tokio::test]
async fn the_client_layer_signs_every_attempt_afresh() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let svc =
        SignRequestLayer::new(signer(SECRET)).layer(service_fn(move |req: Request<Bytes>| {
            let record = record.clone();
            async move {
                record.lock().expect("lock").push(req);
                Ok::<_, std::convert::Infallible>(())
            }
        }));
    let request = || {
        let mut req = Request::post("http://peer/shipments")
            .header("idempotency-key", "k-1")
            .body(Bytes::from_static(b"{}"))
            .expect("request");
        // Stale headers from an earlier attempt are replaced.
        req.headers_mut()
            .insert(SIGNATURE_HEADER, HeaderValue::from_static("v1=00"));
        req
    };
    svc.clone().oneshot(request()).await.expect("infallible");
    svc.oneshot(request()).await.expect("infallible");
    let v = verifier(&[SECRET]);
    let seen = seen.lock().expect("lock");
    assert_eq!(seen.len(), 2);
    assert_ne!(
        seen[0].headers()[NONCE_HEADER],
        seen[1].headers()[NONCE_HEADER]
    );
    for req in seen.iter() {
        assert_eq!(
            v.verify(req.method(), req.uri(), req.headers(), req.body()),
            Ok(())
        );
    }
}

fn app(calls: Arc<AtomicUsize>, max_body: usize) -> Router {
    let v = Verifier::new(VerifierConfig::new([Secret::from(SECRET)]).max_body_bytes(max_body))
        .expect("valid");
    Router::new().route(
        "/shipments",
        post(move |body: Bytes| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                body
            }
        })
        .route_layer(VerifySignatureLayer::new(v)),
    )
}

async fn call(app: &Router, req: Request<Body>) -> (StatusCode, HeaderMap, Bytes) {
    let res = app.clone().oneshot(req).await.expect("infallible");
    let (parts, body) = res.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.expect("body");
    (parts.status, parts.headers, body)
}

fn http_request(headers: &HeaderMap, body: &'static [u8]) -> Request<Body> {
    let mut req = Request::post("/shipments")
        .body(Body::from(body))
        .expect("request");
    *req.headers_mut() = headers.clone();
    req
}

#[tokio::test]
async fn the_server_layer_refuses_before_the_handler() {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = app(calls.clone(), 64);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();

    // Unsigned: 401 problem+json with the challenge.
    let (status, headers, body) = call(&app, http_request(&HeaderMap::new(), b"{}")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["www-authenticate"], CHALLENGE);
    assert!(CHALLENGE.starts_with("Service-HMAC-SHA256 "));
    assert_eq!(headers["content-type"], "application/problem+json");
    let problem: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(problem["status"], 401);

    // Signed over another body.
    let (_, _, h, _) = signed(SECRET, "/shipments", b"{\"a\":1}", now, NONCE);
    let (status, headers, _) = call(&app, http_request(&h, b"{\"a\":2}")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(headers.contains_key("www-authenticate"));

    // Stale.
    let (_, _, h, _) = signed(
        SECRET,
        "/shipments",
        b"{}",
        now - 301,
        "stale-nonce-00000000",
    );
    let (status, _, _) = call(&app, http_request(&h, b"{}")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Too large: 413, whatever the signature says.
    let big: &'static [u8] = &[b'x'; 65];
    let (_, _, h, _) = signed(SECRET, "/shipments", big, now, "big-nonce-0000000000");
    let (status, headers, _) = call(&app, http_request(&h, big)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "no refused request reached the handler"
    );

    // Valid: the handler gets the body intact; a replay is refused.
    let (_, _, h, _) = signed(SECRET, "/shipments", b"{\"a\":1}", now, NONCE);
    let (status, _, body) = call(&app, http_request(&h, b"{\"a\":1}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"{\"a\":1}");
    let (status, _, _) = call(&app, http_request(&h, b"{\"a\":1}")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // route_layer: a wrong method is still the router's 405, not a 401.
    let req = Request::delete("/shipments")
        .body(Body::empty())
        .expect("request");
    let (status, _, _) = call(&app, req).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}
