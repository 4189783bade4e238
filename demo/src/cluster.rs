//! Both services as separate OS processes, so that a SIGKILL is real: the
//! process dies between any two instructions, its memory is gone, and only
//! what it committed survives.
//!
//! The processes are this crate's own executable (or the `tests` crate's
//! runner) started with a hidden first argument, `order-service` or
//! `shipping-service`, which runs the service exactly as its `main` does (see
//! [`serve_main`]). No other binary has to be built first.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// Runs a service if `args` (without the program name) start with
/// `order-service` or `shipping-service`; returns `None` otherwise.
/// Call it first thing in `main`.
pub fn serve_main(args: &[String]) -> Option<anyhow::Result<()>> {
    let (name, rest) = args.split_first()?;
    let argv = std::iter::once(name.clone()).chain(rest.iter().cloned());
    let run = match name.as_str() {
        "order-service" => {
            let config = <order_service::Config as clap::Parser>::parse_from(argv);
            service_kit::init_tracing(config.log_format);
            runtime(async move {
                order_service::Application::build(config)
                    .await?
                    .run_until_stopped(service_kit::shutdown_signal())
                    .await
            })
        }
        "shipping-service" => {
            let config = <shipping_service::Config as clap::Parser>::parse_from(argv);
            service_kit::init_tracing(config.log_format);
            runtime(async move {
                shipping_service::Application::build(config)
                    .await?
                    .run_until_stopped(service_kit::shutdown_signal())
                    .await
            })
        }
        _ => return None,
    };
    service_kit::flush_traces();
    Some(run)
}

fn runtime(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(fut)
}

/// Which service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// order-service.
    Order,
    /// shipping-service.
    Shipping,
}

impl Kind {
    /// The process name (and first argument).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Order => "order-service",
            Kind::Shipping => "shipping-service",
        }
    }
}

/// A random `SERVICE_SECRET` (256 bits, hex).
pub fn random_secret() -> String {
    use std::fmt::Write;
    rand::random::<[u8; 32]>()
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// A free loopback port (bound, read, released; the service binds it next).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// `N` free loopback ports, all different: each is held until all are
/// chosen (one after another, [`free_port`] may give the same port twice,
/// and two services would then race for it, one of them answering the
/// other's health checks).
pub fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let held = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ports = [0u16; N];
    for (port, l) in ports.iter_mut().zip(&held) {
        *port = l.local_addr()?.port();
    }
    Ok(ports)
}

/// Another process answered on a port chosen for a service: it was taken
/// after it was chosen.
#[derive(Debug, thiserror::Error)]
#[error("port {0} was taken by another process before the service could bind it")]
pub struct PortTaken(pub u16);

/// Whether process `pid` holds the listening socket of 127.0.0.1:`port`
/// (Linux, through /proc). `None` where /proc cannot tell, so the caller
/// trusts the health answer as before.
fn listens_on(pid: u32, port: u16) -> Option<bool> {
    let tcp = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let local = format!("0100007F:{port:04X}");
    // Fields: sl, local_address, rem_address, st (0A = LISTEN), ..., inode.
    let sockets: Vec<String> = tcp
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.get(1) == Some(&local.as_str()) && f.get(3) == Some(&"0A"))
                .then(|| f.get(9).map(|inode| format!("socket:[{inode}]")))
                .flatten()
        })
        .collect();
    if sockets.is_empty() {
        return None;
    }
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| sockets.iter().any(|s| target.as_os_str() == s.as_str()))
    }))
}

/// One service process: started, killed, restarted on the same port.
#[derive(Debug)]
pub struct Process {
    kind: Kind,
    exe: PathBuf,
    args: Vec<String>,
    port: u16,
    log: PathBuf,
    child: Option<Child>,
    /// Environment variables of the process (secrets go here, never in
    /// `args`, where `ps` would show them).
    env: Vec<(String, String)>,
    /// How many times it was started.
    pub starts: u32,
}

impl Process {
    /// A process description; nothing runs until [`Process::start`].
    pub fn new(kind: Kind, exe: &Path, port: u16, args: Vec<String>, log_dir: &Path) -> Self {
        Self {
            kind,
            exe: exe.to_path_buf(),
            args,
            port,
            log: log_dir.join(format!("{}.log", kind.name())),
            child: None,
            env: Vec::new(),
            starts: 0,
        }
    }

