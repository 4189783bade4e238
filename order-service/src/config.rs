//! Configuration, from flags or environment variables.

use std::net::IpAddr;
use std::time::Duration;

use clap::Parser;
use service_kit::config::DeliveryArgs;
use service_kit::DeliveryMode;
use service_kit::LogFormat;

/// order-service configuration. Every flag can also be set by the
/// environment variable named in `--help`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "order-service",
    version,
    about = "Takes orders and gets them to shipping-service"
)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "BIND_ADDR", default_value = "127.0.0.1")]
    pub bind: IpAddr,

    /// Port to listen on (0 picks a free port).
    #[arg(long, env = "PORT", default_value_t = 8080)]
    pub port: u16,

    /// sqlite:<file> (created if missing) or postgres://user@host/db.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite:data/order-service.db",
        hide_env_values = true
    )]
    pub database_url: String,

    /// Postgres schema holding this service's tables (ignored on SQLite).
    #[arg(long, env = "DB_SCHEMA", default_value = "order_service")]
    pub db_schema: String,

    /// How long start-up keeps retrying an unreachable database (with
    /// backoff) before it gives up.
    #[arg(long, env = "DB_CONNECT_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub db_connect_timeout: Duration,

    /// Database connection pool size.
    #[arg(long, env = "DB_MAX_CONNECTIONS", default_value_t = 8)]
    pub db_max_connections: u32,

    /// Base URL of shipping-service.
    #[arg(long, env = "SHIPPING_URL", default_value = "http://127.0.0.1:8081")]
    pub shipping_url: String,

    /// Timeout of each outgoing request to shipping-service.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// Delivery mode of orders that do not name one.
    #[arg(
        long,
        env = "DEFAULT_DELIVERY_MODE",
        default_value = "effectively-once"
    )]
    pub default_mode: DeliveryMode,

    /// Back-pressure: while more messages than this wait in the outbox,
    /// `POST /orders` answers 503 with Retry-After (0: no bound).
    #[arg(long, env = "MAX_PENDING", default_value_t = 50_000)]
    pub max_pending: u64,

    /// Group commit for `POST /orders`: how many groups of orders may be
    /// written at once. Orders that arrive while that many are being
    /// written wait and are then written together, in one transaction
    /// (each still answered as if alone). 0 turns grouping off. Default:
    /// 1 on SQLite (one writer), 2 on Postgres.
    #[arg(long, env = "GROUP_COMMIT")]
    pub group_commit: Option<usize>,

    /// Largest accepted request body, in bytes (larger: 413).
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,

    /// How long shutdown waits for in-flight requests and deliveries.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Log format: human or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "human")]
    pub log_format: LogFormat,

    /// Outbox relay, retries, admin token, fault injection.
    #[command(flatten)]
    pub delivery: DeliveryArgs,
}

impl Config {
    /// The defaults, as if no flag and no variable were given.
    pub fn defaults() -> Self {
        Config::parse_from(["order-service"])
    }
}
