//! Build the service from its configuration, bind, and run until told to stop.
//! `main` and the tests start it the same way.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use resilience::feed::{FeedConsumer, FeedHandler};
use resilience::outbox::Relay;
use resilience::store::{Db, DbOptions};
use service_kit::feeds::{feed_name, spawn_producer, PullSource};
use service_kit::memory_dedupe::MemoryDedupe;
use service_kit::stack::Delivery;
use service_kit::DeliveryMode;
use service_kit::{serve_with_limits, Shutdown};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::pull::{self, ShipmentFeedHandler};
use crate::routes::{router, AppState};
use crate::shipping::ShipmentAcks;
use crate::store::OrderStore;

/// A built, bound, not yet serving order-service.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    state: AppState,
    relay: Relay,
    consumers: Vec<FeedConsumer>,
}

impl Application {
    /// Opens the database, applies migrations, binds the configured address.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let listener = TcpListener::bind((config.bind, config.port))
            .await
            .with_context(|| format!("binding {}:{}", config.bind, config.port))?;
        Self::build_with_listener(config, listener).await
    }

    /// As [`Application::build`], on a listener the caller bound already
    /// (tests bind both services' ports before either starts).
    pub async fn build_with_listener(
        config: Config,
        listener: TcpListener,
    ) -> anyhow::Result<Self> {
        // Refuse to start without a usable SERVICE_SECRET, before any work.
        let verifier = config.delivery.verifier(config.max_body_bytes).context(
            "SERVICE_SECRET must be set, the same on both services, through the \
                 environment: service-to-service calls are signed and verified with it",
        )?;
        let mut opts = DbOptions::new(&config.database_url, &config.db_schema);
        opts.max_connections = config.db_max_connections;
        opts.connect_timeout = config.db_connect_timeout;
        let db = Db::connect(&opts).await.context("opening the database")?;
        db.migrate(sqlx::migrate!("./migrations"))
            .await
            .context("applying migrations")?;
        db.migrate_resilience()
            .await
            .context("applying the outbox migrations")?;
        let store = OrderStore::new(db.clone());
        // Pull modes: read shipping's shipments feeds, one per mode.
        let pull = PullSource {
            url: format!(
                "{}/shipments/feed",
                config.shipping_url.trim_end_matches('/')
            ),
            resource: pull::SHIPMENTS,
            handlers: DeliveryMode::PULL
                .iter()
                .map(|m| {
                    let h: Arc<dyn FeedHandler> = Arc::new(ShipmentFeedHandler::new(store.clone()));
                    (*m, h)
                })
                .collect(),
        };
        let delivery = Delivery::build(
            &db,
            &config.delivery,
            config.request_timeout,
            Arc::new(ShipmentAcks::new(store.clone())),
            pull,
        )
        .context("building the delivery stack")?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, backend = ?db.backend(), "order-service listening");
        let state = AppState {
            store,
            outbox: delivery.outbox,
            plain: delivery.plain,
            feed: delivery.feed,
            memory: MemoryDedupe::new(config.max_body_bytes),
            backlog: crate::backlog::Backlog::new(config.max_pending),
            admin: delivery.admin,
            give_way: delivery.give_way,
            verifier,
            config: Arc::new(config),
        };
        Ok(Self {
            listener,
            addr,
            state,
            relay: delivery.relay,
            consumers: delivery.consumers,
        })
    }

    /// The bound port (useful with port 0).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The database handle (tests read invariants through it).
    pub fn db(&self) -> &Db {
        self.state.store.db()
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight
    /// requests finish, stops the relay after its sends in flight (all within
    /// the grace period), and closes the database.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let grace = self.state.config.shutdown_grace;
        let db = self.state.store.db().clone();
        let background = Shutdown::new();
        let mut tasks = Vec::new();
        tasks.push(
            self.state
                .config
                .delivery
                .idempotency_reaper(db.clone())
                .spawn(background.wait()),
        );
        tasks.push(
            self.state
                .backlog
                .spawn(self.state.outbox.clone(), background.token()),
        );
        let feeds = DeliveryMode::PULL
            .iter()
            .map(|m| feed_name(pull::RESOURCE, *m))
            .collect();
        tasks.extend(spawn_producer(
            &self.state.feed,
            feeds,
            self.state.config.delivery.feed.feed_retention,
            background.token(),
        ));
        if self.state.config.delivery.relay_enabled {
            tasks.push(tokio::spawn(self.relay.run(background.token())));
            for c in self.consumers {
                tasks.push(tokio::spawn(c.run(background.token())));
            }
        } else {
            // No relay here, yet other replicas' relays must hear of this
            // replica's enqueues: its coalesced pg_notify needs a task.
            tasks.push(self.relay.outbox().spawn_wakeups(background.token()));
        }
        let limits = self.state.config.delivery.server_limits();
        serve_with_limits(
            self.listener,
            router(self.state),
            limits,
            shutdown,
            grace,
            background,
            tasks,
        )
        .await
        .context("serving HTTP")?;
        // Bounded: a connection stuck on a silent network must not keep a
        // stopping service alive past its grace period for long.
        db.close_within(service_kit::DB_CLOSE_LIMIT).await;
        tracing::info!("order-service stopped");
        Ok(())
    }
}
