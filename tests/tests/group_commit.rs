//! Group commit on `POST /orders` (`resilience::batch::Coalesce`, on by
//! default): a seeded mix of good orders, replays, reused keys and bad
//! input, sent all at once, gets exactly the answers each request would get
//! alone, and the database holds exactly the orders that were answered 201,
//! each once, with its message to shipping and its key's record. Counted
//! from the database.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{ensure, Context};
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tests::{both_backends, content_type, sample_order, Stack, StackOptions, TestBackend};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A good order with a key of its own: 201.
    Keyed,
    /// A good order without a key: 201.
    Keyless,
    /// The same key and body as an earlier `Keyed`.
    Replay,
    /// An earlier `Keyed` key with another body.
    Reused,
    /// A quantity of 0: 422.
    Invalid,
    /// Not JSON: 400.
    Malformed,
    /// A NUL byte in a field (Postgres cannot store it): 4xx.
    Nul,
}

struct Case {
    kind: Kind,
    key: Option<String>,
    body: String,
}

fn cases(seed: u64, n: usize) -> Vec<Case> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut out: Vec<Case> = Vec::with_capacity(n);
    for i in 0..n {
        let keyed: Vec<usize> = (0..out.len())
            .filter(|&j| out[j].kind == Kind::Keyed)
            .collect();
        let roll = rng.gen_range(0..100);
        let order = |customer: String| {
            let mut o = sample_order("effectively-once");
            o["customer_id"] = json!(customer);
            o.to_string()
        };
        let case = match roll {
            0..=44 => Case {
                kind: Kind::Keyed,
                key: Some(format!("gc-{run}-{i}")),
                body: order(format!("customer-{i}")),
            },
            45..=59 => Case {
                kind: Kind::Keyless,
                key: None,
                body: order(format!("customer-{i}")),
            },
            60..=71 if !keyed.is_empty() => {
                let j = keyed[rng.gen_range(0..keyed.len())];
                Case {
                    kind: Kind::Replay,
                    key: out[j].key.clone(),
                    body: out[j].body.clone(),
                }
            }
            72..=79 if !keyed.is_empty() => {
                let j = keyed[rng.gen_range(0..keyed.len())];
                Case {
                    kind: Kind::Reused,
                    key: out[j].key.clone(),
                    body: order(format!("someone-else-{i}")),
                }
            }
            80..=87 => {
                let mut o = sample_order("effectively-once");
                o["items"][0]["quantity"] = json!(0);
                Case {
                    kind: Kind::Invalid,
                    key: Some(format!("gc-{run}-{i}")),
                    body: o.to_string(),
                }
            }
            88..=93 => Case {
                kind: Kind::Malformed,
                key: Some(format!("gc-{run}-{i}")),
                body: "{\"customer_id\": \"x\", \"items\": [".into(),
            },
            _ => Case {
                kind: Kind::Nul,
                key: Some(format!("gc-{run}-{i}")),
                body: order(format!("nul\u{0}-{i}")),
            },
        };
        out.push(case);
    }
    out
}

/// An answer: status, JSON body (null if none), content type.
type Answer = (u16, Value, String);

async fn send(stack: &Stack, case: &Case) -> anyhow::Result<Answer> {
    let mut req = stack
        .http
        .post(format!("{}/orders", stack.order.url))
        .header("content-type", "application/json")
        .body(case.body.clone());
    if let Some(key) = &case.key {
        req = req.header("idempotency-key", key);
    }
    let res = req.send().await?;
    let status = res.status().as_u16();
    let ctype = content_type(&res);
    let body: Value = serde_json::from_slice(&res.bytes().await?).unwrap_or(Value::Null);
    Ok((status, body, ctype))
}

