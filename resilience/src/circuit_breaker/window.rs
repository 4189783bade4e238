//! Lock-free sliding windows with fixed memory.
//!
//! Both windows are tagged with a 16-bit *epoch* (the breaker uses the low
//! bits of its state generation). Resetting a window is a single atomic
//! store of a new epoch; outcomes recorded with another epoch are dropped,
//! and slots left over from an earlier epoch count as empty. This is what
//! makes late outcomes from an earlier state cycle harmless even when they
//! race with a transition.
//!
//! Counters are packed into one `u64` as four 16-bit lanes
//! `[epoch | calls | failures | slow]`, so every update is one CAS.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// Largest accepted count-window size.
pub const MAX_COUNT_WINDOW: usize = 16_384;
/// Largest accepted number of buckets for a time window.
pub const MAX_BUCKETS: usize = 4_096;

const F_REC: u8 = 1;
const F_FAIL: u8 = 2;
const F_SLOW: u8 = 4;
const LANE: u64 = 0xFFFF;

/// Aggregated counts of a window at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Calls recorded (successes, failures; ignored outcomes are not recorded).
    pub calls: u32,
    /// Calls classified as failures.
    pub failures: u32,
    /// Calls slower than the slow-call threshold (failed or not).
    pub slow: u32,
}

impl Totals {
    /// Failure rate in percent (0 when there are no calls).
    pub fn failure_rate(&self) -> f64 {
        rate(self.failures, self.calls)
    }

    /// Slow-call rate in percent (0 when there are no calls).
    pub fn slow_rate(&self) -> f64 {
        rate(self.slow, self.calls)
    }
}

pub(crate) fn rate(part: u32, whole: u32) -> f64 {
    if whole == 0 {
        0.0
    } else {
        f64::from(part) * 100.0 / f64::from(whole)
    }
}

#[inline]
fn pack(tag: u16, calls: u64, fail: u64, slow: u64) -> u64 {
    (u64::from(tag) << 48) | ((calls & LANE) << 32) | ((fail & LANE) << 16) | (slow & LANE)
}

#[inline]
fn tag_of(w: u64) -> u16 {
    (w >> 48) as u16
}

#[inline]
fn lanes(w: u64) -> (u64, u64, u64) {
    ((w >> 32) & LANE, (w >> 16) & LANE, w & LANE)
}

#[inline]
fn flags(failure: bool, slow: bool) -> u8 {
    F_REC | if failure { F_FAIL } else { 0 } | if slow { F_SLOW } else { 0 }
}

#[inline]
fn delta(bits: u8) -> (u64, u64, u64) {
    (
        u64::from(bits & F_REC != 0),
        u64::from(bits & F_FAIL != 0),
        u64::from(bits & F_SLOW != 0),
    )
}

/// Lanes are read as `i16` clamped at zero (see [`CountWindow::record`]).
#[inline]
fn totals_of(w: u64) -> Totals {
    let (c, f, s) = lanes(w);
    let v = |x: u64| (x as u16 as i16).max(0) as u32;
    Totals {
        calls: v(c),
        failures: v(f),
        slow: v(s),
    }
}

/// A window over the last `size` recorded calls: a ring of per-slot atomics
/// plus packed counters, updated without locks.
pub struct CountWindow {
    slots: Box<[AtomicU32]>,
    /// Ring position `p` lives in slot `p * stride % len`: a bijection
    /// (`stride` is coprime with `len`), so eviction stays first-in
    /// first-out, while consecutive calls land on different cache lines.
    stride: usize,
    hot: Hot,
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The two words written on every call, kept on their own cache line(s) so
/// that they do not evict read-mostly state (false sharing).
#[repr(align(128))]
struct Hot {
    next: AtomicUsize,
    counters: AtomicU64,
}

impl CountWindow {
    /// A window over the last `size` calls (clamped to `1..=MAX_COUNT_WINDOW`).
    pub fn new(size: usize, epoch: u16) -> Self {
        let size = size.clamp(1, MAX_COUNT_WINDOW);
        CountWindow {
            slots: (0..size).map(|_| AtomicU32::new(0)).collect(),
            stride: (33..).find(|k| gcd(*k, size) == 1).unwrap_or(1),
            hot: Hot {
                next: AtomicUsize::new(0),
                counters: AtomicU64::new(pack(epoch, 0, 0, 0)),
            },
        }
    }

    /// Number of slots.
    pub fn size(&self) -> usize {
        self.slots.len()
    }

    /// Empties the window and starts epoch `epoch`.
    pub fn reset(&self, epoch: u16) {
        self.hot
            .counters
            .store(pack(epoch, 0, 0, 0), Ordering::Release);
    }

