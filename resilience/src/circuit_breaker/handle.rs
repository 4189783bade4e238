//! The shared breaker state and its cloneable handle.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use super::clock::CoarseAnchor;
use super::config::{CircuitBreakerConfig, HalfOpenExpiry, SlidingWindow};
use super::error::CircuitOpen;
use super::window::{rate, CountWindow, TimeWindow, Totals};
use super::Outcome;

/// Breaker state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Calls pass and are recorded; the window may trip the breaker.
    Closed,
    /// Calls are rejected until the open duration has elapsed.
    Open,
    /// A limited number of probe calls pass; their outcome decides.
    HalfOpen,
    /// Manually opened: rejects everything until another manual transition.
    ForcedOpen,
    /// Manually disabled: everything passes, nothing is recorded.
    Disabled,
    /// Manually set: everything passes and is recorded, never trips.
    MetricsOnly,
}

const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;
const FORCED_OPEN: u64 = 3;
const DISABLED: u64 = 4;
const METRICS_ONLY: u64 = 5;

impl State {
    fn code(self) -> u64 {
        match self {
            State::Closed => CLOSED,
            State::Open => OPEN,
            State::HalfOpen => HALF_OPEN,
            State::ForcedOpen => FORCED_OPEN,
            State::Disabled => DISABLED,
            State::MetricsOnly => METRICS_ONLY,
        }
    }

    fn from_code(c: u64) -> State {
        match c {
            OPEN => State::Open,
            HALF_OPEN => State::HalfOpen,
            FORCED_OPEN => State::ForcedOpen,
            DISABLED => State::Disabled,
            METRICS_ONLY => State::MetricsOnly,
            _ => State::Closed,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half-open",
            State::ForcedOpen => "forced-open",
            State::Disabled => "disabled",
            State::MetricsOnly => "metrics-only",
        })
    }
}

/// A state change, delivered to the `on_state_change` callback and to
/// `subscribe()` receivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    /// Breaker name (the authority for registry-made breakers).
    pub name: Arc<str>,
    /// Previous state.
    pub from: State,
    /// New state.
    pub to: State,
    /// Generation of the new state; strictly increasing, so events can be
    /// ordered even when delivered from different threads.
    pub generation: u64,
    /// When the change happened (breaker clock).
    pub at: Instant,
}

/// A point-in-time view of a breaker.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Breaker name.
    pub name: Arc<str>,
    /// Current state (time-based transitions happen lazily on admission, so
    /// an open breaker whose time is up still reads `Open` here with
    /// `retry_after == Some(ZERO)`).
    pub state: State,
    /// Generation (number of transitions so far).
    pub generation: u64,
    /// Calls in the closed-state window (or probes completed in half-open).
    pub calls: u32,
    /// Failed calls among them.
    pub failures: u32,
    /// Slow calls among them.
    pub slow_calls: u32,
    /// Failure rate in percent.
    pub failure_rate: f64,
    /// Slow-call rate in percent.
    pub slow_call_rate: f64,
    /// Calls rejected since creation.
    pub rejected: u64,
    /// Consecutive openings without closing in between (drives backoff).
    pub consecutive_openings: u32,
    /// In open state, time left before probing.
    pub retry_after: Option<Duration>,
    /// In half-open, probe permits not yet taken.
    pub half_open_permits_available: u32,
}

// Stored once, inside the shared `Arc`; the padding makes `Count` large.
#[allow(clippy::large_enum_variant)]
enum Window {
    Count(CountWindow),
    Time(TimeWindow),
}

pub(crate) struct Shared {
    cfg: CircuitBreakerConfig,
    origin: Instant,
    /// The clock's coarse reading, anchored at `origin` (the default
    /// [`SystemClock`](super::SystemClock) on Linux).
    coarse: Option<CoarseAnchor>,
    /// `generation << 8 | state`; read on every call, written on
    /// transitions only, so it gets a cache line of its own.
    word: Padded<AtomicU64>,
    window: Window,
    /// `generation(32) << 32 | available permits`.
    permits: AtomicU64,
    /// Half-open probe results `[gen16 | done | failures | slow]`.
    probes: AtomicU64,
    open_until: AtomicU64,
    half_open_since: AtomicU64,
    openings: AtomicU32,
    rejected: AtomicU64,
    lock: Mutex<()>,
    events: broadcast::Sender<StateChange>,
    needs_time: bool,
    slow_nanos: u64,
    min_calls: u32,
}

