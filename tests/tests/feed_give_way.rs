//! A served feed gives way to the producer's front door: while
//! `POST /orders` is busy, a page of events is answered up to
//! `RELAY_GIVE_WAY_WAIT` late, and at once when the door is quiet or the
//! page's oldest event is `RELAY_GIVE_WAY_LAG` old. What the page holds
//! never changes.

use std::time::Duration;

use anyhow::ensure;
use resilience::feed::{FeedLog, FeedQuery};
use resilience::foreground::{Foreground, GiveWay};
use service_kit::testing::TestDatabase;
use tests::{both_backends, TestBackend};

const MAX_WAIT: Duration = Duration::from_secs(2);
const TIMEOUT: Duration = Duration::from_secs(30);

async fn timed_page(
    log: &FeedLog,
    give_way: Option<&GiveWay>,
) -> anyhow::Result<(Duration, Vec<i64>)> {
    let start = tokio::time::Instant::now();
    let q = FeedQuery::new(0, 100, Duration::ZERO);
    let page = service_kit::feeds::page(log, "f", &q, TIMEOUT, give_way)
        .await
        .map_err(|p| anyhow::anyhow!("page refused: {p:?}"))?;
    Ok((
        start.elapsed(),
        page.0.events.iter().map(|e| e.position).collect(),
    ))
}

async fn gives_way_to_a_busy_front_door(backend: TestBackend) -> anyhow::Result<()> {
    let tdb = TestDatabase::create(backend).await?;
    let db = tdb.connect("feed", "feed_give_way").await?;
    db.migrate_resilience().await?;
    let log = FeedLog::new(db.clone());
    let mut tx = db.begin().await?;
    for i in 0..3 {
        log.append(
            &mut tx,
            "f",
            "thing",
            &format!("e-{i}"),
            &serde_json::json!({ "i": i }),
        )
        .await?;
    }
    tx.commit().await?;
    let all = vec![1, 2, 3];
    let foreground = Foreground::new(2);
    let give_way = |max_lag| GiveWay {
        foreground: foreground.clone(),
        max_wait: MAX_WAIT,
        max_lag,
    };
    let patient = give_way(Duration::from_secs(60));

    // No policy, or a quiet door: answered at once.
    let (t, events) = timed_page(&log, None).await?;
    ensure!(
        events == all && t < MAX_WAIT,
        "no policy: {events:?} after {t:?}"
    );
    let (t, events) = timed_page(&log, Some(&patient)).await?;
    ensure!(
        events == all && t < MAX_WAIT,
        "quiet door: {events:?} after {t:?}"
    );

    // A busy door: the same page, held back for the longest wait.
    let busy = (foreground.enter(), foreground.enter());
    let (t, events) = timed_page(&log, Some(&patient)).await?;
    ensure!(events == all, "busy door changed the page: {events:?}");
    ensure!(t >= MAX_WAIT, "busy door: answered after {t:?}");

    // Events older than the lag bound: no wait, busy or not.
    tokio::time::sleep(Duration::from_millis(50)).await;
    ensure!(patient.busy(), "the door is still busy");
    let behind = give_way(Duration::from_millis(10));
    let (t, events) = timed_page(&log, Some(&behind)).await?;
    ensure!(
        events == all && t < MAX_WAIT,
        "behind: {events:?} after {t:?}"
    );
    drop(busy);
    tdb.cleanup().await;
    Ok(())
}

both_backends!(gives_way_to_a_busy_front_door);