    /// Records one outcome tagged with `epoch`. Returns the totals right after
    /// the update, or `None` if the window has moved to another epoch (the
    /// outcome is stale and was dropped).
    ///
    /// Cost: one load when the window is full of successes and this is
    /// another one (the steady state of a healthy peer). Otherwise one
    /// `fetch_add` to claim a slot, one `swap` to place the outcome, and one
    /// CAS on the packed counters, which is skipped when the evicted outcome
    /// is identical. Lanes use wrapping arithmetic so that the `+new` and `-old`
    /// of concurrent writers commute; a lane may be transiently "negative"
    /// by the number of writers in flight, which readers clamp to zero.
    #[inline(always)]
    pub fn record(&self, epoch: u16, failure: bool, slow: bool) -> Option<Totals> {
        let bits = flags(failure, slow);
        let tagged = (u32::from(epoch) << 8) | u32::from(bits);
        let seen = self.hot.counters.load(Ordering::Acquire);
        if tag_of(seen) != epoch {
            // Stale: leave the ring alone. (If a reset races past this
            // check, the CAS below still keeps the counters exact; the
            // stale value then merely occupies one slot of the new epoch.)
            return None;
        }
        // NOTE: the healthy steady state costs one load. When the window is
        // full of plain successes, recording another one changes nothing,
        // whichever slot it would take: every slot already holds the same
        // value, so the ring is the same up to rotation, and a later failure
        // still stays in the window for exactly `len` calls, because every
        // call claims a slot again as soon as the window holds one failure.
        // A writer racing with this check has swapped its slot but not yet
        // updated the counters; skipping is then the same as having recorded
        // this success just before that writer, which yields the same totals.
        if bits == F_REC && seen == pack(epoch, self.slots.len() as u64, 0, 0) {
            return Some(totals_of(seen));
        }
        self.record_slow(epoch, bits, tagged)
    }

    #[inline(never)]
    fn record_slow(&self, epoch: u16, bits: u8, tagged: u32) -> Option<Totals> {
        // `(n * stride) % len == ((n % len) * stride) % len`, one division;
        // `n * stride` wraps only after ~5·10^17 calls.
        let n = self.hot.next.fetch_add(1, Ordering::Relaxed);
        let i = n.wrapping_mul(self.stride) % self.slots.len();
        let old = self.slots[i].swap(tagged, Ordering::AcqRel);
        let mut cur = self.hot.counters.load(Ordering::Acquire);
        if old == tagged {
            // Same epoch, same outcome: the counters do not change.
            return (tag_of(cur) == epoch).then(|| totals_of(cur));
        }
        let old_bits = (old & 0xFF) as u8;
        let old_epoch = (old >> 8) as u16;
        let (nc, nf, ns) = delta(bits);
        let (oc, of, os) = delta(old_bits);
        loop {
            let tag = tag_of(cur);
            let add = tag == epoch;
            let sub = old_bits != 0 && tag == old_epoch;
            if !add && !sub {
                return None;
            }
            let (a, b, c) = if add { (nc, nf, ns) } else { (0, 0, 0) };
            let (x, y, z) = if sub { (oc, of, os) } else { (0, 0, 0) };
            let (cc, ff, ss) = lanes(cur);
            let new = pack(
                tag,
                cc.wrapping_add(a).wrapping_sub(x),
                ff.wrapping_add(b).wrapping_sub(y),
                ss.wrapping_add(c).wrapping_sub(z),
            );
            match self.hot.counters.compare_exchange_weak(
                cur,
                new,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return add.then(|| totals_of(new)),
                Err(actual) => cur = actual,
            }
        }
    }

    /// Current totals if the window is in `epoch`, zeros otherwise.
    pub fn totals(&self, epoch: u16) -> Totals {
        let w = self.hot.counters.load(Ordering::Acquire);
        if tag_of(w) == epoch {
            totals_of(w)
        } else {
            Totals::default()
        }
    }
}

impl fmt::Debug for CountWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = self.hot.counters.load(Ordering::Relaxed);
        f.debug_struct("CountWindow")
            .field("size", &self.slots.len())
            .field("epoch", &tag_of(w))
            .field("totals", &totals_of(w))
            .finish()
    }
}

/// A window over the last `buckets` time buckets of `bucket_nanos` each.
///
/// A call completing at time `t` lands in bucket `t / bucket_nanos`; the
/// window at time `now` covers buckets `now/bucket_nanos - buckets + 1 ..=
/// now/bucket_nanos`, so it spans between `T - bucket` and `T` of history.
/// Each bucket is one packed atomic `[bucket index | calls | failures | slow]`;
/// a bucket whose index is out of the window counts as empty and is recycled
/// by the next write that lands on it. Per-bucket counts saturate at 32 767.
pub struct TimeWindow {
    buckets: Box<[AtomicU64]>,
    bucket_nanos: u64,
    last: AtomicU64,
}

