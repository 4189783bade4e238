//! Build the service from its configuration, bind, and run until told to stop.
//! `main` and the tests start it the same way.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use resilience::feed::{FeedConsumer, FeedHandler, FeedLog};
use resilience::outbox::Relay;
use resilience::store::{Db, DbOptions};
use service_kit::feeds::{feed_name, spawn_producer, PullSource};
use service_kit::memory_dedupe::MemoryDedupe;
use service_kit::stack::Delivery;
use service_kit::DeliveryMode;
use service_kit::{serve_with_limits, Shutdown};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::orders::ReportAcks;
use crate::pull::{self, OrderFeedHandler};
use crate::routes::{router, AppState};
use crate::store::ShipmentStore;
use crate::warehouse::Warehouse;

/// A built, bound, not yet serving shipping-service.
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
        let addr = listener.local_addr()?;
        tracing::info!(%addr, backend = ?db.backend(), "shipping-service listening");
        let store = ShipmentStore::new(db.clone());
        // Pull modes: read order-service's orders feeds, one per mode. The
        // handlers append to this service's own feeds, so they share its log.
        let feed = FeedLog::new(db.clone());
        let pull = PullSource {
            url: format!("{}/orders/feed", config.order_url.trim_end_matches('/')),
            resource: pull::ORDERS,
            handlers: DeliveryMode::PULL
                .iter()
                .map(|m| {
                    let h: Arc<dyn FeedHandler> = Arc::new(OrderFeedHandler::new(
                        store.clone(),
                        feed.clone(),
                        config.warehouse_delay,
                        *m,
                    ));
                    (*m, h)
                })
                .collect(),
        };
        let delivery = Delivery::build(
            &db,
            &config.delivery,
            config.request_timeout,
            Arc::new(ReportAcks::new(store.clone())),
            pull,
        )
        .context("building the delivery stack")?;
        let warehouse = Warehouse::new(
            store.clone(),
            delivery.outbox,
            feed.clone(),
            delivery.plain,
            &config.order_url,
        )
        .with_linger(config.delivery.relay_linger);
        let state = AppState {
            warehouse,
            feed,
            memory: MemoryDedupe::new(config.max_body_bytes),
            store,
            admin: delivery.admin,
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
    /// requests finish, stops the warehouse and the relay after their current round (all
    /// within the grace period), and closes the database.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let grace = self.state.config.shutdown_grace;
        let db = self.state.store.db().clone();
        let background = Shutdown::new();
        let mut tasks = vec![tokio::spawn(
            self.state.warehouse.clone().run(background.wait()),
        )];
        tasks.push(
            self.state
                .config
                .delivery
                .idempotency_reaper(db.clone())
                .spawn(background.wait()),
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
        tracing::info!("shipping-service stopped");
        Ok(())
    }
}