    /// Sets `--flag value` for the next start (replacing an earlier value).
    pub fn set_flag(&mut self, flag: &str, value: &str) {
        match self.args.iter().position(|a| a == flag) {
            Some(i) if i + 1 < self.args.len() => self.args[i + 1] = value.to_string(),
            _ => self.args.extend([flag.to_string(), value.to_string()]),
        }
    }

    /// Sets an environment variable for the next start (secrets go here,
    /// not on the command line, where `ps` shows them to every user).
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.env.retain(|(n, _)| n != name);
        self.env.push((name.to_string(), value.to_string()));
    }

    /// The OS process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Sends `signal` (e.g. SIGSTOP, SIGCONT) to the running process.
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self.pid().context("the process is not running")?;
        kill(Pid::from_raw(pid as i32), signal)?;
        Ok(())
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Where its logs go (appended across restarts).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Is it running (as far as this handle knows)?
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Starts it and waits until `/healthz` answers.
    pub async fn start(&mut self, http: &reqwest::Client) -> anyhow::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        // The outbox's retries are logged too, so a broken run's logs tell
        // what each attempt met (RUST_LOG, when set, wins).
        let filter = std::env::var("RUST_LOG")
            .unwrap_or_else(|_| "info,sqlx=warn,hyper=warn,resilience::outbox=debug".into());
        let child = Command::new(&self.exe)
            .arg(self.kind.name())
            .args(&self.args)
            .env("RUST_LOG", filter)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} ({})", self.kind.name(), self.exe.display()))?;
        self.child = Some(child);
        self.starts += 1;
        self.wait_healthy(http, Duration::from_secs(30)).await
    }

    async fn wait_healthy(
        &mut self,
        http: &reqwest::Client,
        deadline: Duration,
    ) -> anyhow::Result<()> {
        let url = format!("{}/healthz", self.url());
        let start = tokio::time::Instant::now();
        // Another process answered on this port: the port was taken between
        // choosing it and this start (another test's service, say).
        let mut foreign = false;
        loop {
            if let Ok(r) = http.get(&url).send().await {
                if r.status().is_success() {
                    match self.pid().and_then(|pid| listens_on(pid, self.port)) {
                        Some(false) => foreign = true,
                        _ => return Ok(()),
                    }
                }
            }
            if !self.is_running() {
                if foreign {
                    return Err(PortTaken(self.port).into());
                }
                bail!(
                    "{} exited during start-up; the end of {}:\n{}",
                    self.kind.name(),
                    self.log.display(),
                    self.log_tail(20)
                );
            }
            if start.elapsed() > deadline {
                if foreign {
                    return Err(PortTaken(self.port).into());
                }
                bail!(
                    "{} not healthy after {deadline:?}; see {}",
                    self.kind.name(),
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGKILL: no shutdown, no flush, no goodbye.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.start_kill().ok();
            c.wait().await?;
        }
        Ok(())
    }

    /// SIGSTOP: the process freezes between two instructions, its sockets,
    /// connections and open transactions held, until [`Process::thaw`].
    pub fn freeze(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGSTOP)
    }

    /// SIGCONT: a frozen process carries on where it stopped.
    pub fn thaw(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGCONT)
    }

    /// SIGTERM, then waits (up to `grace`, then SIGKILL).
    pub async fn terminate(&mut self, grace: Duration) -> anyhow::Result<Option<i32>> {
        let Some(mut c) = self.child.take() else {
            return Ok(None);
        };
        if let Some(pid) = c.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        match tokio::time::timeout(grace, c.wait()).await {
            Ok(status) => Ok(status?.code()),
            Err(_) => {
                c.start_kill().ok();
                c.wait().await?;
                bail!("{} ignored SIGTERM for {grace:?}", self.kind.name())
            }
        }
    }
}

/// What both processes are started with.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The executable that runs a service when given its name first.
    pub exe: PathBuf,
    /// Where logs (and SQLite files) go.
    pub dir: PathBuf,
    /// order-service's database URL.
    pub order_db: String,
    /// shipping-service's database URL.
    pub shipping_db: String,
    /// Fixed ports (`None`: free ones).
    pub ports: Option<(u16, u16)>,
    /// Admin token of both services.
    pub admin_token: String,
    /// Extra arguments for both (e.g. `--warehouse-delay`, fault rates).
    pub common_args: Vec<String>,
    /// Extra arguments for order-service only.
    pub order_args: Vec<String>,
    /// Extra arguments for shipping-service only.
    pub shipping_args: Vec<String>,
}