/// Gap (in buckets) after which all buckets are swept, keeping 16-bit bucket
/// tags unambiguous.
const SWEEP_GAP: u64 = 16_384;

impl TimeWindow {
    /// `buckets` buckets (clamped to `1..=MAX_BUCKETS`) of `bucket_nanos` each.
    pub fn new(buckets: usize, bucket_nanos: u64) -> Self {
        let n = buckets.clamp(1, MAX_BUCKETS);
        let w = TimeWindow {
            buckets: (0..n).map(|_| AtomicU64::new(0)).collect(),
            bucket_nanos: bucket_nanos.max(1),
            last: AtomicU64::new(0),
        };
        w.reset(0, 0);
        w
    }

    /// Number of buckets.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Always false: a window has at least one bucket.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Bucket width in nanoseconds.
    pub fn bucket_nanos(&self) -> u64 {
        self.bucket_nanos
    }

    #[inline]
    fn index(&self, epoch: u64, now_nanos: u64) -> u64 {
        // Every epoch shifts the index space by a whole window, so buckets of
        // an earlier epoch are always out of range for the current one.
        now_nanos / self.bucket_nanos + epoch.wrapping_mul(self.buckets.len() as u64 + 1)
    }

    /// Empties the window for `epoch` (as of `now_nanos`).
    pub fn reset(&self, epoch: u64, now_nanos: u64) {
        let idx = self.index(epoch, now_nanos);
        let stale = idx.wrapping_sub(self.buckets.len() as u64) as u16;
        for b in self.buckets.iter() {
            b.store(pack(stale, 0, 0, 0), Ordering::Release);
        }
        self.last.store(idx, Ordering::Release);
    }

    /// Records an outcome that completed at `now_nanos` during `epoch`.
    /// Returns the window totals as of `now_nanos`, or `None` if the outcome
    /// is stale (a newer bucket already occupies its slot).
    #[inline]
    pub fn record(&self, epoch: u64, now_nanos: u64, failure: bool, slow: bool) -> Option<Totals> {
        let idx = self.index(epoch, now_nanos);
        self.maybe_sweep(idx);
        let tag = idx as u16;
        let (dc, df, ds) = delta(flags(failure, slow));
        let slot = &self.buckets[(idx % self.buckets.len() as u64) as usize];
        let mut cur = slot.load(Ordering::Acquire);
        loop {
            let ahead = tag_of(cur).wrapping_sub(tag) as i16;
            if ahead > 0 {
                return None;
            }
            let (c, f, s) = if ahead == 0 { lanes(cur) } else { (0, 0, 0) };
            if c >= 0x7FFF {
                break; // saturated bucket
            }
            let new = pack(tag, c + dc, f + df, s + ds);
            match slot.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        Some(self.totals_at_index(idx))
    }

    fn maybe_sweep(&self, idx: u64) {
        let last = self.last.load(Ordering::Relaxed);
        if idx <= last {
            return;
        }
        if idx - last < SWEEP_GAP {
            self.last.store(idx, Ordering::Relaxed);
            return;
        }
        // Long idle period: 16-bit bucket tags may alias, so one elected
        // writer retires every bucket. (Outcomes recorded concurrently with
        // this rare sweep may be lost.)
        if self
            .last
            .compare_exchange(last, idx, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            let stale = idx.wrapping_sub(self.buckets.len() as u64) as u16;
            for b in self.buckets.iter() {
                b.store(pack(stale, 0, 0, 0), Ordering::Release);
            }
        }
    }

    fn totals_at_index(&self, idx: u64) -> Totals {
        let last = self.last.load(Ordering::Relaxed);
        if idx > last && idx - last >= SWEEP_GAP {
            return Totals::default();
        }
        let tag = idx as u16;
        let n = self.buckets.len() as i32;
        let mut t = Totals::default();
        for b in self.buckets.iter() {
            let w = b.load(Ordering::Acquire);
            let age = i32::from(tag.wrapping_sub(tag_of(w)) as i16);
            if (0..n).contains(&age) {
                let x = totals_of(w);
                t.calls += x.calls;
                t.failures += x.failures;
                t.slow += x.slow;
            }
        }
        t
    }

    /// Totals of `epoch` as of `now_nanos`.
    pub fn totals(&self, epoch: u64, now_nanos: u64) -> Totals {
        self.totals_at_index(self.index(epoch, now_nanos))
    }
}

impl fmt::Debug for TimeWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimeWindow")
            .field("buckets", &self.buckets.len())
            .field("bucket_nanos", &self.bucket_nanos)
            .finish()
    }
}
