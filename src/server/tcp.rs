//! TCP listener per RFC 7766: 2-octet length framing, pipelined queries handled concurrently
//! and answered in the order they complete, and the limits of R12/R13:
//!
//! - at most `tcp_connections` connections, `tcp_per_client` per address (over the cap the
//!   connection is closed at once; UDP is unaffected);
//! - idle timeout between messages, a deadline for a started message to complete (so a client
//!   trickling one byte at a time cannot hold a connection), a write timeout (so a client that
//!   never reads cannot either);
//! - at most `tcp_pipeline` queries in flight per connection; past that, reading pauses;
//! - a client outside the ACL gets one answer, REFUSED (R1), and the connection is closed;
//!   its query must arrive whole within `tcp_message_timeout`, not the idle timeout. Such
//!   clients are not turned away at accept (R1 wants them answered), but they do not take
//!   the `tcp_connections` slots of the clients inside it: they have `tcp_per_client` slots
//!   of their own, all of them together. Without that, the default idle timeout (10 s)
//!   would let a few addresses outside the ACL hold every slot.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;
use tokio_util::task::TaskTracker;
use tracing::{debug, error};

use crate::config::Limits;
use crate::handler::{Fast, Handler, Transport};
use crate::limit::PerClient;
use crate::shutdown::Shutdown;

/// The next connection on `listener`, or `None` once `shutdown` fires. An accept error
/// (EMFILE/ENFILE, an aborted handshake) is per-connection trouble: logged, a short back-off
/// instead of spinning (unless the handshake was merely aborted), and the listener goes on.
pub(crate) async fn accept(
    listener: &TcpListener,
    shutdown: &mut Shutdown,
    what: &'static str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = shutdown.recv() => return None,
            r = listener.accept() => match r {
                Ok(x) => return Some(x),
                Err(e) => {
                    debug!(error = %e, what, "accept");
                    if !matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            },
        }
    }
}

pub async fn serve(
    listener: TcpListener,
    handler: Arc<Handler>,
    mut shutdown: Shutdown,
    tracker: TaskTracker,
) {
    let limits = handler.config().limits.clone();
    let conns = Arc::new(Semaphore::new(limits.tcp_connections));
    let outside_conns = Arc::new(Semaphore::new(
        limits.tcp_per_client.min(limits.tcp_connections),
    ));
    let per_client = PerClient::new(limits.tcp_per_client);
    loop {
        let Some((stream, peer)) = accept(&listener, &mut shutdown, "tcp").await else {
            break;
        };
        // Clients outside the ACL (as it stands at accept) share slots of their own.
        let pool = if handler.allows(peer.ip()) {
            &conns
        } else {
            &outside_conns
        };
        let Ok(permit) = pool.clone().try_acquire_owned() else {
            debug!(%peer, "tcp connection limit reached");
            continue;
        };
        let Some(slot) = per_client.acquire(peer.ip()) else {
            debug!(%peer, "per-client tcp connection limit reached");
            continue;
        };
        let ctx = Conn {
            handler: handler.clone(),
            limits: limits.clone(),
            tracker: tracker.clone(),
            shutdown: shutdown.clone(),
            peer,
        };
        let open = OpenConn::new(handler.metrics().tcp_connections.clone());
        tracker.spawn(async move {
            ctx.run(stream).await;
            drop((permit, slot, open));
        });
    }
}

/// One unit of the open-connections gauge, given back on drop (also if the task is
/// cancelled).
struct OpenConn(prometheus_client::metrics::gauge::Gauge);

impl OpenConn {
    fn new(g: prometheus_client::metrics::gauge::Gauge) -> OpenConn {
        g.inc();
        OpenConn(g)
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.dec();
    }
}

struct Conn {
    handler: Arc<Handler>,
    limits: Limits,
    tracker: TaskTracker,
    shutdown: Shutdown,
    peer: SocketAddr,
}

