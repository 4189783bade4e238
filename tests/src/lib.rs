//! Test harness: starts order-service and shipping-service the way `main`
//! does (in this process, on OS-chosen ports), each test on a database of its
//! own, and counts the delivery invariants from both databases.
//!
//! # Layout
//!
//! - [`TestBackend`] and [`TestDatabases`]: a fresh SQLite directory or a fresh
//!   Postgres database per test.
//! - [`Stack`]: both services running, with one method per endpoint.
//! - [`audit`]: lost / duplicated / unacknowledged, counted from the databases.
//! - [`eventually`]: await a condition under a deadline.

pub use demo::audit;

pub mod pgproxy;

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use resilience::store::Db;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use resilience::store::Backend as TestBackend;
use service_kit::testing::TestDatabase;

/// The databases of one test (both services share one Postgres database in
/// schemas of their own, or have a SQLite file each).
#[derive(Debug)]
pub struct TestDatabases {
    /// `DATABASE_URL` for order-service.
    pub order_url: String,
    /// `DATABASE_URL` for shipping-service.
    pub shipping_url: String,
    inner: TestDatabase,
}

impl TestDatabases {
    /// Fresh, empty databases.
    pub async fn create(backend: TestBackend) -> anyhow::Result<Self> {
        let inner = TestDatabase::create(backend)
            .await
            .context("creating the test database (is Postgres running? see .ci/run)")?;
        Ok(Self {
            order_url: inner.url("order"),
            shipping_url: inner.url("shipping"),
            inner,
        })
    }

    /// Which backend.
    pub fn backend(&self) -> TestBackend {
        self.inner.backend()
    }

    /// Opens order-service's database the way the service does.
    pub async fn order_db(&self) -> anyhow::Result<Db> {
        Ok(self.inner.connect("order", "order_service").await?)
    }

    /// Opens shipping-service's database the way the service does.
    pub async fn shipping_db(&self) -> anyhow::Result<Db> {
        Ok(self.inner.connect("shipping", "shipping_service").await?)
    }

    /// Drops the Postgres database (the SQLite directory goes with `self`).
    pub async fn cleanup(self) {
        self.inner.cleanup().await;
    }
}

/// Settings a test may change before the stack starts.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// shipping-service's warehouse delay.
    pub warehouse_delay: Duration,
    /// Outgoing request timeout of both services.
    pub request_timeout: Duration,
    /// Start shipping-service (false: nothing listens on its port until
    /// [`Stack::start_shipping`]).
    pub start_shipping: bool,
    /// Adjusts order-service's configuration before it starts.
    pub order: fn(&mut order_service::Config),
    /// Adjusts shipping-service's configuration before it starts.
    pub shipping: fn(&mut shipping_service::Config),
}

/// The admin token of test stacks.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// The `SERVICE_SECRET` of in-process test stacks (process stacks get a
/// random one from [`demo::cluster::Cluster`], through the environment).
pub const SERVICE_SECRET: &str = "test-service-secret-0123456789";

/// A signer with the test stacks' secret, for the tests' own
/// service-to-service calls.
pub fn signer() -> resilience::signing::Signer {
    match resilience::signing::Signer::new(SERVICE_SECRET.into()) {
        Ok(s) => s,
        Err(e) => panic!("the test secret is invalid: {e}"),
    }
}

/// Builds `req`, signs it as a peer service would (method, path and query,
/// signed headers, body), and sends it.
pub async fn send_signed(
    http: &reqwest::Client,
    req: reqwest::RequestBuilder,
) -> anyhow::Result<reqwest::Response> {
    send_signed_with(&signer(), http, req).await
}

/// As [`send_signed`], with the secret of a process cluster
/// ([`demo::cluster::Cluster::service_secret`]).
pub async fn send_signed_as(
    secret: &str,
    http: &reqwest::Client,
    req: reqwest::RequestBuilder,
) -> anyhow::Result<reqwest::Response> {
    let signer = resilience::signing::Signer::new(secret.into())
        .map_err(|e| anyhow::anyhow!("the cluster's secret is invalid: {e}"))?;
    send_signed_with(&signer, http, req).await
}

async fn send_signed_with(
    signer: &resilience::signing::Signer,
    http: &reqwest::Client,
    req: reqwest::RequestBuilder,
) -> anyhow::Result<reqwest::Response> {
    let mut req = req.build()?;
    let uri: http::Uri = req.url().as_str().parse()?;
    let body = req
        .body()
        .and_then(|b| b.as_bytes())
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    let method = req.method().clone();
    signer.sign(&method, &uri, req.headers_mut(), &body);
    Ok(http.execute(req).await?)
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            warehouse_delay: Duration::from_millis(50),
            request_timeout: Duration::from_secs(2),
            start_shipping: true,
            order: |_| {},
            shipping: |_| {},
        }
    }
}

