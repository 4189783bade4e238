//! The outgoing client stacks, assembled in one place.
//!
//! Read a stack from the top (the caller) down to the wire:
//!
//! ```text
//! durable (outbox relay)          plain (at-most-once)
//! ──────────────────────          ────────────────────
//! idempotency key stamp
//! circuit breaker per destination
//! timeout                         timeout
//! HMAC signature                  HMAC signature
//! fault injection                 fault injection
//! batching (POST /batch)
//! HTTP client (pooled reqwest)    HTTP client (pooled reqwest)
//! ```
//!
//! The signature is made per call, below the relay's retry loop and above
//! the wire: every attempt (an outbox retry an hour later too) carries a
//! fresh timestamp and nonce, and the idempotency key stamped above is
//! among what is signed.

use std::time::Duration;

use tower::util::BoxCloneSyncService;
use tower::{BoxError, Layer, ServiceBuilder, ServiceExt};

use resilience::batch::{BatchConfig, BatchLayer};
use resilience::circuit_breaker::{
    BreakerRegistry, CircuitBreakerConfig, OpenDuration, PerAuthorityLayer,
};
use resilience::client::{ClientError, HttpClient};
use resilience::fault::{FaultHandle, FaultLayer};
use resilience::idempotency::IdempotencyKeyLayer;
use resilience::signing::{SecretError, SignRequestLayer, Signer};

pub use resilience::SendService;

/// What the stacks are made from.
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// Per-request timeout (covers injected latency too).
    pub timeout: Duration,
    /// Faults to inject (all rates zero unless configured).
    pub faults: FaultHandle,
    /// Signs every call (`None`: unsigned, for library tests; the services
    /// refuse to start without a secret).
    pub signer: Option<Signer>,
}

/// The breaker configuration the services use for each destination: judged on
/// the last 20 calls once 10 were made, opening at 50 % failures (or 80 %
/// calls slower than 1 s), for 500 ms doubling to 10 s with jitter on
/// consecutive openings, with 5 probes in half-open.
///
/// NOTE: 5 probes rather than 2 so that recovery is judged on a rate, not
/// on luck. A peer that fails 40 % of calls closes again when 3 of the 5
/// probes succeed, which happens 68 % of the time. With 2 probes both had
/// to succeed, which happens 36 % of the time. Each miss doubled the open
/// time, and under the lab's heavy fault profiles delivery stalled for
/// many seconds.
pub fn default_breaker() -> CircuitBreakerConfig {
    let built = CircuitBreakerConfig::builder()
        .count_window(20)
        .minimum_calls(10)
        .failure_rate_threshold(50.0)
        .slow_call_duration(Duration::from_secs(1))
        .slow_call_rate_threshold(80.0)
        .half_open_permits(5)
        // Counted as they happen; the closed path stays free of metrics.
        .on_state_change(crate::metrics::count_transition)
        .open_backoff(
            OpenDuration::exponential(Duration::from_millis(500), 2.0, Duration::from_secs(10))
                .with_jitter(0.2),
        )
        .build();
    // NOTE: the values above are constants that pass validation; the
    // fallback only guards against a future change that breaks them.
    built.unwrap_or_default()
}

/// The at-most-once stack: one call, a timeout, faults if configured.
pub fn plain(cfg: &StackConfig) -> Result<SendService, ClientError> {
    plain_with(cfg, None)
}

/// [`plain`], and with `batch` the requests waiting for one peer leave in
/// one exchange (below the faults, so every layer above still sees one
/// request per message).
fn plain_with(cfg: &StackConfig, batch: Option<BatchConfig>) -> Result<SendService, ClientError> {
    let client = HttpClient::new(cfg.timeout)?;
    let client: SendService = match batch {
        Some(batch) => BoxCloneSyncService::new(BatchLayer::new(batch).layer(client)),
        None => BoxCloneSyncService::new(client.map_err(BoxError::from)),
    };
    let svc = ServiceBuilder::new()
        // Outermost: bounds the whole call, injected latency included.
        .timeout(cfg.timeout)
        // Each call is signed as it is made, so a retry is signed afresh.
        .option_layer(cfg.signer.clone().map(SignRequestLayer::new))
        // Faults sit next to the wire so every layer above sees them as the
        // network's doing.
        .layer(FaultLayer::from_handle(cfg.faults.clone()))
        .service(client)
        .map_err(BoxError::from);
    Ok(BoxCloneSyncService::new(svc))
}

/// The outbox relay's stack: the plain stack behind a breaker per destination
/// (so an outage is stopped early and the relay defers instead of spinning)
/// and a stamp of the message's idempotency key.
pub fn durable(cfg: &StackConfig, breakers: BreakerRegistry) -> Result<SendService, ClientError> {
    durable_batched(cfg, breakers, None)
}

