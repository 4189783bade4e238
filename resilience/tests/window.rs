//! Sliding windows agree with a naive model (keep every outcome, filter).

use proptest::prelude::*;
use resilience::circuit_breaker::window::{CountWindow, TimeWindow, Totals};

#[derive(Debug, Clone, Copy)]
struct Ev {
    failure: bool,
    slow: bool,
}

fn naive(evs: &[Ev]) -> Totals {
    Totals {
        calls: evs.len() as u32,
        failures: evs.iter().filter(|e| e.failure).count() as u32,
        slow: evs.iter().filter(|e| e.slow).count() as u32,
    }
}

/// Records `evs` one by one, checking after each that the window holds
/// exactly the last `size` of them; returns them all.
fn record_and_compare(
    w: &CountWindow,
    epoch: u16,
    size: usize,
    evs: &[Ev],
) -> Result<Vec<Ev>, TestCaseError> {
    let mut all = Vec::new();
    for e in evs {
        all.push(*e);
        let got = w.record(epoch, e.failure, e.slow).expect("current epoch");
        let start = all.len().saturating_sub(size);
        prop_assert_eq!(got, naive(&all[start..]));
    }
    Ok(all)
}

fn ev() -> impl Strategy<Value = Ev> {
    (any::<bool>(), prop::bool::weighted(0.2)).prop_map(|(failure, slow)| Ev { failure, slow })
}

proptest! {
    // proptest prints the minimal failing input and persists its seed.
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn count_window_matches_last_n(size in 1usize..40, evs in prop::collection::vec(ev(), 0..300)) {
        let w = CountWindow::new(size, 7);
        let all = record_and_compare(&w, 7, size, &evs)?;
        // Stale epochs are dropped and do not disturb the window.
        prop_assert!(w.record(6, true, true).is_none());
        let start = all.len().saturating_sub(size);
        prop_assert_eq!(w.totals(7), naive(&all[start..]));
        // A reset starts empty; old slots count as empty.
        w.reset(8);
        prop_assert_eq!(w.totals(8), Totals::default());
        let got = w.record(8, true, false).unwrap();
        prop_assert_eq!(got, Totals { calls: 1, failures: 1, slow: 0 });
    }

    /// Mostly successes: long runs fill the window with plain successes,
    /// which takes the one-load fast path; the failures in between must
    /// still leave the window after exactly `size` calls.
    #[test]
    fn count_window_matches_last_n_when_mostly_healthy(
        size in 1usize..40,
        evs in prop::collection::vec(
            (prop::bool::weighted(0.03), prop::bool::weighted(0.01))
                .prop_map(|(failure, slow)| Ev { failure, slow }),
            0..600,
        ),
    ) {
        let w = CountWindow::new(size, 3);
        record_and_compare(&w, 3, size, &evs)?;
    }

    #[test]
    fn time_window_matches_last_buckets(
        buckets in 1usize..12,
        bucket_ms in 1u64..50,
        steps in prop::collection::vec((ev(), 0u64..200), 0..300),
    ) {
        let bn = bucket_ms * 1_000_000;
        let w = TimeWindow::new(buckets, bn);
        let mut now = 0u64;
        let mut all: Vec<(u64, Ev)> = Vec::new();
        let model = |all: &[(u64, Ev)], now: u64| {
            let cur = now / bn;
            let live: Vec<Ev> = all
                .iter()
                .filter(|(t, _)| t / bn + buckets as u64 > cur)
                .map(|(_, e)| *e)
                .collect();
            naive(&live)
        };
        for (e, advance_ms) in &steps {
            now += advance_ms * 1_000_000 / 4;
            all.push((now, *e));
            let got = w.record(0, now, e.failure, e.slow).expect("current epoch");
            prop_assert_eq!(got, model(&all, now), "now={}", now);
        }
        now += bn * 3;
        prop_assert_eq!(w.totals(0, now), model(&all, now));
        // A new epoch starts empty.
        w.reset(1, now);
        prop_assert_eq!(w.totals(1, now), Totals::default());
        prop_assert!(w.record(0, now, true, true).is_none(), "old epoch dropped");
    }
}

#[test]
fn time_window_long_idle_does_not_alias() {
    let bn = 1_000_000u64;
    let w = TimeWindow::new(8, bn);
    w.record(0, 0, true, false);
    // 65 536 buckets later the 16-bit bucket tags wrap around.
    let later = 65_536 * bn;
    assert_eq!(w.totals(0, later), Totals::default());
    let t = w.record(0, later, false, false).unwrap();
    assert_eq!(
        t,
        Totals {
            calls: 1,
            failures: 0,
            slow: 0
        }
    );
}

#[test]
fn count_window_converges_after_concurrent_writers() {
    use std::sync::Arc;
    let seed: u64 = rand::random();
    println!("seed = {seed}");
    let w = Arc::new(CountWindow::new(64, 3));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let w = w.clone();
            std::thread::spawn(move || {
                use rand::{Rng, SeedableRng};
                let mut rng = rand::rngs::SmallRng::seed_from_u64(seed ^ t);
                for _ in 0..50_000 {
                    w.record(3, rng.gen(), rng.gen_bool(0.1));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let t = w.totals(3);
    assert!(t.calls <= 64 && t.failures <= t.calls, "seed {seed}: {t:?}");
    for _ in 0..64 {
        w.record(3, true, false);
    }
    assert_eq!(
        w.totals(3),
        Totals {
            calls: 64,
            failures: 64,
            slow: 0
        },
        "seed {seed}"
    );
}

/// A failure recorded after a long healthy run stays in the window for
/// exactly `size` calls, although the healthy calls before it claimed no slot.
#[test]
fn failure_after_healthy_run_leaves_after_size_calls() {
    let w = CountWindow::new(4, 1);
    for _ in 0..1_000 {
        w.record(1, false, false);
    }
    let t = w.record(1, true, false).expect("current epoch");
    assert_eq!((t.calls, t.failures), (4, 1));
    for i in 1..4 {
        let t = w.record(1, false, false).expect("current epoch");
        assert_eq!(t.failures, 1, "{i} calls after the failure");
    }
    let t = w.record(1, false, false).expect("current epoch");
    assert_eq!(t.failures, 0, "4 calls after the failure");
}

/// Writers on several threads, mostly successes (so the fast path races with
/// slot writers): afterwards the counters still agree with the ring, which a
/// full turn of known outcomes shows.
#[test]
fn concurrent_writers_keep_counters_exact() {
    let w = std::sync::Arc::new(CountWindow::new(16, 2));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let w = w.clone();
            std::thread::spawn(move || {
                // A small LCG per thread: seeded, no extra dependency.
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ t;
                for _ in 0..50_000 {
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    let failure = (x >> 33).is_multiple_of(20);
                    w.record(2, failure, false);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("writer thread");
    }
    let mut last = None;
    for _ in 0..16 {
        last = w.record(2, true, false);
    }
    assert_eq!(
        last,
        Some(Totals {
            calls: 16,
            failures: 16,
            slow: 0
        })
    );
    for _ in 0..16 {
        last = w.record(2, false, false);
    }
    assert_eq!(
        last,
        Some(Totals {
            calls: 16,
            failures: 0,
            slow: 0
        })
    );
}
