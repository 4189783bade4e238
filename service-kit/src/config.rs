//! Command-line and environment settings of the delivery machinery, shared by
//! every service that uses it (flatten [`DeliveryArgs`] into a clap parser).

use std::time::Duration;

use clap::Args;

use resilience::fault::{FaultConfig, FaultHandle, InvalidFaultConfig};
use resilience::foreground::GiveWay;
use resilience::idempotency::{IdempotencyConfig, IdempotencyReaper};
use resilience::outbox::RelayConfig;
use resilience::retry::Backoff;
use resilience::signing::{Secret, SecretError, Signer, Verifier, VerifierConfig};
use resilience::store::Db;

/// Outbox relay, retry, admin and fault-injection settings.
#[derive(Debug, Clone, Args)]
pub struct DeliveryArgs {
    /// Run the outbox relay in this process (false: API only; another
    /// replica delivers).
    #[arg(long, env = "RELAY_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub relay_enabled: bool,

    /// Messages the relay claims per round at most (and at most the free
    /// sends of RELAY_CONCURRENCY). Default: 512 on Postgres; 64 on
    /// SQLite, whose one writer larger claims and settlements would hold
    /// long enough to show in POST /orders' latency.
    #[arg(long, env = "RELAY_BATCH")]
    pub relay_batch: Option<i64>,

    /// Messages sent to one peer in one exchange at most (`POST /batch`,
    /// one transaction at the receiver); 1 sends each message alone.
    #[arg(long, env = "RELAY_SEND_BATCH", default_value_t = 64)]
    pub relay_send_batch: usize,

    /// Exchanges in flight to one peer at once: a message that finds fewer
    /// leaves at once, alone; the others wait and leave together.
    #[arg(long, env = "RELAY_PEER_EXCHANGES", default_value_t = 2)]
    pub relay_peer_exchanges: usize,

    /// Sends the relay keeps in flight at once (queued in the peer's
    /// exchanges: RELAY_SEND_BATCH × RELAY_PEER_EXCHANGES leave at a time).
    /// Default: 1024 on Postgres, 64 on SQLite (see RELAY_BATCH).
    #[arg(long, env = "RELAY_CONCURRENCY")]
    pub relay_concurrency: Option<usize>,

    /// How long a relay's claim on a message is exclusive.
    #[arg(long, env = "RELAY_LEASE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub relay_lease: Duration,

    /// Longest idle wait of the relay (new work wakes it at once).
    #[arg(long, env = "RELAY_POLL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub relay_poll: Duration,

    /// After a claim that found a partial batch, how long the relay waits
    /// before claiming again, so a steady stream goes out in larger batches
    /// (0s: claim on every wake-up). Work after a quiet spell is claimed at
    /// once.
    #[arg(long, env = "RELAY_LINGER", default_value = "50ms", value_parser = humantime::parse_duration)]
    pub relay_linger: Duration,

    /// Under a heavy stream the wait after a partial claim grows: one
    /// RELAY_LINGER per 32 messages the claim found, up to this (equal to
    /// RELAY_LINGER: no growth). A light stream keeps RELAY_LINGER.
    #[arg(long, env = "RELAY_MAX_LINGER", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub relay_max_linger: Duration,

    /// order-service: the relay gives way to `POST /orders` while this many
    /// are in flight or more: it waits up to RELAY_GIVE_WAY_WAIT before
    /// each claim, so a burst is written at the database's pace and
    /// delivered just after it (0: never give way). Default: 16 on
    /// Postgres; 0 on SQLite, whose one writer already keeps ingest at its
    /// ceiling while delivery runs, and where waiting cost end-to-end rate.
    #[arg(long, env = "RELAY_GIVE_WAY_AT")]
    pub relay_give_way_at: Option<usize>,

    /// The longest the relay waits for a quiet front door before it claims
    /// anyway: during a burst, one claim of an eighth of RELAY_BATCH per
    /// this long, enough to keep delivery moving and to see how far behind
    /// it is.
    #[arg(long, env = "RELAY_GIVE_WAY_WAIT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub relay_give_way_wait: Duration,

