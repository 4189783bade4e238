//! The OpenAPI contract: both services serve an OpenAPI 3.1 document at
//! `GET /openapi.json` that lists exactly the public routes they serve, with
//! their problem+json errors, the idempotency headers, the HMAC security of
//! the service-to-service routes and the pagination. (schemathesis checks
//! the answers against it: tests/schemathesis.sh, run by .ci/run.)

use std::collections::BTreeSet;

use anyhow::{ensure, Context};
use serde_json::{json, Value};
use tests::{Stack, StackOptions, TestBackend};

/// The public routes each service serves, as `METHOD path`. A route added to
/// a router must be added here and documented (the test fails otherwise);
/// `/openapi.json` itself and the `/admin` routes are deliberately left out
/// of the document.
const ORDER_ROUTES: &[&str] = &[
    "GET /healthz",
    "POST /batch",
    "GET /orders",
    "GET /orders/feed/{mode}",
    "GET /orders/{id}",
    "GET /readyz",
    "POST /orders",
    "POST /orders/{id}/shipment-events",
];
const SHIPPING_ROUTES: &[&str] = &[
    "GET /healthz",
    "POST /batch",
    "GET /readyz",
    "GET /shipments",
    "GET /shipments/feed/{mode}",
    "GET /shipments/{id}",
    "POST /shipments",
];
/// Routes only the other service may call: HMAC-signed.
const SIGNED: &[&str] = &[
    "GET /orders/feed/{mode}",
    "POST /orders/{id}/shipment-events",
    "GET /shipments/feed/{mode}",
    "POST /shipments",
];
/// Routes wrapped in the idempotency layer.
const IDEMPOTENT: &[&str] = &[
    "POST /orders",
    "POST /orders/{id}/shipment-events",
    "POST /shipments",
];

/// The routers' sources: every route they add outside `routes!` (which
/// takes the path from the handler's `#[utoipa::path]`) is undocumented,
/// and only `/openapi.json` may be.
const ROUTER_SOURCES: &[(&str, &str)] = &[
    (
        "order-service",
        include_str!("../../order-service/src/routes/mod.rs"),
    ),
    (
        "shipping-service",
        include_str!("../../shipping-service/src/routes/mod.rs"),
    ),
];

fn operations(doc: &Value) -> anyhow::Result<BTreeSet<String>> {
    let paths = doc["paths"].as_object().context("no paths")?;
    let mut ops = BTreeSet::new();
    for (path, item) in paths {
        for method in item.as_object().context("path item")?.keys() {
            if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                ops.insert(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    Ok(ops)
}

fn operation<'a>(doc: &'a Value, op: &str) -> &'a Value {
    let (method, path) = op.split_once(' ').unwrap_or_default();
    &doc["paths"][path][method.to_lowercase()]
}

/// Follows a local `$ref` (`#/components/...`).
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v["$ref"].as_str() {
        Some(r) => doc
            .pointer(r.trim_start_matches('#'))
            .unwrap_or(&Value::Null),
        None => v,
    }
}

