//! UDP listener: one blocking receive thread per socket, several sockets per address with
//! SO_REUSEPORT so the kernel spreads clients over them (one per core by default).
//!
//! Why threads and not a tokio receive loop: at tens of thousands of queries per second a
//! readiness-based loop pays, per packet, an epoll wake-up and a `recvfrom` that fails with
//! EAGAIN on top of the one that succeeds. A thread blocked in `recvfrom` pays exactly one
//! receive and one send per cache hit — the cost of a bare UDP echo. A cache hit is answered
//! on the thread itself; a miss is copied out and handed to the runtime as a task, whose reply
//! goes out on the same socket with MSG_DONTWAIT, so a full send buffer drops that reply
//! instead of stalling a runtime worker.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::runtime::Handle;
use tokio_util::task::TaskTracker;
use tracing::{debug, error};

use crate::handler::{Fast, Handler, Transport};
use crate::shutdown::Shutdown;

/// How often an idle receive thread wakes to look for the shutdown signal.
pub const POLL: Duration = Duration::from_millis(100);

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

/// The receive loop of one socket; runs on a blocking thread until shutdown.
pub fn serve(
    sock: UdpSocket,
    handler: Arc<Handler>,
    shutdown: Shutdown,
    tracker: TaskTracker,
    rt: Handle,
) {
    let sock = Arc::new(sock);
    let mut buf = vec![0u8; 65_535];
    let mut out = Vec::with_capacity(4096);
    while !shutdown.is_shutdown() {
        let (n, src) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e) if is_transient(&e) => continue,
            Err(e) => {
                error!(error = %e, "udp listener failed");
                break;
            }
        };
        match handler.answer_fast(&buf[..n], src, Transport::Udp, &mut out) {
            Fast::Reply => send(&sock, &out, src),
            Fast::Drop => {}
            Fast::Miss => {
                let msg = Bytes::copy_from_slice(&buf[..n]);
                let (sock, handler) = (sock.clone(), handler.clone());
                // The pipeline's future (about 3 KB) is boxed once, so the task itself stays
                // small: tokio moves a task's whole future by value when it creates the task
                // and again when the task finishes, several cold 3 KB copies per miss.
                tracker.spawn_on(
                    async move {
                        let answer = Box::pin(handler.answer(msg, src, Transport::Udp));
                        if let Some(reply) = answer.await {
                            send_nonblocking(&sock, &reply, src);
                        }
                    },
                    &rt,
                );
            }
        }
    }
}

/// From a runtime task: never block a worker thread on a full send buffer (the socket itself
/// is blocking, for its receive thread; O_NONBLOCK would be shared, so the flag is per call).
fn send_nonblocking(sock: &UdpSocket, msg: &[u8], to: SocketAddr) {
    let s = socket2::SockRef::from(sock);
    if let Err(e) = s.send_to_with_flags(msg, &to.into(), libc::MSG_DONTWAIT) {
        debug!(error = %e, %to, "udp send (dropped)");
    }
}

fn send(sock: &UdpSocket, msg: &[u8], to: SocketAddr) {
    if let Err(e) = sock.send_to(msg, to) {
        debug!(error = %e, %to, "udp send");
    }
}