    /// The relay stops giving way once its last claim held a first attempt
    /// this old, until it catches up: with RELAY_GIVE_WAY_WAIT, the bound on
    /// the delay that giving way adds to a delivery.
    #[arg(long, env = "RELAY_GIVE_WAY_LAG", default_value = "6s", value_parser = humantime::parse_duration)]
    pub relay_give_way_lag: Duration,

    /// First retry delay ceiling (full jitter, doubling per attempt).
    #[arg(long, env = "RETRY_BASE", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub retry_base: Duration,

    /// Largest retry delay (also caps Retry-After).
    #[arg(long, env = "RETRY_CAP", default_value = "10s", value_parser = humantime::parse_duration)]
    pub retry_cap: Duration,

    /// Dead-letter a message after this many attempts (0: keep trying).
    #[arg(long, env = "MAX_ATTEMPTS", default_value_t = 0)]
    pub max_attempts: u32,

    /// Dead-letter a message still undelivered this long after it was
    /// enqueued (0s: no age limit). The sender's retry horizon: the
    /// receiver's IDEMPOTENCY_TTL must outlast it (checked at start-up).
    #[arg(long, env = "MAX_AGE", default_value = "23h", value_parser = humantime::parse_duration)]
    pub max_age: Duration,

    /// Delivered outbox rows are deleted after this long.
    #[arg(long, env = "OUTBOX_RETENTION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub outbox_retention: Duration,

    /// How long a completed idempotency key is remembered (and replayed).
    /// Must be above zero, and above MAX_AGE.
    #[arg(long, env = "IDEMPOTENCY_TTL", default_value = "24h", value_parser = parse_ttl)]
    pub idempotency_ttl: Duration,

    /// How often expired idempotency keys are deleted.
    #[arg(long, env = "IDEMPOTENCY_REAP_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub idempotency_reap_interval: Duration,

    /// Close a connection that has not sent a whole request head this long
    /// after it was ready for one (slowloris).
    #[arg(long, env = "SERVER_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_ttl)]
    pub server_header_timeout: Duration,

    /// Answer 503 to a request not answered this long after its head
    /// arrived (slow bodies, stuck handlers).
    #[arg(long, env = "SERVER_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_ttl)]
    pub server_request_timeout: Duration,

    /// Bearer token of the /admin endpoints (unset: admin endpoints are off).
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Shared secret that signs this service's calls to the other service
    /// (and verifies theirs). Required: a service refuses to start without
    /// it. Pass it through the environment, never on the command line.
    #[arg(long, env = "SERVICE_SECRET", hide_env_values = true)]
    pub service_secret: Option<Secret>,

    /// More secrets accepted when verifying, comma-separated (for rotation:
    /// the next secret before every service signs with it, the previous
    /// one until every service does).
    #[arg(
        long,
        env = "SERVICE_SECRETS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub service_secrets: Vec<Secret>,

    /// How far a signed request's timestamp may be from this server's clock
    /// (either way); also how long its nonce is remembered.
    #[arg(long, env = "SIGNATURE_WINDOW", default_value = "300s", value_parser = humantime::parse_duration)]
    pub signature_window: Duration,

    /// Fault injection: probability of dropping an outgoing request before it is sent.
    #[arg(long, env = "FAULT_DROP_REQUEST", default_value_t = 0.0)]
    pub fault_drop_request: f64,

    /// Fault injection: probability of losing the response after the peer processed the request.
    #[arg(long, env = "FAULT_DROP_RESPONSE", default_value_t = 0.0)]
    pub fault_drop_response: f64,

    /// Fault injection: probability of answering 503 without calling the peer.
    #[arg(long, env = "FAULT_503", default_value_t = 0.0)]
    pub fault_503: f64,

    /// Fault injection: probability of adding --fault-latency before a call.
    #[arg(long, env = "FAULT_LATENCY_RATE", default_value_t = 0.0)]
    pub fault_latency_rate: f64,

    /// Fault injection: the added latency.
    #[arg(long, env = "FAULT_LATENCY", default_value = "0ms", value_parser = humantime::parse_duration)]
    pub fault_latency: Duration,

    /// Fault injection: seed of the random source (same seed, same faults).
    #[arg(long, env = "FAULT_SEED", default_value_t = 1)]
    pub fault_seed: u64,

    /// Pull delivery: feed retention and the consumers' settings.
    #[command(flatten)]
    pub feed: crate::feeds::FeedArgs,
}

