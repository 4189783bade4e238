//! order-service's relay gives way to `POST /orders` (RELAY_GIVE_WAY_*),
//! through the real router: a request in flight at the front door, with
//! its body in, holds back the relay's next claim for up to
//! RELAY_GIVE_WAY_WAIT; with the door quiet, with RELAY_GIVE_WAY_AT=0, or
//! with only clients whose bodies never finish arriving (a slow client
//! costs no work and must not hold delivery back), an order reaches
//! shipping at once. Whether it reached shipping is read from
//! order-service's database.
//!
//! A request with its body in is held in flight on Postgres by a test
//! transaction that holds, uncommitted, the idempotency record the request
//! is about to insert: its insert waits on the unique index, and nothing
//! else does. SQLite has no such lock (its one writer would hold back the
//! relay too); there the relay's side is covered by
//! `resilience/tests/outbox.rs` `gives_way_to_a_busy_front_door`.

use std::time::{Duration, Instant};

use anyhow::ensure;
use tests::{both_backends, eventually, Stack, StackOptions, TestBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(3);

/// A `POST /orders` whose head has arrived and whose body never ends: a
/// slow client, not counted at the front door. It asks `Expect:
/// 100-continue`, and the server answers `100 Continue` only when the
/// request, past the front door, first reads its body: so once that answer
/// is in, the request is surely inside. Then a first byte of the body.
async fn stuck_request(url: &str) -> anyhow::Result<tokio::net::TcpStream> {
    let addr = url.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.write_all(
        format!(
            "POST /orders HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
             content-length: 1000\r\nexpect: 100-continue\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    conn.flush().await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 256];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).await?;
            anyhow::ensure!(n > 0, "closed before 100 Continue: {answer:?}");
            answer.extend_from_slice(&buf[..n]);
        }
        Ok(())
    })
    .await
    .map_err(|_| anyhow::anyhow!("no 100 Continue in 10 s: {answer:?}"))??;
    anyhow::ensure!(
        answer.starts_with(b"HTTP/1.1 100"),
        "not 100 Continue: {}",
        String::from_utf8_lossy(&answer)
    );
    conn.write_all(b"{").await?;
    conn.flush().await?;
    Ok(conn)
}

async fn status(stack: &Stack, id: &str) -> anyhow::Result<String> {
    let db = stack.dbs.order_db().await?;
    let s: String = sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
        .bind(id)
        .fetch_one(db.pool())
        .await?;
    db.close().await;
    Ok(s)
}

/// Creates an order and returns how long it took to leave `pending`.
async fn time_to_accept(stack: &Stack) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let order = stack.create_order("at-least-once").await?;
    let id = order["id"].as_str().unwrap_or_default().to_owned();
    eventually(Duration::from_secs(30), "the order accepted", || {
        let id = id.clone();
        async move { Ok((status(stack, &id).await? != "pending").then_some(())) }
    })
    .await?;
    Ok(start.elapsed())
}

/// A keyed `POST /orders` in flight with its body in (Postgres): a test
/// transaction holds, uncommitted, the record of the same key, so the
/// request's insert waits on the unique index.
struct Held {
    db: resilience::store::Db,
    holder: sqlx::Transaction<'static, sqlx::Any>,
    request: tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
}

impl Held {
    async fn start(stack: &Stack) -> anyhow::Result<Self> {
        let db = stack.dbs.order_db().await?;
        let mut holder = db.pool().begin().await?;
        sqlx::query(
            "INSERT INTO idempotency_keys \
             (scope, idem_key, fingerprint, status, headers, body, created_at, expires_at) \
             VALUES ('anonymous', 'held-at-the-door', '', 0, '', ''::bytea, 0, 0)",
        )
        .execute(&mut *holder)
        .await?;
        let request = tokio::spawn(
            stack
                .http
                .post(format!("{}/orders", stack.order.url))
                .header("idempotency-key", "held-at-the-door")
                .json(&tests::sample_order("at-least-once"))
                .send(),
        );
        eventually(
            Duration::from_secs(10),
            "the request waiting on the held key",
            || {
                let pool = db.pool().clone();
                async move {
                    let waiting: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    )
                    .fetch_one(&pool)
                    .await?;
                    Ok((waiting > 0).then_some(()))
                }
            },
        )
        .await?;
        Ok(Self {
            db,
            holder,
            request,
        })
    }

    /// Lets the request through; it must create its order.
    async fn release(self) -> anyhow::Result<()> {
        self.holder.rollback().await?;
        let res = self.request.await??;
        ensure!(res.status() == 201, "the held order: {}", res.status());
        self.db.close().await;
        Ok(())
    }
}

fn giving_way(c: &mut order_service::Config) {
    c.delivery.relay_give_way_at = Some(1);
    c.delivery.relay_give_way_wait = WAIT;
    c.delivery.relay_give_way_lag = Duration::from_secs(60);
}

/// Postgres: a keyed `POST /orders`, in flight with its body in, held by
/// `holder`'s uncommitted record of the same key.
async fn relay_gives_way_to_orders_in_flight() -> anyhow::Result<()> {
    let stack = Stack::start(
        TestBackend::Postgres,
        StackOptions {
            order: giving_way,
            ..StackOptions::default()
        },
    )
    .await?;
    // The door is quiet: at once.
    let quiet = time_to_accept(&stack).await?;
    ensure!(quiet < WAIT, "quiet door: accepted after {quiet:?}");

    // One order in flight at the door: the relay waits it out, up to WAIT.
    let held = Held::start(&stack).await?;
    let busy = time_to_accept(&stack).await?;
    ensure!(
        busy >= WAIT - Duration::from_millis(200),
        "busy door: accepted after {busy:?}"
    );

    // The request goes through: quiet again, at once again.
    held.release().await?;
    let after = time_to_accept(&stack).await?;
    ensure!(after < WAIT, "after the burst: accepted after {after:?}");
    stack.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_relay_gives_way_to_orders_in_flight() -> anyhow::Result<()> {
    relay_gives_way_to_orders_in_flight().await
}

/// Clients that send a body slowly, or never finish it, are not counted:
/// delivery goes on at once.
async fn slow_clients_do_not_hold_delivery_back(backend: TestBackend) -> anyhow::Result<()> {
    let stack = Stack::start(
        backend,
        StackOptions {
            order: giving_way,
            ..StackOptions::default()
        },
    )
    .await?;
    let mut slow = Vec::new();
    for _ in 0..4 {
        slow.push(stuck_request(&stack.order.url).await?);
    }
    let t = time_to_accept(&stack).await?;
    ensure!(t < WAIT, "slow clients at the door: accepted after {t:?}");
    drop(slow);
    stack.shutdown().await?;
    Ok(())
}

/// With RELAY_GIVE_WAY_AT=0, an order in flight at the door changes
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_relay_ignores_the_door_when_off() -> anyhow::Result<()> {
    let stack = Stack::start(
        TestBackend::Postgres,
        StackOptions {
            order: |c| {
                c.delivery.relay_give_way_at = Some(0);
                c.delivery.relay_give_way_wait = WAIT;
            },
            ..StackOptions::default()
        },
    )
    .await?;
    let held = Held::start(&stack).await?;
    let t = time_to_accept(&stack).await?;
    ensure!(t < WAIT, "giving way off: accepted after {t:?}");
    held.release().await?;
    stack.shutdown().await?;
    Ok(())
}

both_backends!(slow_clients_do_not_hold_delivery_back);