#[repr(align(128))]
struct Padded<T>(T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

#[inline]
fn unpack(w: u64) -> (u64, u64) {
    (w >> 8, w & 0xFF)
}

fn dur_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum PermitKind {
    Closed = 0,
    MetricsOnly = 1,
    Probe = 2,
    Untracked = 3,
}

impl PermitKind {
    #[inline]
    fn from_bits(b: u64) -> Self {
        match b & 3 {
            0 => PermitKind::Closed,
            1 => PermitKind::MetricsOnly,
            2 => PermitKind::Probe,
            _ => PermitKind::Untracked,
        }
    }
}

/// An admission ticket. A probe permit that is dropped without completing
/// gives its half-open slot back.
///
/// NOTE: every field is a full word. A permit is moved several times per
/// call (into the service, out of it, into the response future); byte-sized
/// fields made the compiler write it piecemeal and read it back whole, a
/// store-forwarding stall that cost about a third of the closed path.
pub(crate) struct Permit {
    shared: Arc<Shared>,
    /// `generation << 2 | kind`.
    tag: u64,
    /// When the call was admitted (ns since the breaker's origin), if timed.
    start: u64,
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("gen", &self.gen())
            .field("kind", &self.kind())
            .finish()
    }
}

impl Permit {
    #[inline]
    fn gen(&self) -> u64 {
        self.tag >> 2
    }

    #[inline]
    fn kind(&self) -> PermitKind {
        PermitKind::from_bits(self.tag)
    }

    #[inline]
    pub(crate) fn complete(mut self, outcome: Outcome) {
        let tag = self.tag;
        // Spent: the drop below must not give a probe slot back.
        self.tag |= PermitKind::Untracked as u64;
        self.shared.on_complete(tag, self.start, outcome);
    }
}

impl Drop for Permit {
    #[inline]
    fn drop(&mut self) {
        if self.tag & 3 == PermitKind::Probe as u64 {
            self.shared.release_probe(self.gen());
        }
    }
}

impl Shared {
    fn new(cfg: CircuitBreakerConfig) -> Self {
        let (origin, coarse) = match cfg.clock.coarse_anchor() {
            Some((origin, anchor)) => (origin, Some(anchor)),
            None => (cfg.clock.now(), None),
        };
        let window = match cfg.window {
            SlidingWindow::Count(n) => Window::Count(CountWindow::new(n, 0)),
            SlidingWindow::Time { duration, buckets } => {
                let b = buckets.max(1);
                Window::Time(TimeWindow::new(b, dur_nanos(duration) / b as u64))
            }
        };
        let min_calls = match cfg.window {
            SlidingWindow::Count(n) => cfg.minimum_calls.min(u32::try_from(n).unwrap_or(u32::MAX)),
            SlidingWindow::Time { .. } => cfg.minimum_calls,
        };
        let (events, _) = broadcast::channel(cfg.event_capacity.max(1));
        Shared {
            needs_time: cfg.slow_call_duration.is_some() || matches!(window, Window::Time(_)),
            slow_nanos: cfg.slow_call_duration.map_or(u64::MAX, dur_nanos),
            min_calls: min_calls.max(1),
            origin,
            coarse,
            word: Padded(AtomicU64::new(CLOSED)),
            window,
            permits: AtomicU64::new(0),
            probes: AtomicU64::new(0),
            open_until: AtomicU64::new(0),
            half_open_since: AtomicU64::new(0),
            openings: AtomicU32::new(0),
            rejected: AtomicU64::new(0),
            lock: Mutex::new(()),
            events,
            cfg,
        }
    }

    #[inline]
    fn now_nanos(&self) -> u64 {
        self.nanos_at(self.clock_now())
    }

    /// The clock, never earlier than `origin` (so that `nanos_at` and
    /// `instant` round-trip exactly).
    #[inline]
    fn clock_now(&self) -> Instant {
        self.cfg.clock.now().max(self.origin)
    }