/// A duration above zero: a zero idempotency TTL would forget every key at
/// once, which turns deduplication off.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err(
            "must be above zero (a zero TTL forgets every key at once and turns \
                    deduplication off)"
                .into(),
        );
    }
    Ok(d)
}

/// Delivery settings that contradict each other.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidDeliveryArgs {
    /// IDEMPOTENCY_TTL is zero.
    #[error("IDEMPOTENCY_TTL must be above zero: a zero TTL turns deduplication off")]
    ZeroTtl,
    /// A retry could arrive after the receiver forgot the key.
    #[error(
        "MAX_AGE ({max_age}) must be shorter than IDEMPOTENCY_TTL ({ttl}): a message retried \
         after the receiver forgot its key would be processed twice"
    )]
    MaxAgeOutlastsTtl {
        /// MAX_AGE, formatted.
        max_age: String,
        /// IDEMPOTENCY_TTL, formatted.
        ttl: String,
    },
}

impl DeliveryArgs {
    /// Checks the settings against each other: the idempotency TTL is above
    /// zero and outlasts the retry horizon (`MAX_AGE`), assuming the peer
    /// runs with the same settings (the receiver's TTL must outlast the
    /// sender's `MAX_AGE`). `MAX_AGE=0s` (no limit) is allowed with a
    /// warning: retries past the TTL are then not de-duplicated.
    pub fn validate(&self) -> Result<(), InvalidDeliveryArgs> {
        if self.idempotency_ttl.is_zero() {
            return Err(InvalidDeliveryArgs::ZeroTtl);
        }
        if self.max_age.is_zero() {
            tracing::warn!(
                idempotency_ttl = %humantime::format_duration(self.idempotency_ttl),
                "MAX_AGE=0s: messages are retried forever, but idempotency keys are \
                 remembered only for IDEMPOTENCY_TTL; a retry after that is not de-duplicated"
            );
        } else if self.max_age >= self.idempotency_ttl {
            return Err(InvalidDeliveryArgs::MaxAgeOutlastsTtl {
                max_age: humantime::format_duration(self.max_age).to_string(),
                ttl: humantime::format_duration(self.idempotency_ttl).to_string(),
            });
        }
        Ok(())
    }

    /// The server's time limits.
    pub fn server_limits(&self) -> crate::ServerLimits {
        crate::ServerLimits {
            header_read_timeout: self.server_header_timeout,
            request_timeout: self.server_request_timeout,
        }
    }

    /// The fault handle these settings describe.
    pub fn faults(&self) -> Result<FaultHandle, InvalidFaultConfig> {
        let cfg = FaultConfig {
            drop_request: self.fault_drop_request,
            drop_response: self.fault_drop_response,
            error_503: self.fault_503,
            latency_rate: self.fault_latency_rate,
            latency: self.fault_latency,
        };
        FaultHandle::new(cfg, self.fault_seed)
    }

    /// The server-side idempotency settings for routes of `db` whose bodies
    /// are at most `max_body_bytes` (keys optional, scoped by `X-Client-Id`).
    pub fn idempotency(&self, db: Db, max_body_bytes: usize) -> IdempotencyConfig {
        IdempotencyConfig::new(db)
            .ttl(self.idempotency_ttl)
            .max_body_bytes(max_body_bytes)
    }

    /// The reaper of expired idempotency keys these settings describe.
    pub fn idempotency_reaper(&self, db: Db) -> IdempotencyReaper {
        IdempotencyReaper::new(db).interval(self.idempotency_reap_interval)
    }

    /// The signer of outgoing calls: `SERVICE_SECRET`, which must be set.
    pub fn signer(&self) -> Result<Signer, SecretError> {
        match &self.service_secret {
            Some(s) if !s.is_empty() => Signer::new(s.clone()),
            _ => Err(SecretError::Missing),
        }
    }

    /// The verifier of incoming service-to-service calls: `SERVICE_SECRET`
    /// and then `SERVICE_SECRETS`, reading bodies of at most
    /// `max_body_bytes` (larger: 413).
    pub fn verifier(&self, max_body_bytes: usize) -> Result<Verifier, SecretError> {
        if self.service_secret.as_ref().is_none_or(Secret::is_empty) {
            return Err(SecretError::Missing);
        }
        let secrets = self
            .service_secret
            .iter()
            .chain(&self.service_secrets)
            .filter(|s| !s.is_empty())
            .cloned();
        Verifier::new(
            VerifierConfig::new(secrets)
                .window(self.signature_window)
                .max_body_bytes(max_body_bytes),
        )
    }

