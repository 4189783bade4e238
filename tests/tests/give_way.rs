//! order-service's relay gives way to `POST /orders` (RELAY_GIVE_WAY_*),
//! through the real router: a request in flight at the front door (here
//! one whose body never finishes arriving) holds back the relay's next
//! claim for up to RELAY_GIVE_WAY_WAIT; with the door quiet, or with
//! RELAY_GIVE_WAY_AT=0, an order reaches shipping at once. Whether it
//! reached shipping is read from order-service's database.

use std::time::{Duration, Instant};

use anyhow::ensure;
use tests::{both_backends, eventually, Stack, StackOptions, TestBackend};
use tokio::io::AsyncWriteExt;

const WAIT: Duration = Duration::from_secs(3);

/// A `POST /orders` whose head has arrived and whose body never ends: in
/// flight at the front door until the connection closes.
async fn stuck_request(url: &str) -> anyhow::Result<tokio::net::TcpStream> {
    let addr = url.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.write_all(
        format!(
            "POST /orders HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
             content-length: 1000\r\n\r\n{{"
        )
        .as_bytes(),
    )
    .await?;
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

async fn relay_gives_way_to_orders_in_flight(backend: TestBackend) -> anyhow::Result<()> {
    let stack = Stack::start(
        backend,
        StackOptions {
            order: |c| {
                c.delivery.relay_give_way_at = Some(1);
                c.delivery.relay_give_way_wait = WAIT;
                c.delivery.relay_give_way_lag = Duration::from_secs(60);
            },
            ..StackOptions::default()
        },
    )
    .await?;
    // The door is quiet: at once.
    let quiet = time_to_accept(&stack).await?;
    ensure!(quiet < WAIT, "quiet door: accepted after {quiet:?}");

    // One order in flight at the door: the relay waits it out, up to WAIT.
    let stuck = stuck_request(&stack.order.url).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let busy = time_to_accept(&stack).await?;
    ensure!(
        busy >= WAIT - Duration::from_millis(200),
        "busy door: accepted after {busy:?}"
    );

    // The request goes away: quiet again, at once again.
    drop(stuck);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = time_to_accept(&stack).await?;
    ensure!(after < WAIT, "after the burst: accepted after {after:?}");
    stack.shutdown().await?;
    Ok(())
}

async fn relay_ignores_the_door_when_off(backend: TestBackend) -> anyhow::Result<()> {
    let stack = Stack::start(
        backend,
        StackOptions {
            order: |c| {
                c.delivery.relay_give_way_at = Some(0);
                c.delivery.relay_give_way_wait = WAIT;
            },
            ..StackOptions::default()
        },
    )
    .await?;
    let _stuck = stuck_request(&stack.order.url).await?;
    let _stuck_too = stuck_request(&stack.order.url).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = time_to_accept(&stack).await?;
    ensure!(t < WAIT, "giving way off: accepted after {t:?}");
    stack.shutdown().await?;
    Ok(())
}

both_backends!(
    relay_gives_way_to_orders_in_flight,
    relay_ignores_the_door_when_off
);
