//! The front door: the requests that take work in, counted for the
//! background loops that give way to them ([`resilience::foreground`]).

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use axum::body::{Body, HttpBody};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use resilience::foreground::{Foreground, ForegroundGuard};

/// `app` with the requests to `routes` (method, exact path) counted in
/// `foreground` from the moment their body has all arrived until their
/// response is ready, for background loops that give way to them. Wrap the
/// outermost router: a route's own layers run inside group commit, where a
/// request spends only a moment of its wait.
///
/// A request is not counted while its body is still coming in: a client
/// that sends its body slowly (or never finishes it) costs the service no
/// work yet, and must not hold delivery back. A request whose body ends
/// with its head (no body, or one already buffered) is counted at once.
pub fn front_door(
    app: axum::Router,
    foreground: Foreground,
    routes: &[(http::Method, &str)],
) -> axum::Router {
    let routes: Arc<[(http::Method, String)]> = routes
        .iter()
        .map(|(m, p)| (m.clone(), (*p).to_owned()))
        .collect();
    app.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let counted = routes
                .iter()
                .any(|(m, p)| req.method() == m && req.uri().path() == p);
            let (req, slot) = if counted {
                let slot = Arc::new(OnceLock::new());
                let (parts, body) = req.into_parts();
                if body.is_end_stream() {
                    slot.get_or_init(|| foreground.enter());
                }
                let body = Body::new(Arrival {
                    inner: body,
                    slot: slot.clone(),
                    foreground: foreground.clone(),
                });
                (axum::extract::Request::from_parts(parts, body), Some(slot))
            } else {
                (req, None)
            };
            async move {
                let res = next.run(req).await;
                // The count ends here, or when the handler drops the body,
                // whichever is later (a handler has dropped it by now).
                drop(slot);
                res
            }
        },
    ))
}

/// A request body that enters the front door's count once it has all
/// arrived. The guard lives in `slot`, shared with the middleware.
struct Arrival {
    inner: Body,
    slot: Arc<OnceLock<ForegroundGuard>>,
    foreground: Foreground,
}

impl HttpBody for Arrival {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let arrived = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => self.inner.is_end_stream(),
            Poll::Ready(Some(Err(_))) | Poll::Pending => false,
        };
        if arrived {
            self.slot.get_or_init(|| self.foreground.enter());
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::routing::{get, post};
    use tower::ServiceExt;

    /// Only the named routes are counted, and only while they run.
    #[tokio::test]
    async fn counts_the_named_routes_while_they_run() {
        let fg = resilience::foreground::Foreground::new(1);
        let entered = Arc::new(tokio::sync::Notify::new());
        let release = Arc::new(tokio::sync::Notify::new());
        let (e, r) = (entered.clone(), release.clone());
        let app = axum::Router::new()
            .route(
                "/orders",
                post(move || async move {
                    e.notify_one();
                    r.notified().await;
                    "created"
                })
                .get(|| async { "list" }),
            )
            .route("/orders/x", get(|| async { "one" }));
        let app = super::front_door(app, fg.clone(), &[(http::Method::POST, "/orders")]);
        let request = |method: &str, path: &str| {
            http::Request::builder()
                .method(method)
                .uri(path)
                .body(axum::body::Body::empty())
        };

        let slow = tokio::spawn(app.clone().oneshot(request("POST", "/orders").unwrap()));
        entered.notified().await;
        assert_eq!(fg.in_flight(), 1, "POST /orders is counted while it runs");
        for (m, p) in [
            ("GET", "/orders"),
            ("GET", "/orders/x"),
            ("POST", "/orders/x"),
        ] {
            let _ = app.clone().oneshot(request(m, p).unwrap()).await;
            assert_eq!(fg.in_flight(), 1, "{m} {p} is not counted");
        }
        release.notify_one();
        let res = slow.await.unwrap().unwrap();
        assert_eq!(res.status(), http::StatusCode::OK);
        assert_eq!(fg.in_flight(), 0, "the count ends with the request");
        assert!(
            fg.busy_within(std::time::Duration::from_secs(60)),
            "busy a moment ago"
        );
    }

    /// A request whose body is still coming in is not counted; it is
    /// from the moment the last of its body has arrived.
    #[tokio::test]
    async fn counts_a_request_once_its_body_has_arrived() {
        let fg = resilience::foreground::Foreground::new(1);
        let (parts, mut parts_rx) = tokio::sync::mpsc::channel::<usize>(1);
        let release = Arc::new(tokio::sync::Notify::new());
        let r = release.clone();
        let app = axum::Router::new().route(
            "/orders",
            post(move |body: bytes::Bytes| async move {
                let _ = parts.send(body.len()).await;
                r.notified().await;
                "created"
            }),
        );
        let app = super::front_door(app, fg.clone(), &[(http::Method::POST, "/orders")]);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
        let body =
            axum::body::Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|chunk| (chunk, rx))
            }));
        let req = http::Request::builder()
            .method("POST")
            .uri("/orders")
            .body(body)
            .unwrap();
        let call = tokio::spawn(app.oneshot(req));

        tx.send(Ok(bytes::Bytes::from_static(b"{\"half\":")))
            .await
            .unwrap();
        // The first part has been read (the channel is empty again): the
        // request is past the front door, reading a body still arriving,
        // and not counted.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while tx.capacity() < tx.max_capacity() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the body was never read"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert_eq!(fg.in_flight(), 0, "a body still arriving is not counted");
        assert!(!fg.busy_within(std::time::Duration::from_secs(60)));

        tx.send(Ok(bytes::Bytes::from_static(b"1}"))).await.unwrap();
        drop(tx);
        assert_eq!(parts_rx.recv().await, Some(10), "the handler read it all");
        assert_eq!(fg.in_flight(), 1, "counted once the body has arrived");
        release.notify_one();
        let res = call.await.unwrap().unwrap();
        assert_eq!(res.status(), http::StatusCode::OK);
        assert_eq!(fg.in_flight(), 0, "the count ends with the request");
    }
}