    /// Nanoseconds from `origin` to `at` (saturating), the same value as
    /// `dur_nanos(at - origin)` without the 128-bit detour.
    #[inline]
    fn nanos_at(&self, at: Instant) -> u64 {
        let d = at.saturating_duration_since(self.origin);
        d.as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(d.subsec_nanos()))
    }

    fn instant(&self, nanos: u64) -> Instant {
        self.origin + Duration::from_nanos(nanos)
    }

    fn reject(&self, state: State, now: u64, retry_after: Duration) -> CircuitOpen {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        CircuitOpen::new(state, self.instant(now), retry_after)
    }

    /// The open-state admission. While the coarse clock says the wait is
    /// far from over, a rejection without the precise clock: `until` is
    /// exact, `retry_after` the coarse clock's upper bound. Otherwise one
    /// precise read, and while the wait is not over a rejection built from
    /// that same reading. `Ok(now)` once the wait is over: the caller makes
    /// the open → half-open transition as of `now`.
    #[inline]
    fn reject_open(&self) -> Result<u64, CircuitOpen> {
        let until = self.open_until.load(Ordering::Acquire);
        if let Some(c) = &self.coarse {
            let floor = c.elapsed_floor();
            if floor.saturating_add(c.lag()) < until {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                return Err(CircuitOpen::with_until(
                    State::Open,
                    self.instant(until),
                    Duration::from_nanos(until - floor),
                ));
            }
        }
        let at = self.clock_now();
        let now = self.nanos_at(at);
        if now >= until {
            return Ok(now);
        }
        self.rejected.fetch_add(1, Ordering::Relaxed);
        // `at == instant(now)` (`at >= origin`, nanosecond resolution), so
        // this is the value `reject` would build.
        Err(CircuitOpen::new(
            State::Open,
            at,
            Duration::from_nanos(until - now),
        ))
    }

    /// Admits a call or says why not. The closed, untimed case is inlined
    /// into the caller (one load and an `Arc` clone); the rest is out of line.
    #[inline(always)]
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Result<Permit, CircuitOpen> {
        let (gen, st) = unpack(self.word.load(Ordering::Acquire));
        if st == CLOSED && !self.needs_time {
            return Ok(Permit {
                shared: Arc::clone(self),
                tag: (gen << 2) | PermitKind::Closed as u64,
                start: 0,
            });
        }
        self.try_acquire_slow()
    }

    #[inline(never)]
    fn try_acquire_slow(self: &Arc<Self>) -> Result<Permit, CircuitOpen> {
        loop {
            let (gen, st) = unpack(self.word.load(Ordering::Acquire));
            let kind = match st {
                CLOSED => PermitKind::Closed,
                METRICS_ONLY => PermitKind::MetricsOnly,
                DISABLED => PermitKind::Untracked,
                OPEN => {
                    let now = self.reject_open()?;
                    self.transition_if(gen, State::HalfOpen, now);
                    continue;
                }
                FORCED_OPEN => {
                    let now = self.now_nanos();
                    return Err(self.reject(State::ForcedOpen, now, self.cfg.open_duration.base));
                }
                _ => {
                    // Half-open.
                    let now = self.now_nanos();
                    let since = self.half_open_since.load(Ordering::Acquire);
                    let mut retry_after = self.cfg.open_duration.base;
                    if let Some(max) = self.cfg.max_wait_in_half_open {
                        let deadline = since.saturating_add(dur_nanos(max));
                        if now >= deadline {
                            self.expire_half_open(gen, now);
                            continue;
                        }
                        retry_after = Duration::from_nanos(deadline - now);
                    }
                    match self.take_probe(gen) {
                        Some(true) => PermitKind::Probe,
                        Some(false) => {
                            return Err(self.reject(State::HalfOpen, now, retry_after));
                        }
                        None => continue,
                    }
                }
            };
            let start = if self.needs_time && kind != PermitKind::Untracked {
                self.now_nanos()
            } else {
                0
            };
            return Ok(Permit {
                shared: Arc::clone(self),
                tag: (gen << 2) | kind as u64,
                start,
            });
        }
    }

    /// `Some(true)`: got a permit; `Some(false)`: none left; `None`: the
    /// generation moved on, re-read the state.
    fn take_probe(&self, gen: u64) -> Option<bool> {
        let g = gen as u32;
        let mut p = self.permits.load(Ordering::Acquire);
        loop {
            if (p >> 32) as u32 != g {
                return None;
            }
            if p & 0xFFFF_FFFF == 0 {
                return Some(false);
            }
            match self
                .permits
                .compare_exchange_weak(p, p - 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(true),
                Err(a) => p = a,
            }
        }
    }

    fn release_probe(&self, gen: u64) {
        let g = gen as u32;
        let _ = self
            .permits
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                ((p >> 32) as u32 == g).then_some(p + 1)
            });
    }

    /// Records a finished call. A plain success of a closed, untimed call on
    /// a count window is inlined into the caller; the rest is out of line.
    #[inline(always)]
    fn on_complete(&self, tag: u64, start: u64, outcome: Outcome) {
        let gen = tag >> 2;
        if tag & 3 == PermitKind::Closed as u64 && outcome == Outcome::Success && !self.needs_time {
            if let Window::Count(w) = &self.window {
                if let Some(t) = w.record(gen as u16, false, false) {
                    // A success can still complete `minimum_calls`.
                    if self.should_trip(&t) {
                        self.transition_if(gen, State::Open, self.now_nanos());
                    }
                }
                return;
            }
        }
        self.on_complete_slow(gen, PermitKind::from_bits(tag), start, outcome);
    }

    #[inline(never)]
    fn on_complete_slow(&self, gen: u64, kind: PermitKind, start: u64, outcome: Outcome) {
        if kind == PermitKind::Untracked {
            return;
        }
        if outcome == Outcome::Ignored {
            if kind == PermitKind::Probe {
                self.release_probe(gen);
            }
            return;
        }
        let now = if self.needs_time { self.now_nanos() } else { 0 };
        let slow = now.saturating_sub(start) >= self.slow_nanos;
        let failure = outcome == Outcome::Failure;
        match kind {
            PermitKind::Probe => self.record_probe(gen, failure, slow, now),
            _ => {
                let totals = match &self.window {
                    Window::Count(w) => w.record(gen as u16, failure, slow),
                    Window::Time(w) => w.record(gen, now, failure, slow),
                };
                if let Some(t) = totals {
                    if kind == PermitKind::Closed && self.should_trip(&t) {
                        let now = if self.needs_time {
                            now
                        } else {
                            self.now_nanos()
                        };
                        self.transition_if(gen, State::Open, now);
                    }
                }
            }
        }
    }

    #[inline]
    fn should_trip(&self, t: &Totals) -> bool {
        t.calls >= self.min_calls
            && ((t.failures > 0
                && f64::from(t.failures) * 100.0
                    >= self.cfg.failure_rate_threshold * f64::from(t.calls))
                || (t.slow > 0
                    && f64::from(t.slow) * 100.0
                        >= self.cfg.slow_call_rate_threshold * f64::from(t.calls)))
    }

    fn record_probe(&self, gen: u64, failure: bool, slow: bool, now: u64) {
        let tag = u64::from(gen as u16);
        let res = self
            .probes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w >> 48 == tag)
                    .then(|| w + (1 << 32) + (u64::from(failure) << 16) + u64::from(slow))
            });
        let Ok(prev) = res else { return };
        let w = prev + (1 << 32) + (u64::from(failure) << 16) + u64::from(slow);
        let done = ((w >> 32) & 0xFFFF) as u32;
        let fails = ((w >> 16) & 0xFFFF) as u32;
        let slows = (w & 0xFFFF) as u32;
        let n = self.cfg.half_open_permits;
        let over = |k: u32, thr: f64| k > 0 && f64::from(k) * 100.0 >= thr * f64::from(n);
        let now = if self.needs_time {
            now
        } else {
            self.now_nanos()
        };
        if over(fails, self.cfg.failure_rate_threshold)
            || over(slows, self.cfg.slow_call_rate_threshold)
        {
            // Recovery is already impossible: re-open without waiting.
            self.transition_if(gen, State::Open, now);
        } else if done >= n {
            self.transition_if(gen, State::Closed, now);
        }
    }

    fn expire_half_open(&self, gen: u64, now: u64) {
        let to = match self.cfg.half_open_expiry {
            HalfOpenExpiry::Reopen => State::Open,
            HalfOpenExpiry::JudgeCompleted => {
                let w = self.probes.load(Ordering::Acquire);
                let done = ((w >> 32) & 0xFFFF) as u32;
                let t = Totals {
                    calls: done,
                    failures: ((w >> 16) & 0xFFFF) as u32,
                    slow: (w & 0xFFFF) as u32,
                };
                let ok = w >> 48 == u64::from(gen as u16)
                    && done > 0
                    && t.failure_rate() < self.cfg.failure_rate_threshold
                    && t.slow_rate() < self.cfg.slow_call_rate_threshold;
                if ok {
                    State::Closed
                } else {
                    State::Open
                }
            }
        };
        self.transition_if(gen, to, now);
    }

    /// Transition if the generation is still `from_gen`.
    fn transition_if(&self, from_gen: u64, to: State, now: u64) -> bool {
        let change = {
            let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            let (gen, st) = unpack(self.word.load(Ordering::Acquire));
            if gen != from_gen {
                return false;
            }
            self.apply(gen, State::from_code(st), to, now)
        };
        self.emit(change);
        true
    }

    /// Unconditional (manual) transition.
    fn force(&self, to: State, reset_openings: bool) {
        let now = self.now_nanos();
        let change = {
            let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            if reset_openings {
                self.openings.store(0, Ordering::Release);
            }
            let (gen, st) = unpack(self.word.load(Ordering::Acquire));
            self.apply(gen, State::from_code(st), to, now)
        };
        self.emit(change);
    }

    /// Must hold the lock.
    fn apply(&self, gen: u64, from: State, to: State, now: u64) -> StateChange {
        let ng = (gen + 1) & (u64::MAX >> 8);
        match &self.window {
            Window::Count(w) => w.reset(ng as u16),
            Window::Time(w) => w.reset(ng, now),
        }
        self.probes
            .store(u64::from(ng as u16) << 48, Ordering::Release);
        match to {
            State::Open => {
                let n = if from == State::HalfOpen {
                    self.openings.load(Ordering::Acquire).saturating_add(1)
                } else {
                    0
                };
                self.openings.store(n, Ordering::Release);
                let d = self.cfg.open_duration.sample(n);
                self.open_until
                    .store(now.saturating_add(dur_nanos(d)), Ordering::Release);
            }
            State::HalfOpen => {
                self.permits.store(
                    (u64::from(ng as u32) << 32) | u64::from(self.cfg.half_open_permits),
                    Ordering::Release,
                );
                self.half_open_since.store(now, Ordering::Release);
            }
            State::Closed => self.openings.store(0, Ordering::Release),
            _ => {}
        }
        self.word.store((ng << 8) | to.code(), Ordering::Release);
        StateChange {
            name: Arc::clone(&self.cfg.name),
            from,
            to,
            generation: ng,
            at: self.instant(now),
        }
    }

    fn emit(&self, change: StateChange) {
        tracing::debug!(breaker = %change.name, from = %change.from, to = %change.to, "circuit breaker state change");
        if let Some(l) = &self.cfg.listener {
            l(&change);
        }
        let _ = self.events.send(change);
    }

    fn snapshot(&self) -> Snapshot {
        let (gen, st) = unpack(self.word.load(Ordering::Acquire));
        let state = State::from_code(st);
        let now = self.now_nanos();
        let t = if state == State::HalfOpen {
            let w = self.probes.load(Ordering::Acquire);
            Totals {
                calls: ((w >> 32) & 0xFFFF) as u32,
                failures: ((w >> 16) & 0xFFFF) as u32,
                slow: (w & 0xFFFF) as u32,
            }
        } else {
            match &self.window {
                Window::Count(w) => w.totals(gen as u16),
                Window::Time(w) => w.totals(gen, now),
            }
        };
        let retry_after = (state == State::Open).then(|| {
            Duration::from_nanos(self.open_until.load(Ordering::Acquire).saturating_sub(now))
        });
        let p = self.permits.load(Ordering::Acquire);
        Snapshot {
            name: Arc::clone(&self.cfg.name),
            state,
            generation: gen,
            calls: t.calls,
            failures: t.failures,
            slow_calls: t.slow,
            failure_rate: rate(t.failures, t.calls),
            slow_call_rate: rate(t.slow, t.calls),
            rejected: self.rejected.load(Ordering::Relaxed),
            consecutive_openings: self.openings.load(Ordering::Acquire),
            retry_after,
            half_open_permits_available: if state == State::HalfOpen
                && (p >> 32) as u32 == gen as u32
            {
                (p & 0xFFFF_FFFF) as u32
            } else {
                0
            },
        }
    }
}