/// One running service: its address and how to stop it.
#[derive(Debug)]
pub struct Running {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    fn spawn<F>(url: String, run: impl FnOnce(oneshot::Receiver<()>) -> F) -> Self
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        Self {
            url,
            stop: Some(tx),
            task: Some(tokio::spawn(run(rx))),
        }
    }

    /// Graceful shutdown; returns the service's result.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(t) => t.await?,
            None => Ok(()),
        }
    }
}

async fn stopped(rx: oneshot::Receiver<()>) {
    let _ = rx.await;
}

/// Both services, running in this process on their own ports and databases.
#[derive(Debug)]
pub struct Stack {
    /// order-service.
    pub order: Running,
    /// shipping-service (not started when `start_shipping` was false).
    pub shipping: Option<Running>,
    /// The shipping URL order-service was given.
    pub shipping_url: String,
    /// The databases.
    pub dbs: TestDatabases,
    /// A client for the tests' own calls.
    pub http: reqwest::Client,
    shipping_listener: Option<TcpListener>,
    opts: StackOptions,
}

impl Stack {
    /// Starts both services on fresh databases.
    pub async fn start(backend: TestBackend, opts: StackOptions) -> anyhow::Result<Self> {
        init_logs();
        let dbs = TestDatabases::create(backend).await?;
        let order_listener = TcpListener::bind("127.0.0.1:0").await?;
        let shipping_listener = TcpListener::bind("127.0.0.1:0").await?;
        let order_url = format!("http://{}", order_listener.local_addr()?);
        let shipping_url = format!("http://{}", shipping_listener.local_addr()?);

        let mut oc = order_service::Config::defaults();
        oc.database_url = dbs.order_url.clone();
        oc.db_schema = "order_service".into();
        oc.shipping_url = shipping_url.clone();
        oc.request_timeout = opts.request_timeout;
        oc.shutdown_grace = Duration::from_secs(5);
        oc.delivery.admin_token = Some(ADMIN_TOKEN.into());
        // In-process: the secret is set on the configuration, not on argv.
        oc.delivery.service_secret = Some(SERVICE_SECRET.into());
        oc.delivery.relay_poll = Duration::from_millis(200);
        (opts.order)(&mut oc);
        let order_app = order_service::Application::build_with_listener(oc, order_listener).await?;
        let order = Running::spawn(order_url.clone(), |rx| async move {
            order_app.run_until_stopped(stopped(rx)).await
        });

        let mut stack = Self {
            order,
            shipping: None,
            shipping_url,
            dbs,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            shipping_listener: Some(shipping_listener),
            opts: opts.clone(),
        };
        if opts.start_shipping {
            stack.start_shipping().await?;
        } else {
            // Nothing may listen: a reserved but idle listener would accept
            // connections and hand their stale requests to the service later.
            stack.shipping_listener = None;
        }
        Ok(stack)
    }

    /// Starts shipping-service on its reserved port (again, after [`Stack::stop_shipping`]).
    pub async fn start_shipping(&mut self) -> anyhow::Result<()> {
        let listener = match self.shipping_listener.take() {
            Some(l) => l,
            None => {
                let addr = self.shipping_url.trim_start_matches("http://").to_string();
                bind_retrying(&addr).await?
            }
        };
        let mut sc = shipping_service::Config::defaults();
        sc.database_url = self.dbs.shipping_url.clone();
        sc.db_schema = "shipping_service".into();
        sc.order_url = self.order.url.clone();
        sc.warehouse_delay = self.opts.warehouse_delay;
        sc.request_timeout = self.opts.request_timeout;
        sc.shutdown_grace = Duration::from_secs(5);
        sc.delivery.admin_token = Some(ADMIN_TOKEN.into());
        // In-process: the secret is set on the configuration, not on argv.
        sc.delivery.service_secret = Some(SERVICE_SECRET.into());
        sc.delivery.relay_poll = Duration::from_millis(200);
        (self.opts.shipping)(&mut sc);
        let app = shipping_service::Application::build_with_listener(sc, listener).await?;
        self.shipping = Some(Running::spawn(self.shipping_url.clone(), |rx| async move {
            app.run_until_stopped(stopped(rx)).await
        }));
        Ok(())
    }