impl Conn {
    async fn run(mut self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let (mut rd, wr) = stream.into_split();
        let (tx, rx) = mpsc::channel::<Vec<u8>>(self.limits.tcp_pipeline);
        let writer = tokio::spawn(write_loop(wr, rx, self.limits.tcp_write_timeout));
        let pipeline = Arc::new(Semaphore::new(self.limits.tcp_pipeline));
        let mut out = Vec::new();
        let (idle, complete) = (
            self.limits.tcp_idle_timeout,
            self.limits.tcp_message_timeout,
        );
        // For a client outside the ACL: the whole of its one message within this.
        let short = complete.min(idle);
        let mut refused = false;
        loop {
            // Only picks how long to wait: the handler decides on the message as it comes
            // (a reload may change the ACL meanwhile).
            let outside = !self.handler.allows(self.peer.ip());
            let read = async {
                if outside {
                    timeout(short, read_message(&mut rd, short, short))
                        .await
                        .ok()
                        .flatten()
                } else {
                    read_message(&mut rd, idle, complete).await
                }
            };
            let msg = tokio::select! {
                _ = self.shutdown.recv() => break,
                _ = tx.closed() => break,
                m = read => match m {
                    Some(m) => m,
                    None => break,
                },
            };
            match self
                .handler
                .answer_fast(&msg, self.peer, Transport::Tcp, &mut out)
            {
                Fast::Reply => {
                    if tx.send(std::mem::take(&mut out)).await.is_err() {
                        break;
                    }
                }
                Fast::Refused => {
                    refused = true;
                    let _ = tx.send(std::mem::take(&mut out)).await;
                    break;
                }
                Fast::Drop if outside => break,
                Fast::Drop => {}
                Fast::Miss => {
                    let Ok(permit) = pipeline.clone().acquire_owned().await else {
                        break;
                    };
                    self.spawn_query(msg, tx.clone(), permit);
                }
            }
        }
        // Queries still running hold clones of `tx`; the writer ends after their replies.
        drop(tx);
        let _ = writer.await;
        if refused {
            drain(&mut rd, short).await;
        }
    }

    fn spawn_query(&self, msg: Vec<u8>, tx: mpsc::Sender<Vec<u8>>, permit: OwnedSemaphorePermit) {
        let (handler, peer) = (self.handler.clone(), self.peer);
        self.tracker.spawn(async move {
            if let Some(reply) = handler.answer(Bytes::from(msg), peer, Transport::Tcp).await {
                let _ = tx.send(reply).await;
            }
            drop(permit);
        });
    }
}

/// Reads one length-prefixed message: the first octet may take up to `idle`, the rest of the
/// message must follow within `complete`. `None` on EOF, timeout or error.
async fn read_message(
    rd: &mut OwnedReadHalf,
    idle: Duration,
    complete: Duration,
) -> Option<Vec<u8>> {
    let first = timeout(idle, rd.read_u8()).await.ok()?.ok()?;
    timeout(complete, async {
        let second = rd.read_u8().await?;
        let len = u16::from_be_bytes([first, second]) as usize;
        let mut msg = vec![0u8; len];
        rd.read_exact(&mut msg).await?;
        Ok::<_, io::Error>(msg)
    })
    .await
    .ok()?
    .ok()
}

/// Reads and drops what the client still sends, until it closes or `wait` has passed. A
/// socket closed with unread input makes the kernel send a reset, which can destroy the
/// answer still on its way (a pipelined query after a REFUSED, say).
async fn drain(rd: &mut OwnedReadHalf, wait: Duration) {
    let mut sink = [0u8; 512];
    let _ = timeout(wait, async {
        while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Vec<u8>>,
    write_timeout: Duration,
) {
    let mut framed = Vec::with_capacity(4096);
    while let Some(msg) = rx.recv().await {
        let Ok(len) = u16::try_from(msg.len()) else {
            error!(len = msg.len(), "reply too long for TCP framing");
            continue;
        };
        framed.clear();
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&msg);
        match timeout(write_timeout, wr.write_all(&framed)).await {
            Ok(Ok(())) => {}
            _ => {
                debug!("tcp write failed or timed out; closing");
                break;
            }
        }
    }
    let _ = wr.shutdown().await;
}