/// A cloneable handle to one circuit breaker's shared state.
///
/// All services built from the same handle (and all clones of those
/// services) share the state. Use it for manual control, events and
/// snapshots, or to admit calls yourself with [`BreakerHandle::check`].
#[derive(Clone)]
pub struct BreakerHandle {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for BreakerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerHandle")
            .field("name", &self.shared.cfg.name)
            .field("state", &self.state())
            .finish()
    }
}

impl BreakerHandle {
    /// A new breaker in the closed state.
    pub fn new(config: CircuitBreakerConfig) -> Self {
        BreakerHandle {
            shared: Arc::new(Shared::new(config)),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &CircuitBreakerConfig {
        &self.shared.cfg
    }

    /// The breaker's name.
    pub fn name(&self) -> &str {
        &self.shared.cfg.name
    }

    /// Current state (no lazy time-based transition is performed).
    pub fn state(&self) -> State {
        State::from_code(unpack(self.shared.word.load(Ordering::Acquire)).1)
    }

    /// Counters and rates at this moment.
    pub fn snapshot(&self) -> Snapshot {
        self.shared.snapshot()
    }

    /// Receives every subsequent state change.
    pub fn subscribe(&self) -> broadcast::Receiver<StateChange> {
        self.shared.events.subscribe()
    }

    /// Would a call be admitted now? Performs the same lazy transitions as
    /// a real admission (open → half-open when due) and, in half-open,
    /// takes and immediately returns a probe permit.
    pub fn check(&self) -> Result<(), CircuitOpen> {
        self.shared.try_acquire().map(drop)
    }

    /// Admits one call for manual use (outside tower): record its outcome
    /// with [`CallPermit::record`]. Dropping the permit without recording
    /// gives a half-open probe slot back.
    pub fn acquire(&self) -> Result<CallPermit, CircuitOpen> {
        self.shared.try_acquire().map(|p| CallPermit { permit: p })
    }

    /// Back to closed with an empty window and the open backoff reset.
    pub fn reset(&self) {
        self.shared.force(State::Closed, true);
    }

    /// Manually close (window emptied).
    pub fn transition_to_closed(&self) {
        self.shared.force(State::Closed, false);
    }

    /// Manually open for one open duration (as if tripped).
    pub fn transition_to_open(&self) {
        self.shared.force(State::Open, false);
    }

    /// Manually move to half-open (fresh probe permits).
    pub fn transition_to_half_open(&self) {
        self.shared.force(State::HalfOpen, false);
    }

    /// Reject everything until another manual transition.
    pub fn transition_to_forced_open(&self) {
        self.shared.force(State::ForcedOpen, false);
    }

    /// Admit everything and record nothing.
    pub fn transition_to_disabled(&self) {
        self.shared.force(State::Disabled, false);
    }

    /// Admit everything, record outcomes, never trip.
    pub fn transition_to_metrics_only(&self) {
        self.shared.force(State::MetricsOnly, false);
    }
}

/// A manually driven admission (see [`BreakerHandle::acquire`]).
#[derive(Debug)]
pub struct CallPermit {
    permit: Permit,
}

impl CallPermit {
    /// Records the call's outcome.
    pub fn record(self, outcome: Outcome) {
        self.permit.complete(outcome);
    }
}