    /// How the relay batches its sends (`None`: one request per message).
    pub fn send_batch(&self) -> Option<resilience::batch::BatchConfig> {
        (self.relay_send_batch > 1).then(|| resilience::batch::BatchConfig {
            // The batch route takes 256 requests at most.
            max_batch: self.relay_send_batch.min(256),
            max_in_flight: self.relay_peer_exchanges.max(1),
            unbatched_headers: vec![http::HeaderName::from_static(
                crate::memory_dedupe::MEMORY_DEDUPE_HEADER,
            )],
            ..resilience::batch::BatchConfig::default()
        })
    }

    /// When a background loop over a database of `backend` gives way to
    /// the front door (RELAY_GIVE_WAY_*), with a new gauge of it: count the
    /// front door's requests in `foreground` (see [`crate::front_door`]).
    pub fn give_way(&self, backend: resilience::store::Backend) -> GiveWay {
        let default = match backend {
            resilience::store::Backend::Postgres => 16,
            resilience::store::Backend::Sqlite => 0,
        };
        GiveWay {
            foreground: resilience::foreground::Foreground::new(
                self.relay_give_way_at.unwrap_or(default),
            ),
            max_wait: self.relay_give_way_wait,
            max_lag: self.relay_give_way_lag,
        }
    }

    /// The relay configuration these settings describe, for a relay over
    /// a database of `backend`.
    pub fn relay(&self, backend: resilience::store::Backend) -> RelayConfig {
        let defaults = RelayConfig::default();
        let (batch, concurrency) = match backend {
            resilience::store::Backend::Postgres => (defaults.batch_size, defaults.concurrency),
            resilience::store::Backend::Sqlite => (64, 64),
        };
        RelayConfig {
            batch_size: self.relay_batch.unwrap_or(batch).max(1),
            concurrency: self.relay_concurrency.unwrap_or(concurrency).max(1),
            lease: self.relay_lease,
            poll_interval: self.relay_poll,
            linger: self.relay_linger,
            max_linger: self.relay_max_linger,
            backoff: Backoff::new(self.retry_base, 2.0, self.retry_cap),
            max_attempts: (self.max_attempts > 0).then_some(self.max_attempts),
            max_age: (!self.max_age.is_zero()).then_some(self.max_age),
            retention: self.outbox_retention,
            ..defaults
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        delivery: DeliveryArgs,
    }

    fn parse(args: &[&str]) -> Result<DeliveryArgs, clap::Error> {
        let argv = std::iter::once("svc").chain(args.iter().copied());
        Cli::try_parse_from(argv).map(|c| c.delivery)
    }

    #[test]
    fn defaults_are_consistent() {
        let d = parse(&[]).unwrap();
        assert!(d.max_age > Duration::ZERO && d.max_age < d.idempotency_ttl);
        assert_eq!(d.validate(), Ok(()));
    }

    #[test]
    fn zero_ttl_is_refused() {
        for ttl in ["0s", "0ms", "0h"] {
            let err = parse(&["--idempotency-ttl", ttl]).unwrap_err();
            assert!(err.to_string().contains("above zero"), "{err}");
        }
        let mut d = parse(&[]).unwrap();
        d.idempotency_ttl = Duration::ZERO;
        assert_eq!(d.validate(), Err(InvalidDeliveryArgs::ZeroTtl));
    }

    #[test]
    fn max_age_must_be_shorter_than_ttl() {
        let d = parse(&["--max-age", "48h", "--idempotency-ttl", "24h"]).unwrap();
        assert!(matches!(
            d.validate(),
            Err(InvalidDeliveryArgs::MaxAgeOutlastsTtl { .. })
        ));
        let d = parse(&["--max-age", "1h", "--idempotency-ttl", "2h"]).unwrap();
        assert_eq!(d.validate(), Ok(()));
        let d = parse(&["--max-age", "0s"]).unwrap();
        assert_eq!(d.validate(), Ok(()));
    }
}
