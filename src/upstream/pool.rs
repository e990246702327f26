//! Reused TCP connections to one upstream server (R26, RFC 7766 section 6.2.1).
//!
//! One connection per server carries every TCP query to it, pipelined: each query gets a
//! random ID unused on the connection, and replies are matched back by ID (and checked with
//! [`super::matches`]), in whatever order they come. A reader task closes the connection after
//! `idle` with nothing outstanding; any read or write error closes it and fails whatever was
//! outstanding, and the next query opens a new one. A refused or failed connect starts an
//! exponential back-off (100 ms doubling to 10 s), during which TCP queries to that server
//! fail at once instead of hammering it; a successful connect resets it.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::debug;

use super::UpstreamError;
use crate::wire;

pub const BACKOFF_START: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Exponential back-off after failed connects.
#[derive(Debug, Default, Clone, Copy)]
pub struct Backoff {
    delay: Duration,
    until: Option<Instant>,
}

impl Backoff {
    /// Whether a connect may be tried at `now`.
    pub fn ready(&self, now: Instant) -> bool {
        self.until.is_none_or(|u| now >= u)
    }
    pub fn failed(&mut self, now: Instant) {
        self.delay = (self.delay * 2).clamp(BACKOFF_START, BACKOFF_MAX);
        self.until = Some(now + self.delay);
    }
    pub fn succeeded(&mut self) {
        *self = Backoff::default();
    }
    pub fn delay(&self) -> Duration {
        self.delay
    }
}

type Waiting = HashMap<u16, (Vec<u8>, oneshot::Sender<Bytes>)>;

struct Conn {
    tx: mpsc::Sender<Vec<u8>>,
    waiting: Mutex<Waiting>,
    closed: AtomicBool,
    /// Wakes the writer when the reader closes the connection: the writer's own `Arc<Conn>`
    /// keeps `tx` alive, so its channel alone would never end and the socket would stay open.
    shutdown: tokio::sync::Notify,
}

impl Conn {
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        // Dropping the senders tells every waiting query the connection is gone.
        self.lock().clear();
        // notify_one keeps a permit if the writer is not waiting right now.
        self.shutdown.notify_one();
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The TCP connection state for one server.
pub struct Pool {
    server: SocketAddr,
    idle: Duration,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    backoff: Mutex<Backoff>,
}

/// Removes a query's slot if it is abandoned (timeout) before its reply arrives.
struct Slot<'a> {
    conn: &'a Conn,
    id: u16,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.conn.lock().remove(&self.id);
    }
}

impl Pool {
    pub fn new(server: SocketAddr, idle: Duration) -> Pool {
        Pool {
            server,
            idle,
            conn: tokio::sync::Mutex::new(None),
            backoff: Mutex::new(Backoff::default()),
        }
    }

    /// Sends `query` (its ID is replaced) and waits for the matching reply. The caller bounds
    /// the wait with its deadline.
    pub async fn query(&self, query: &[u8]) -> Result<Bytes, UpstreamError> {
        let conn = self.connection().await?;
        let mut msg = query.to_vec();
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut waiting = conn.lock();
            if conn.closed.load(Ordering::Acquire) {
                return Err(closed());
            }
            let id = loop {
                let id = rand::random::<u16>();
                if !waiting.contains_key(&id) {
                    break id;
                }
            };
            wire::put_u16(&mut msg, 0, id);
            waiting.insert(id, (msg.clone(), tx));
            id
        };
        let _slot = Slot { conn: &conn, id };
        let len =
            u16::try_from(msg.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut framed = Vec::with_capacity(msg.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&msg);
        conn.tx.send(framed).await.map_err(|_| closed())?;
        rx.await.map_err(|_| closed())
    }

    /// The open connection, or a new one (unless backing off).
    async fn connection(&self) -> Result<Arc<Conn>, UpstreamError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.closed.load(Ordering::Acquire) {
                return Ok(c.clone());
            }
        }
        *slot = None;
        let now = Instant::now();
        if !self.backoff().ready(now) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "backing off after a failed connect",
            )
            .into());
        }
        let stream = match TcpStream::connect(self.server).await {
            Ok(s) => s,
            Err(e) => {
                let mut b = self.backoff();
                b.failed(Instant::now());
                debug!(server = %self.server, error = %e, backoff = ?b.delay(), "upstream TCP connect failed");
                return Err(e.into());
            }
        };
        self.backoff().succeeded();
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        let (tx, rx) = mpsc::channel(256);
        let conn = Arc::new(Conn {
            tx,
            waiting: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            shutdown: tokio::sync::Notify::new(),
        });
        tokio::spawn(write_loop(wr, rx, conn.clone()));
        tokio::spawn(read_loop(rd, conn.clone(), self.idle));
        *slot = Some(conn.clone());
        Ok(conn)
    }

    fn backoff(&self) -> std::sync::MutexGuard<'_, Backoff> {
        self.backoff.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn closed() -> UpstreamError {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "upstream TCP connection closed",
    )
    .into()
}

async fn write_loop(mut wr: OwnedWriteHalf, mut rx: mpsc::Receiver<Vec<u8>>, conn: Arc<Conn>) {
    loop {
        let framed = tokio::select! {
            f = rx.recv() => f,
            _ = conn.shutdown.notified() => None,
        };
        let Some(framed) = framed else { break };
        if wr.write_all(&framed).await.is_err() {
            break;
        }
    }
    conn.close();
    // FIN to the server; the read half goes with the reader, so the socket is closed.
    let _ = wr.shutdown().await;
}

async fn read_loop(mut rd: OwnedReadHalf, conn: Arc<Conn>, idle: Duration) {
    loop {
        let len = match tokio::time::timeout(idle, rd.read_u16()).await {
            Ok(Ok(n)) => n as usize,
            Ok(Err(_)) => break,
            // Idle: close only when nothing is outstanding.
            Err(_) if conn.lock().is_empty() => break,
            Err(_) => continue,
        };
        let mut reply = vec![0u8; len];
        if rd.read_exact(&mut reply).await.is_err() {
            break;
        }
        let Some(id) = wire::u16_at(&reply, 0) else {
            continue;
        };
        let mut waiting = conn.lock();
        let matched = waiting
            .get(&id)
            .is_some_and(|(q, _)| super::matches(q, &reply));
        if matched {
            if let Some((_, tx)) = waiting.remove(&id) {
                let _ = tx.send(Bytes::from(reply));
            }
        } else {
            // A late reply to an abandoned query, or garbage: not for anyone waiting.
            debug!(id, "unmatched reply on an upstream TCP connection");
        }
    }
    conn.close();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap_and_resets() {
        let now = Instant::now();
        let mut b = Backoff::default();
        assert!(b.ready(now));
        b.failed(now);
        assert_eq!(b.delay(), BACKOFF_START);
        assert!(!b.ready(now + Duration::from_millis(50)));
        assert!(b.ready(now + BACKOFF_START));
        for _ in 0..20 {
            b.failed(now);
        }
        assert_eq!(b.delay(), BACKOFF_MAX);
        b.succeeded();
        assert!(b.ready(now));
    }
}