async fn a_mixed_burst_is_answered_as_alone(backend: TestBackend) -> anyhow::Result<()> {
    let seed: u64 = std::env::var("GROUP_COMMIT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let result = burst(backend, seed).await;
    if result.is_err() {
        eprintln!("group commit seed {seed} (GROUP_COMMIT_SEED={seed} runs it again)");
    }
    result
}

async fn burst(backend: TestBackend, seed: u64) -> anyhow::Result<()> {
    // No shipping-service: the orders stay as committed.
    let stack = Stack::start(
        backend,
        StackOptions {
            start_shipping: false,
            request_timeout: Duration::from_millis(500),
            ..StackOptions::default()
        },
    )
    .await?;
    let cases = cases(seed, 160);
    let answers: Vec<(usize, anyhow::Result<Answer>)> =
        futures::stream::iter(cases.iter().enumerate())
            .map(|(i, case)| {
                let stack = &stack;
                async move { (i, send(stack, case).await) }
            })
            .buffer_unordered(48)
            .collect()
            .await;
    let mut answers: Vec<(usize, Answer)> = answers
        .into_iter()
        .map(|(i, r)| r.map(|a| (i, a)))
        .collect::<anyhow::Result<_>>()?;
    answers.sort_by_key(|(i, _)| *i);

    // Every answer, by kind. Requests that share a key race: whichever
    // reaches the database first is the key's, the others replay it (the
    // same body), answer 422 (another body) or 409 (while it is in flight).
    let mut by_key: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, (status, body, ctype)) in &answers {
        let case = &cases[*i];
        if let Some(key) = &case.key {
            by_key.entry(key.as_str()).or_default().push(*i);
        }
        let ok = match case.kind {
            Kind::Keyed | Kind::Replay | Kind::Reused => [201, 409, 422].contains(status),
            Kind::Keyless => *status == 201,
            Kind::Invalid => *status == 422,
            Kind::Malformed => *status == 400,
            Kind::Nul => (400..500).contains(status),
        };
        ensure!(ok, "request {i} ({:?}): {status} {body}", case.kind);
        if *status >= 400 {
            ensure!(
                ctype == "application/problem+json",
                "request {i}: {status} as {ctype}"
            );
        }
    }
    let id_of = |i: usize| answers[i].1 .1["id"].as_str().map(str::to_owned);
    let mut made: BTreeSet<String> = BTreeSet::new();
    let mut keys_made = 0usize;
    for (key, group) in &by_key {
        let won: Vec<usize> = group
            .iter()
            .copied()
            .filter(|&i| answers[i].1 .0 == 201)
            .collect();
        let bodies: BTreeSet<&str> = group.iter().map(|&i| cases[i].body.as_str()).collect();
        let bad = group
            .iter()
            .any(|&i| matches!(cases[i].kind, Kind::Invalid | Kind::Malformed | Kind::Nul));
        if bad {
            ensure!(won.is_empty(), "key {key}: bad input answered 201");
            continue;
        }
        ensure!(
            !won.is_empty(),
            "key {key}: no request of {group:?} was answered 201"
        );
        let ids: BTreeSet<Option<String>> = won.iter().map(|&i| id_of(i)).collect();
        let won_bodies: BTreeSet<&str> = won.iter().map(|&i| cases[i].body.as_str()).collect();
        ensure!(
            ids.len() == 1 && won_bodies.len() == 1,
            "key {key}: 201 answers {won:?} name orders {ids:?}"
        );
        if bodies.len() == 1 {
            ensure!(
                group.iter().all(|&i| answers[i].1 .0 != 422),
                "key {key}: 422 although every request had the same body"
            );
        }
        made.extend(ids.into_iter().flatten());
        keys_made += 1;
    }
    for (i, _) in answers
        .iter()
        .filter(|(i, _)| cases[*i].kind == Kind::Keyless)
    {
        let id = id_of(*i).context("a keyless 201 without an id")?;
        ensure!(made.insert(id), "request {i}: an order id answered twice");
    }
    let db = stack.dbs.order_db().await?;
    let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM orders ORDER BY id")
        .fetch_all(db.pool())
        .await?;
    let in_db: BTreeSet<String> = ids.iter().cloned().collect();
    ensure!(
        in_db == made && ids.len() == made.len(),
        "{} orders in the database, {} answered 201",
        ids.len(),
        made.len()
    );
    let messages: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox")
        .fetch_one(db.pool())
        .await?;
    ensure!(
        messages == made.len() as i64,
        "{messages} messages for {} orders",
        made.len()
    );
    let records: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM idempotency_keys")
        .fetch_one(db.pool())
        .await?;
    ensure!(
        records == keys_made as i64,
        "{records} key records for {keys_made} keys answered 201"
    );
    if backend == TestBackend::Postgres {
        // How many transactions wrote them (for the log: grouping depends on
        // timing, so it is shown, not asserted; resilience's own tests hold
        // requests back to prove it).
        let writers: i64 = sqlx::query_scalar("SELECT COUNT(DISTINCT xmin::text) FROM orders")
            .fetch_one(db.pool())
            .await?;
        eprintln!("{} orders written by {writers} transactions", ids.len());
    }
    db.close().await;
    stack.shutdown().await?;
    Ok(())
}

both_backends!(a_mixed_burst_is_answered_as_alone);
