//! UDP listener: one receive loop per socket. Cache hits are answered inline, without a task;
//! a miss is copied out and handled on its own task so the loop keeps receiving.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio_util::task::TaskTracker;
use tracing::{debug, error};

use crate::handler::{Fast, Handler, Transport};
use crate::shutdown::Shutdown;

/// Errors a UDP socket reports for one datagram (an ICMP error from an earlier send, a full
/// buffer) rather than for the socket: log and go on.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::OutOfMemory
    ) || e.raw_os_error() == Some(105) // ENOBUFS
}

pub async fn serve(
    sock: Arc<UdpSocket>,
    handler: Arc<Handler>,
    mut shutdown: Shutdown,
    tracker: TaskTracker,
) {
    let mut buf = vec![0u8; 65_535];
    let mut out = Vec::with_capacity(4096);
    loop {
        let (n, src) = tokio::select! {
            _ = shutdown.recv() => break,
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) if is_transient(&e) => {
                    debug!(error = %e, "udp receive");
                    continue;
                }
                Err(e) => {
                    error!(error = %e, "udp listener failed");
                    break;
                }
            },
        };
        match handler.answer_fast(&buf[..n], src, Transport::Udp, &mut out) {
            Fast::Reply => send(&sock, &out, src).await,
            Fast::Drop => {}
            Fast::Miss => {
                let msg = Bytes::copy_from_slice(&buf[..n]);
                let (sock, handler) = (sock.clone(), handler.clone());
                tracker.spawn(async move {
                    if let Some(reply) = handler.answer(msg, src, Transport::Udp).await {
                        send(&sock, &reply, src).await;
                    }
                });
            }
        }
    }
}

async fn send(sock: &UdpSocket, msg: &[u8], to: SocketAddr) {
    if let Err(e) = sock.send_to(msg, to).await {
        debug!(error = %e, %to, "udp send");
    }
}
