//! A TCP proxy between a service and Postgres that can lose the answer to a
//! commit: the ambiguous commit, where the server committed but the client
//! never heard.
//!
//! It forwards bytes both ways. When [armed](PgProxy::arm) with a marker, the
//! first connection whose client bytes contain the marker (a value bound in
//! the transaction, e.g. a customer id) is doomed, and the answer to the
//! message that commits the marked work is read and thrown away (so the
//! server has certainly committed it), and both sockets are closed. That
//! message is the next one containing `COMMIT` when the marked statement
//! runs inside a transaction, or the marked statement itself when it runs
//! outside one (the connection was idle: the server's last `ReadyForQuery`
//! said `I`), since such a statement commits on its own. With a blackout, every other proxied connection is cut too and new
//! ones are refused for that long, so the service cannot ask the database
//! what happened.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Debug, Default)]
struct State {
    /// The marker that dooms a connection, while armed.
    marker: Option<Vec<u8>>,
    /// How long to cut everything once a COMMIT answer was dropped.
    blackout: Option<Duration>,
    /// No connection until then.
    refuse_until: Option<Instant>,
    /// COMMIT answers dropped so far.
    dropped: u64,
    /// The server's answers are held back until then (connections stay
    /// open, nothing is answered: a frozen server or a silent network).
    frozen_until: Option<Instant>,
    /// Answers held back by a freeze so far.
    withheld: u64,
}

/// The proxy; dropping it does not stop the accept loop (the test ends it).
#[derive(Debug, Clone)]
pub struct PgProxy {
    /// `127.0.0.1:<port>` it listens on.
    pub addr: String,
    state: Arc<Mutex<State>>,
    cut: watch::Sender<u64>,
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    position(hay, needle).is_some()
}

fn position(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

impl PgProxy {
    /// Listens on a free local port and forwards to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let (cut, _) = watch::channel(0u64);
        let proxy = Self {
            addr,
            state: Arc::default(),
            cut,
        };
        let p = proxy.clone();
        let upstream = upstream.to_string();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let refused = {
                    let s = p.lock();
                    s.refuse_until.is_some_and(|t| Instant::now() < t)
                };
                if refused {
                    drop(client);
                    continue;
                }
                let p = p.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        p.pump(client, server).await;
                    }
                });
            }
        });
        Ok(proxy)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Rewrites a `postgres://` URL to go through the proxy.
    pub fn url_for(&self, url: &str) -> anyhow::Result<String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| anyhow::anyhow!("not a URL: {url}"))?;
        let (auth_host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let auth = auth_host
            .rsplit_once('@')
            .map(|(a, _)| format!("{a}@"))
            .unwrap_or_default();
        Ok(format!("{scheme}://{auth}{}/{path}", self.addr))
    }

    /// Dooms the next connection whose client bytes carry `marker`; with
    /// `blackout`, cuts every connection and refuses new ones for that long
    /// after dropping the COMMIT answer.
    pub fn arm(&self, marker: &str, blackout: Option<Duration>) {
        let mut s = self.lock();
        s.marker = Some(marker.as_bytes().to_vec());
        s.blackout = blackout;
    }

    /// Cuts every proxied connection now and refuses new ones for `d`: the
    /// database is gone, as for a server restart or a network partition.
    pub fn blackout(&self, d: Duration) {
        self.lock().refuse_until = Some(Instant::now() + d);
        self.cut.send_modify(|g| *g += 1);
    }

    /// Holds every answer of the server back for `d`, on open connections
    /// and new ones alike.
    pub fn freeze(&self, d: Duration) {
        self.lock().frozen_until = Some(Instant::now() + d);
    }

    /// Answers a freeze has held back so far.
    pub fn withheld(&self) -> u64 {
        self.lock().withheld
    }

    /// COMMIT answers dropped so far.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    async fn pump(&self, client: TcpStream, server: TcpStream) {
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        let mut cut = self.cut.subscribe();
        let mut cbuf = vec![0u8; 64 * 1024];
        let mut sbuf = vec![0u8; 64 * 1024];
        // The last bytes of the previous client read, so that a marker split
        // across two reads is still seen.
        let mut tail: Vec<u8> = Vec::new();
        let mut marked = false;
        let mut doomed = false;
        // The client bytes sent *after* the marker: only a COMMIT in them is
        // the marked transaction's own (the carried-over tail may hold an
        // earlier transaction's COMMIT).
        let mut after: Vec<u8> = Vec::new();
        // The transaction status of the server's last ReadyForQuery: `I`
        // idle, `T` in a transaction, `E` in a failed one.
        let mut status = b'I';
        loop {
            tokio::select! {
                _ = cut.changed() => return,
                n = cr.read(&mut cbuf) => {
                    let n = match n { Ok(0) | Err(_) => return, Ok(n) => n };
                    let chunk = &cbuf[..n];
                    let mut window = std::mem::take(&mut tail);
                    window.extend_from_slice(chunk);
                    if marked {
                        after.extend_from_slice(chunk);
                    } else {
                        let mut s = self.lock();
                        if let Some(m) = s.marker.clone() {
                            if let Some(at) = position(&window, &m) {
                                marked = true;
                                s.marker = None;
                                after = window[at + m.len()..].to_vec();
                                // Outside a transaction, the marked statement
                                // commits on its own: its answer is the one.
                                doomed = status == b'I';
                            }
                        }
                    }
                    if marked && !doomed && contains(&after, b"COMMIT") {
                        doomed = true;
                    }
                    let keep_after = after.len().saturating_sub(256);
                    after.drain(..keep_after);
                    let keep = window.len().saturating_sub(256);
                    tail = window[keep..].to_vec();
                    if sw.write_all(chunk).await.is_err() {
                        return;
                    }
                }
                n = sr.read(&mut sbuf) => {
                    let n = match n { Ok(0) | Err(_) => return, Ok(n) => n };
                    let frozen = {
                        let mut s = self.lock();
                        let until = s.frozen_until.filter(|t| Instant::now() < *t);
                        if until.is_some() {
                            s.withheld += 1;
                        }
                        until
                    };
                    if let Some(until) = frozen {
                        tokio::time::sleep_until(until).await;
                    }
                    if let [.., b'Z', 0, 0, 0, 5, st] = &sbuf[..n] {
                        status = *st;
                    }
                    if doomed {
                        // The server answered the commit: it ran. The client
                        // never hears it.
                        let blackout = {
                            let mut s = self.lock();
                            s.dropped += 1;
                            let b = s.blackout.take();
                            if let Some(b) = b {
                                s.refuse_until = Some(Instant::now() + b);
                            }
                            b
                        };
                        if blackout.is_some() {
                            self.cut.send_modify(|g| *g += 1);
                        }
                        return;
                    }
                    if cw.write_all(&sbuf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}
