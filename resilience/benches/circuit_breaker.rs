//! Closed-path and rejection cost of this crate's circuit breaker next to
//! `tower-resilience-circuitbreaker` 0.13 and `failsafe` 1.3.
//!
//! `cargo bench -p resilience --bench circuit_breaker -- --warm-up-time 1 --measurement-time 3`

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use failsafe::CircuitBreaker as _;
use resilience::circuit_breaker::{AnyErrorClassifier, CircuitBreakerConfig, CircuitBreakerLayer};
use tower::{Layer, Service};

#[derive(Clone)]
struct Noop;

impl Service<u32> for Noop {
    type Response = u32;
    type Error = Infallible;
    type Future = std::future::Ready<Result<u32, Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, r: u32) -> Self::Future {
        std::future::ready(Ok(r))
    }
}

/// One call through a tower service: poll_ready, call, poll the future to
/// completion (spinning with a no-op waker; every service here is ready).
#[inline]
fn once<S: Service<u32>>(svc: &mut S, cx: &mut Context<'_>, i: u32) -> bool {
    loop {
        if let Poll::Ready(r) = svc.poll_ready(cx) {
            if r.is_err() {
                return false;
            }
            break;
        }
    }
    let mut fut = pin!(svc.call(i));
    loop {
        if let Poll::Ready(r) = fut.as_mut().poll(cx) {
            return r.is_ok();
        }
    }
}

fn ours() -> (
    impl Service<u32, Response = u32> + Clone + Send + 'static,
    resilience::circuit_breaker::BreakerHandle,
) {
    let cfg = CircuitBreakerConfig::builder()
        .count_window(100)
        .minimum_calls(100)
        .open_duration(Duration::from_secs(3600))
        .build()
        .expect("valid");
    let layer = CircuitBreakerLayer::new(cfg).with_classifier(AnyErrorClassifier);
    let h = layer.handle().clone();
    (layer.layer(Noop), h)
}

type TrSvc = tower_resilience::circuitbreaker::CircuitBreaker<
    Noop,
    tower_resilience::circuitbreaker::DefaultClassifier,
>;

fn theirs() -> TrSvc {
    let layer = tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_size(100)
        .minimum_number_of_calls(100)
        .wait_duration_in_open(Duration::from_secs(3600))
        .build()
        .expect("valid");
    layer.layer_fn(Noop)
}

fn failsafe_cb(
) -> impl failsafe::CircuitBreaker + failsafe::futures::CircuitBreaker + Clone + Send + 'static {
    let backoff = failsafe::backoff::constant(Duration::from_secs(3600));
    let policy = failsafe::failure_policy::consecutive_failures(1, backoff);
    failsafe::Config::new().failure_policy(policy).build()
}

/// failsafe's futures API, the like-for-like comparison with a tower
/// service: the returned future owns a clone of the breaker (an `Arc`), as a
/// tower response future must.
#[inline]
fn failsafe_future<C: failsafe::futures::CircuitBreaker>(
    cb: &C,
    cx: &mut Context<'_>,
    i: u32,
) -> bool {
    let mut fut = pin!(failsafe::futures::CircuitBreaker::call(
        cb,
        std::future::ready(Ok::<u32, ()>(black_box(i)))
    ));
    loop {
        if let Poll::Ready(r) = fut.as_mut().poll(cx) {
            return r.is_ok();
        }
    }
}