    /// Stops shipping-service gracefully; its port stops answering.
    pub async fn stop_shipping(&mut self) -> anyhow::Result<()> {
        // A reserved, never-started listener would accept connections: drop it.
        self.shipping_listener = None;
        if let Some(mut s) = self.shipping.take() {
            s.stop().await?;
        }
        Ok(())
    }

    /// Stops both services and drops the databases.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop_shipping().await?;
        self.order.stop().await?;
        self.dbs.cleanup().await;
        Ok(())
    }

    /// `POST /orders` with a JSON body.
    pub async fn post_order(&self, body: &Value) -> anyhow::Result<reqwest::Response> {
        Ok(self
            .http
            .post(format!("{}/orders", self.order.url))
            .json(body)
            .send()
            .await?)
    }

    /// Creates a valid order in `mode` and returns its JSON.
    pub async fn create_order(&self, mode: &str) -> anyhow::Result<Value> {
        let res = self.post_order(&sample_order(mode)).await?;
        anyhow::ensure!(res.status() == 201, "create order: {}", res.status());
        Ok(res.json().await?)
    }

    /// Creates `n` orders in `mode`, one after another; their ids.
    pub async fn create_orders(&self, mode: &str, n: usize) -> anyhow::Result<Vec<String>> {
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            let order = self.create_order(mode).await?;
            ids.push(order["id"].as_str().unwrap_or_default().to_string());
        }
        Ok(ids)
    }

    /// `GET /orders/{id}` as JSON (panics on a non-200 answer).
    pub async fn order(&self, id: &str) -> anyhow::Result<Value> {
        let res = self
            .http
            .get(format!("{}/orders/{id}", self.order.url))
            .send()
            .await?;
        anyhow::ensure!(res.status() == 200, "get order {id}: {}", res.status());
        Ok(res.json().await?)
    }

    /// `GET` any path of order-service.
    pub async fn get_order_path(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        Ok(self
            .http
            .get(format!("{}{path}", self.order.url))
            .send()
            .await?)
    }

    /// `GET` any path of shipping-service.
    pub async fn get_shipping_path(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        Ok(self
            .http
            .get(format!("{}{path}", self.shipping_url))
            .send()
            .await?)
    }

    /// `POST /orders/{id}/shipment-events`, signed as shipping-service does.
    pub async fn post_event(
        &self,
        order_id: &str,
        body: &Value,
    ) -> anyhow::Result<reqwest::Response> {
        let req = self
            .http
            .post(format!(
                "{}/orders/{order_id}/shipment-events",
                self.order.url
            ))
            .json(body);
        send_signed(&self.http, req).await
    }

    /// Builds, signs and sends a request as a peer service would.
    pub async fn send_signed(
        &self,
        req: reqwest::RequestBuilder,
    ) -> anyhow::Result<reqwest::Response> {
        send_signed(&self.http, req).await
    }

    /// Shipments of an order, read from shipping-service's API.
    pub async fn shipments_of(&self, order_id: &str) -> anyhow::Result<Vec<Value>> {
        let res = self
            .get_shipping_path(&format!("/shipments?order_id={order_id}"))
            .await?;
        anyhow::ensure!(res.status() == 200, "list shipments: {}", res.status());
        let page: Value = res.json().await?;
        Ok(page["shipments"].as_array().cloned().unwrap_or_default())
    }
}

async fn bind_retrying(addr: &str) -> anyhow::Result<TcpListener> {
    let mut last = None;
    for _ in 0..50 {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(anyhow::anyhow!("cannot bind {addr}: {last:?}"))
}

impl Stack {
    /// `GET` an admin path of order-service as JSON.
    pub async fn order_admin(&self, path: &str) -> anyhow::Result<Value> {
        let res = self
            .http
            .get(format!("{}{path}", self.order.url))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await?;
        anyhow::ensure!(res.status() == 200, "admin {path}: {}", res.status());
        Ok(res.json().await?)
    }

    /// The invariants of one mode, counted from both databases.
    pub async fn audit(&self, mode: Option<&str>) -> anyhow::Result<audit::Invariants> {
        audit::audit(
            &self.dbs.order_db().await?,
            &self.dbs.shipping_db().await?,
            mode,
        )
        .await
    }

    /// What both databases hold about the orders that broke their promise.
    pub async fn evidence(&self) -> anyhow::Result<Vec<String>> {
        audit::evidence(
            &self.dbs.order_db().await?,
            &self.dbs.shipping_db().await?,
            10,
        )
        .await
    }
}

/// A valid order body.
pub fn sample_order(mode: &str) -> Value {
    serde_json::json!({
        "customer_id": "customer-1",
        "items": [{ "sku": "SKU-1", "quantity": 2 }, { "sku": "SKU-2", "quantity": 1 }],
        "delivery_mode": mode,
    })
}

/// Polls `check` until it returns `Some`, or fails after `deadline`.
pub async fn eventually<T, F, Fut>(
    deadline: Duration,
    what: &str,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let start = tokio::time::Instant::now();
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() > deadline {
            anyhow::bail!(
                "timed out after {deadline:?} waiting for {what} (last error: {last_err:?})"
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Declares a test that runs once per backend:
/// `both_backends!(happy_path);` expects `async fn happy_path(backend: TestBackend) -> anyhow::Result<()>`
/// and makes `sqlite::happy_path` and `postgres::happy_path`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    super::$name($crate::TestBackend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    super::$name($crate::TestBackend::Postgres).await
                }
            )*
        }
    };
}