/// [`durable`], sending the messages that wait for one peer together
/// (`POST /batch`, see [`resilience::batch`]) when `batch` is given.
pub fn durable_batched(
    cfg: &StackConfig,
    breakers: BreakerRegistry,
    batch: Option<BatchConfig>,
) -> Result<SendService, ClientError> {
    let plain = plain_with(cfg, batch)?;
    let svc = ServiceBuilder::new()
        // The message id becomes the `Idempotency-Key` header of messages
        // that asked for one (effectively-once).
        .layer(IdempotencyKeyLayer::new())
        // One breaker per host:port; a rejection is a `CircuitOpen` error
        // carrying when to try again, which the relay turns into a deferral.
        .layer(PerAuthorityLayer::new(breakers))
        .service(plain);
    Ok(BoxCloneSyncService::new(svc))
}

/// Why the delivery machinery could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The fault settings are out of range.
    #[error(transparent)]
    Faults(#[from] resilience::fault::InvalidFaultConfig),
    /// The HTTP client could not be created.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The settings contradict each other.
    #[error(transparent)]
    Config(#[from] crate::config::InvalidDeliveryArgs),
    /// `SERVICE_SECRET` is missing or unusable.
    #[error("SERVICE_SECRET: {0} (service-to-service calls are signed with it; set the same secret on both services, through the environment)")]
    Secret(#[from] SecretError),
}

/// Everything a service needs to send: the outbox, its relay, the plain
/// stack for at-most-once calls, and the admin view over them.
#[derive(Debug)]
pub struct Delivery {
    /// Enqueue here, in the business transaction.
    pub outbox: resilience::outbox::Outbox,
    /// The at-most-once stack.
    pub plain: SendService,
    /// The relay; run it as a background task.
    pub relay: resilience::outbox::Relay,
    /// This service's event log (pull modes, producer side).
    pub feed: resilience::feed::FeedLog,
    /// The consumers of the other service's feeds (pull modes); run each as
    /// a background task.
    pub consumers: Vec<resilience::feed::FeedConsumer>,
    /// What the /admin endpoints act on.
    pub admin: crate::admin::AdminState,
    /// How the relay gives way to the front door (RELAY_GIVE_WAY_*): count
    /// the requests that take work in with [`crate::front_door`] in its
    /// `foreground`. Nothing counted, nothing waits.
    pub give_way: resilience::foreground::GiveWay,
}

impl Delivery {
    /// Builds the stacks, the relay and the feed consumers of `pull` from
    /// the shared settings.
    pub fn build(
        db: &resilience::store::Db,
        args: &crate::config::DeliveryArgs,
        timeout: Duration,
        handler: std::sync::Arc<dyn resilience::outbox::DeliveryHandler>,
        pull: crate::feeds::PullSource,
    ) -> Result<Self, BuildError> {
        args.validate()?;
        // /metrics is an admin path: no recorder unless admin is on.
        if args
            .admin_token
            .as_deref()
            .is_some_and(|t| !t.trim().is_empty())
        {
            crate::metrics::install();
        }
        let cfg = StackConfig {
            timeout,
            faults: args.faults()?,
            signer: Some(args.signer()?),
        };
        let breakers = BreakerRegistry::new(default_breaker(), 64);
        let outbox = resilience::outbox::Outbox::new(db.clone());
        let give_way = args.give_way(db.backend());
        let relay = resilience::outbox::Relay::new(
            outbox.clone(),
            durable_batched(&cfg, breakers.clone(), args.send_batch())?,
            handler,
            resilience::outbox::RelayConfig {
                give_way: give_way.clone(),
                ..args.relay(db.backend())
            },
        );
        // The consumers long-poll: their requests may take the long-poll
        // wait plus the usual timeout. Same breakers, same faults, and
        // signed like every service-to-service call (the feeds are private).
        let feed_stack = durable(
            &StackConfig {
                timeout: timeout + args.feed.feed_wait,
                ..cfg.clone()
            },
            breakers.clone(),
        )?;
        let consumers = args.feed.consumers(db, &feed_stack, pull);
        let handles: Vec<_> = consumers.iter().map(|c| c.handle()).collect();
        Ok(Self {
            plain: plain(&cfg)?,
            admin: crate::admin::AdminState {
                outbox: outbox.clone(),
                breakers,
                faults: cfg.faults,
                // An empty token is refused by the admin middleware itself.
                token: args.admin_token.as_deref().map(std::sync::Arc::from),
                feeds: std::sync::Arc::new(handles),
                db: db.clone(),
            },
            feed: resilience::feed::FeedLog::new(db.clone()),
            consumers,
            outbox,
            relay,
            give_way,
        })
    }
}
