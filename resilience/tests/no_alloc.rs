//! The closed path allocates nothing once warmed up.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::Duration;

use resilience::circuit_breaker::{
    AnyErrorClassifier, CircuitBreakerConfig, CircuitBreakerLayer, ManualClock,
};
use tower::{Layer, Service};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: defers to the system allocator; only counts on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        System.realloc(ptr, layout, new)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(|c| c.get())
}

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

fn drive<S: Service<u32>>(svc: &mut S, n: u32) -> u32 {
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut ok = 0;
    for i in 0..n {
        assert!(svc.poll_ready(&mut cx).is_ready());
        let fut = pin!(svc.call(i));
        if let Poll::Ready(Ok(_)) = fut.poll(&mut cx) {
            ok += 1;
        }
    }
    ok
}

fn assert_no_alloc(cfg: CircuitBreakerConfig) {
    let layer = CircuitBreakerLayer::new(cfg).with_classifier(AnyErrorClassifier);
    let mut svc = layer.layer(Noop);
    drive(&mut svc, 1_000);
    let before = allocs();
    let ok = drive(&mut svc, 20_000);
    let after = allocs();
    assert_eq!(ok, 20_000);
    assert_eq!(after - before, 0, "allocations on the closed path");
    assert!(layer.handle().snapshot().calls > 0);
}

#[test]
fn closed_path_does_not_allocate() {
    // Count window, no clock reads.
    assert_no_alloc(
        CircuitBreakerConfig::builder()
            .count_window(100)
            .build()
            .unwrap(),
    );
    // Time window with slow-call detection (clock read on every call).
    assert_no_alloc(
        CircuitBreakerConfig::builder()
            .time_window(Duration::from_secs(10), 10)
            .slow_call_duration(Duration::from_secs(1))
            .clock(ManualClock::new())
            .build()
            .unwrap(),
    );
}

#[test]
fn counter_sees_allocations() {
    // Guard against a counter that silently counts nothing.
    let before = allocs();
    let v = std::hint::black_box(vec![1u8; 64]);
    assert!(allocs() > before);
    drop(v);
}