/// Both services as real processes (the `svc` runner) on fresh databases.
pub struct ProcessStack {
    /// The processes.
    pub cluster: demo::cluster::Cluster,
    /// The databases.
    pub dbs: TestDatabases,
    _logs: tempfile::TempDir,
}

impl std::fmt::Debug for ProcessStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessStack")
            .field("dbs", &self.dbs)
            .finish()
    }
}

impl ProcessStack {
    /// Starts shipping then order-service from `exe` (pass
    /// `env!("CARGO_BIN_EXE_svc")`), with extra flags for each.
    pub async fn start(
        exe: &str,
        backend: TestBackend,
        order_args: &[&str],
        shipping_args: &[&str],
    ) -> anyhow::Result<Self> {
        let dbs = TestDatabases::create(backend).await?;
        let logs = tempfile::tempdir()?;
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let cfg = demo::cluster::ClusterConfig {
            exe: exe.into(),
            dir: logs.path().to_path_buf(),
            order_db: dbs.order_url.clone(),
            shipping_db: dbs.shipping_url.clone(),
            ports: None,
            admin_token: ADMIN_TOKEN.into(),
            common_args: own(&["--relay-poll", "200ms", "--log-format", "json"]),
            order_args: own(order_args),
            // 50 ms of packing unless the caller chose its own.
            shipping_args: if shipping_args.contains(&"--warehouse-delay") {
                own(shipping_args)
            } else {
                [own(&["--warehouse-delay", "50ms"]), own(shipping_args)].concat()
            },
        };
        let cluster = demo::cluster::Cluster::start(cfg).await?;
        Ok(Self {
            cluster,
            dbs,
            _logs: logs,
        })
    }

    /// Creates an order in `mode` through order-service's API.
    pub async fn create_order(&self, mode: &str) -> anyhow::Result<Value> {
        let res = self
            .cluster
            .http
            .post(format!("{}/orders", self.cluster.order.url()))
            .json(&sample_order(mode))
            .send()
            .await?;
        anyhow::ensure!(res.status() == 201, "create order: {}", res.status());
        Ok(res.json().await?)
    }

    /// The invariants of one mode, counted from both databases.
    pub async fn audit(&self, mode: Option<&str>) -> anyhow::Result<audit::Invariants> {
        audit::audit(
            &self.dbs.order_db().await?,
            &self.dbs.shipping_db().await?,
            mode,
        )
        .await
    }

    /// Waits until the mode's orders are all delivered and acknowledged.
    pub async fn settled(
        &self,
        mode: &str,
        deadline: Duration,
    ) -> anyhow::Result<audit::Invariants> {
        eventually(deadline, "delivery to settle", || async {
            let inv = self.audit(Some(mode)).await?;
            Ok(
                (inv.lost == 0 && inv.unacknowledged == 0 && inv.shipments >= inv.orders)
                    .then_some(inv),
            )
        })
        .await
    }

    /// Stops both processes and drops the databases.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.cluster.stop().await?;
        self.dbs.cleanup().await;
        Ok(())
    }
}

/// The answer's `Content-Type` (empty if none or not text).
pub fn content_type(res: &reqwest::Response) -> String {
    res.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Asserts a problem answer: the status, `application/problem+json`, and a
/// body whose `status` matches and that has a `title`. Returns the body.
pub async fn expect_problem(res: reqwest::Response, status: u16) -> anyhow::Result<Value> {
    let got = res.status();
    let ct = content_type(&res);
    let text = res.text().await?;
    anyhow::ensure!(got == status, "expected {status}, got {got}: {text}");
    anyhow::ensure!(
        ct == "application/problem+json",
        "content-type {ct:?}: {text}"
    );
    let body: Value = serde_json::from_str(&text)?;
    anyhow::ensure!(
        body["status"] == status && body["title"].is_string(),
        "{body}"
    );
    Ok(body)
}
