//! The lab's child processes get their secrets through the environment, not
//! the command line, where `ps` shows them to every user (issue 11, item 4).

use tests::{ProcessStack, TestBackend, ADMIN_TOKEN};

const EXE: &str = env!("CARGO_BIN_EXE_svc");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_is_not_on_the_command_line() -> anyhow::Result<()> {
    let mut stack = ProcessStack::start(EXE, TestBackend::Sqlite, &[], &[]).await?;
    for p in [&stack.cluster.order, &stack.cluster.shipping] {
        let pid = p.pid().ok_or_else(|| anyhow::anyhow!("not running"))?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        anyhow::ensure!(!cmdline.is_empty(), "empty cmdline for {pid}");
        anyhow::ensure!(
            !cmdline.contains(ADMIN_TOKEN),
            "the admin token is visible in /proc/{pid}/cmdline: {cmdline}"
        );
        // It did arrive: the admin endpoint accepts it.
        let res = stack
            .cluster
            .http
            .get(format!("{}/admin/outbox", p.url()))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await?;
        anyhow::ensure!(
            res.status() == 200,
            "admin with the token: {}",
            res.status()
        );
    }
    stack.cluster.stop().await?;
    stack.dbs.cleanup().await;
    Ok(())
}