fn two_threads<F>(iters: u64, make: impl Fn() -> F) -> Duration
where
    F: FnMut(u32) + Send + 'static,
{
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(3));
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let mut f = make();
            let b = barrier.clone();
            std::thread::spawn(move || {
                b.wait();
                for i in 0..iters {
                    f(i as u32);
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for h in handles {
        h.join().expect("bench thread");
    }
    start.elapsed()
}

fn closed_single(c: &mut Criterion) {
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut g = c.benchmark_group("closed_1_thread");
    let (mut svc, _h) = ours();
    g.bench_function("resilience", |b| {
        let mut i = 0u32;
        b.iter(|| {
            i = i.wrapping_add(1);
            black_box(once(&mut svc, &mut cx, i))
        })
    });
    let mut svc = theirs();
    g.bench_function("tower-resilience", |b| {
        let mut i = 0u32;
        b.iter(|| {
            i = i.wrapping_add(1);
            black_box(once(&mut svc, &mut cx, i))
        })
    });
    let cb = failsafe_cb();
    g.bench_function("failsafe", |b| {
        let mut i = 0u32;
        b.iter(|| {
            i = i.wrapping_add(1);
            black_box(cb.call(|| Ok::<u32, ()>(black_box(i))).is_ok())
        })
    });
    g.bench_function("failsafe-futures", |b| {
        let mut i = 0u32;
        b.iter(|| {
            i = i.wrapping_add(1);
            black_box(failsafe_future(&cb, &mut cx, i))
        })
    });
    let mut svc = Noop;
    g.bench_function("baseline (no breaker)", |b| {
        let mut i = 0u32;
        b.iter(|| {
            i = i.wrapping_add(1);
            black_box(once(&mut svc, &mut cx, i))
        })
    });
    g.finish();
}

fn closed_two(c: &mut Criterion) {
    let mut g = c.benchmark_group("closed_2_threads_shared");
    let (svc, _h) = ours();
    g.bench_function("resilience", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let mut s = svc.clone();
                move |i| {
                    let waker = futures::task::noop_waker();
                    let mut cx = Context::from_waker(&waker);
                    black_box(once(&mut s, &mut cx, i));
                }
            })
        })
    });
    let svc = theirs();
    g.bench_function("tower-resilience", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let mut s = svc.clone();
                move |i| {
                    let waker = futures::task::noop_waker();
                    let mut cx = Context::from_waker(&waker);
                    black_box(once(&mut s, &mut cx, i));
                }
            })
        })
    });
    let cb = failsafe_cb();
    g.bench_function("failsafe", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let cb = cb.clone();
                move |i| {
                    black_box(cb.call(|| Ok::<u32, ()>(black_box(i))).is_ok());
                }
            })
        })
    });
    g.bench_function("failsafe-futures", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let cb = cb.clone();
                move |i| {
                    let waker = futures::task::noop_waker();
                    let mut cx = Context::from_waker(&waker);
                    black_box(failsafe_future(&cb, &mut cx, i));
                }
            })
        })
    });
    g.finish();
}

fn rejection(c: &mut Criterion) {
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut g = c.benchmark_group("rejected_when_open");
    let (mut svc, h) = ours();
    h.transition_to_open();
    assert!(!once(&mut svc, &mut cx, 0), "open");
    g.bench_function("resilience", |b| {
        b.iter(|| black_box(once(&mut svc, &mut cx, 1)))
    });
    let mut svc = theirs();
    futures::executor::block_on(svc.force_open());
    assert!(!once(&mut svc, &mut cx, 0), "open");
    g.bench_function("tower-resilience", |b| {
        b.iter(|| black_box(once(&mut svc, &mut cx, 1)))
    });
    let cb = failsafe_cb();
    let _ = cb.call(|| Err::<u32, ()>(()));
    assert!(cb.call(|| Ok::<u32, ()>(0)).is_err(), "open");
    g.bench_function("failsafe", |b| {
        b.iter(|| black_box(cb.call(|| Ok::<u32, ()>(black_box(1))).is_ok()))
    });
    assert!(!failsafe_future(&cb, &mut cx, 0), "open");
    g.bench_function("failsafe-futures", |b| {
        b.iter(|| black_box(failsafe_future(&cb, &mut cx, 1)))
    });
    g.finish();
}

criterion_group!(benches, closed_single, closed_two, rejection);
criterion_main!(benches);