/// Both services, wired to each other.
pub struct Cluster {
    /// order-service.
    pub order: Process,
    /// shipping-service.
    pub shipping: Process,
    /// A client for the cluster's own calls.
    pub http: reqwest::Client,
    /// The admin token.
    pub admin_token: String,
    /// The `SERVICE_SECRET` both services sign their calls with (tests sign
    /// their own service-to-service calls with it). Never printed.
    pub service_secret: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("order", &self.order)
            .field("shipping", &self.shipping)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Starts shipping-service, then order-service.
    pub async fn start(cfg: ClusterConfig) -> anyhow::Result<Self> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start_once(cfg.clone()).await {
                // Free ports chosen, then taken by someone else before the
                // service bound them: choose again.
                Err(e) if cfg.ports.is_none() && attempt < 3 && e.is::<PortTaken>() => {
                    tracing::warn!(error = %e, "choosing other ports");
                }
                other => return other,
            }
        }
    }

    async fn start_once(cfg: ClusterConfig) -> anyhow::Result<Self> {
        let (op, sp) = match cfg.ports {
            Some(p) => p,
            None => {
                let [o, s] = free_ports()?;
                (o, s)
            }
        };
        let order_url = format!("http://127.0.0.1:{op}");
        let shipping_url = format!("http://127.0.0.1:{sp}");
        let base = |port: u16| -> Vec<String> {
            vec![
                "--bind".into(),
                "127.0.0.1".into(),
                "--port".into(),
                port.to_string(),
            ]
        };
        let mut oargs = base(op);
        oargs.extend(["--shipping-url".into(), shipping_url]);
        oargs.extend(cfg.common_args.iter().cloned());
        oargs.extend(cfg.order_args.iter().cloned());
        let mut sargs = base(sp);
        sargs.extend(["--order-url".into(), order_url]);
        sargs.extend(cfg.common_args.iter().cloned());
        sargs.extend(cfg.shipping_args.iter().cloned());

        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        let mut order = Process::new(Kind::Order, &cfg.exe, op, oargs, &cfg.dir);
        let mut shipping = Process::new(Kind::Shipping, &cfg.exe, sp, sargs, &cfg.dir);
        // Secrets (the admin token, a database URL that may carry a
        // password) go through the environment: a command line is visible
        // to every user of the machine (`ps`, /proc/<pid>/cmdline).
        order.set_env("ADMIN_TOKEN", &cfg.admin_token);
        shipping.set_env("ADMIN_TOKEN", &cfg.admin_token);
        order.set_env("DATABASE_URL", &cfg.order_db);
        shipping.set_env("DATABASE_URL", &cfg.shipping_db);
        // A fresh secret per cluster, shared by both services through the
        // environment (restarts keep it).
        let secret = random_secret();
        let mut cluster = Self {
            order,
            shipping,
            http,
            admin_token: cfg.admin_token,
            service_secret: secret.clone(),
        };
        cluster.order.set_env("SERVICE_SECRET", &secret);
        cluster.shipping.set_env("SERVICE_SECRET", &secret);
        cluster.shipping.start(&cluster.http).await?;
        cluster.order.start(&cluster.http).await?;
        Ok(cluster)
    }

    /// A process by kind.
    pub fn process(&mut self, kind: Kind) -> &mut Process {
        match kind {
            Kind::Order => &mut self.order,
            Kind::Shipping => &mut self.shipping,
        }
    }

    /// Sets the fault rates of both services' outgoing stacks (admin endpoint).
    pub async fn set_faults(&self, faults: &crate::faults::FaultProfile) -> anyhow::Result<()> {
        for p in [&self.order, &self.shipping] {
            let res = self
                .http
                .put(format!("{}/admin/faults", p.url()))
                .bearer_auth(&self.admin_token)
                .json(faults)
                .send()
                .await?;
            if !res.status().is_success() {
                bail!("setting faults on {}: {}", p.url(), res.status());
            }
        }
        Ok(())
    }

    /// Stops both gracefully (SIGTERM).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.order.terminate(Duration::from_secs(15)).await?;
        self.shipping.terminate(Duration::from_secs(15)).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listens_on_tells_the_owner_of_a_port() -> anyhow::Result<()> {
        if !Path::new("/proc/net/tcp").exists() {
            return Ok(()); // not Linux: the check answers None everywhere
        }
        let held = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = held.local_addr()?.port();
        assert_eq!(listens_on(std::process::id(), port), Some(true));
        // Another process (init, or whatever pid 1 is here) does not hold it.
        assert_ne!(listens_on(1, port), Some(true));
        drop(held);
        // Nobody listens: no answer either way.
        assert_eq!(listens_on(std::process::id(), port), None);
        Ok(())
    }
}