fn param_names(doc: &Value, op: &str) -> BTreeSet<String> {
    operation(doc, op)["parameters"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter_map(|p| resolve(doc, p)["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

async fn fetch(http: &reqwest::Client, base: &str) -> anyhow::Result<Value> {
    let res = http.get(format!("{base}/openapi.json")).send().await?;
    ensure!(res.status() == 200, "GET /openapi.json: {}", res.status());
    let ct = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    ensure!(ct.starts_with("application/json"), "content type {ct}");
    Ok(res.json().await?)
}

/// Calls a documented operation and checks the router serves it: the
/// answer is not the fallback's 404 nor a 405.
async fn check_served(http: &reqwest::Client, base: &str, op: &str) -> anyhow::Result<()> {
    let (method, path) = op.split_once(' ').context("op")?;
    let path = path
        .replace("{id}", "00000000-0000-0000-0000-000000000000")
        .replace("{mode}", "pull-at-least-once");
    let req = match method {
        "GET" => http.get(format!("{base}{path}")),
        "POST" => http.post(format!("{base}{path}")).json(&json!({})),
        m => anyhow::bail!("unexpected method {m}"),
    };
    let res = req.send().await?;
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    ensure!(status != 405, "{op}: documented but 405");
    ensure!(
        !(status == 404 && body["detail"] == "no such resource"),
        "{op}: documented but not routed (fallback 404)"
    );
    Ok(())
}

fn check_document(service: &str, doc: &Value, expected: &[&str]) -> anyhow::Result<()> {
    let version = doc["openapi"].as_str().unwrap_or_default();
    ensure!(version.starts_with("3.1."), "{service}: openapi {version}");
    ensure!(doc["info"]["title"] == service, "{service}: title");

    let documented = operations(doc)?;
    let expected: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
    ensure!(
        documented == expected,
        "{service}: documented {documented:?}, served {expected:?}"
    );

    for op in &documented {
        let o = operation(doc, op);
        let responses = o["responses"].as_object().context("responses")?;
        ensure!(
            responses.keys().any(|s| s.starts_with('2')),
            "{service} {op}: no 2xx response"
        );
        // Every error answer is problem+json.
        for (status, r) in responses {
            if status.starts_with('4') || status.starts_with('5') {
                let r = resolve(doc, r);
                ensure!(
                    r["content"]["application/problem+json"]["schema"]["$ref"]
                        == "#/components/schemas/Problem",
                    "{service} {op} {status}: not problem+json"
                );
            }
        }
        if SIGNED.contains(&op.as_str()) {
            ensure!(
                responses.contains_key("401"),
                "{service} {op}: signed without a 401"
            );
            let sec = &o["security"][0];
            for scheme in ["service_timestamp", "service_nonce", "service_signature"] {
                ensure!(
                    sec.get(scheme).is_some(),
                    "{service} {op}: no {scheme} security"
                );
                ensure!(
                    doc["components"]["securitySchemes"][scheme]["type"] == "apiKey",
                    "{service}: scheme {scheme}"
                );
            }
        } else {
            ensure!(
                o.get("security").is_none(),
                "{service} {op}: public but secured"
            );
        }
        if IDEMPOTENT.contains(&op.as_str()) {
            let names = param_names(doc, op);
            ensure!(
                names.contains("Idempotency-Key") && names.contains("X-Client-Id"),
                "{service} {op}: idempotency headers {names:?}"
            );
            for s in ["409", "422", "413", "415"] {
                ensure!(responses.contains_key(s), "{service} {op}: no {s}");
            }
        }
    }

    // Pagination: limit and cursor in, next_cursor out.
    let list = if service == "order-service" {
        "GET /orders"
    } else {
        "GET /shipments"
    };
    let names = param_names(doc, list);
    ensure!(
        names.contains("limit") && names.contains("cursor"),
        "{service} {list}: {names:?}"
    );
    let page = resolve(
        doc,
        &operation(doc, list)["responses"]["200"]["content"]["application/json"]["schema"],
    );
    ensure!(
        page["properties"].get("next_cursor").is_some(),
        "{service} {list}: no next_cursor in {page}"
    );
    // The delivery modes are an enum.
    let modes = doc["components"]["schemas"]["DeliveryMode"]["enum"]
        .as_array()
        .map(Vec::len);
    ensure!(modes == Some(6), "{service}: DeliveryMode {modes:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_services_serve_a_complete_openapi_3_1_document() -> anyhow::Result<()> {
    let stack = Stack::start(TestBackend::Sqlite, StackOptions::default()).await?;
    let result = async {
        for (service, base, expected) in [
            ("order-service", stack.order.url.as_str(), ORDER_ROUTES),
            (
                "shipping-service",
                stack.shipping_url.as_str(),
                SHIPPING_ROUTES,
            ),
        ] {
            let doc = fetch(&stack.http, base).await?;
            check_document(service, &doc, expected)?;
            for op in operations(&doc)? {
                check_served(&stack.http, base, &op).await?;
            }
        }
        anyhow::Ok(())
    }
    .await;
    stack.shutdown().await?;
    result
}

#[test]
fn routers_add_no_undocumented_route() {
    for (service, source) in ROUTER_SOURCES {
        let plain: Vec<&str> = source
            .match_indices(".route(")
            .map(|(i, _)| source[i..].lines().next().unwrap_or_default())
            .collect();
        assert!(
            plain.iter().all(|l| l.contains("\"/openapi.json\"")),
            "{service}: routes added outside `routes!` (undocumented): {plain:?}"
        );
        assert!(
            source.contains("routes!("),
            "{service}: no documented route"
        );
    }
}
