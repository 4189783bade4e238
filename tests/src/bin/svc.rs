//! Runs order-service or shipping-service as `main` does, for the tests that
//! need real processes (to SIGKILL them): `svc order-service --port ...`.
fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match demo::cluster::serve_main(&args) {
        Some(result) => result,
        None => anyhow::bail!("usage: svc order-service|shipping-service [flags]"),
    }
}
