//! Client-facing sockets. `udp.rs` and `tcp.rs` are the only code that touches them.
//!
//! [`start`] binds every listen address for UDP and TCP (on the same port: with port 0 the
//! UDP port is chosen first and TCP binds to it too). Each address gets `udp_workers` UDP
//! sockets sharing the port through SO_REUSEPORT, each with its own receive thread, and one
//! TCP accept task.
//! [`Running::shutdown`] stops the listeners and waits for in-flight queries.

mod tcp;
mod udp;

pub(crate) use tcp::accept;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::handler::Handler;
use crate::shutdown::{self, Trigger};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr} ({proto}): permission denied. Ports below 1024 need root or CAP_NET_BIND_SERVICE (setcap cap_net_bind_service=+ep /path/to/flatdns); or use an unprivileged port, e.g. --listen 127.0.0.1:5353")]
    Privileged {
        addr: SocketAddr,
        proto: &'static str,
    },
    #[error("cannot listen on {addr} ({proto}): {source}")]
    Bind {
        addr: SocketAddr,
        proto: &'static str,
        source: io::Error,
    },
}

fn bind_error(addr: SocketAddr, proto: &'static str, e: io::Error) -> ServerError {
    if e.kind() == io::ErrorKind::PermissionDenied {
        ServerError::Privileged { addr, proto }
    } else {
        ServerError::Bind {
            addr,
            proto,
            source: e,
        }
    }
}

fn socket(addr: SocketAddr, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    if addr.is_ipv6() {
        // [::] must not take IPv4 too, so 0.0.0.0 and [::] can both be listed.
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    Ok(s)
}

/// A UDP socket for a blocking receive thread: SO_REUSEPORT so several share the port, a
/// receive timeout so the thread notices shutdown, a send timeout so a full send buffer
/// cannot stall it, and a large receive buffer to ride out bursts.
fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let s = socket(addr, Type::DGRAM, Protocol::UDP)?;
    s.set_nonblocking(false)?;
    s.set_reuse_port(true)?;
    s.set_read_timeout(Some(udp::POLL))?;
    s.set_write_timeout(Some(Duration::from_millis(50)))?;
    // Best effort: the kernel caps it at net.core.rmem_max.
    let _ = s.set_recv_buffer_size(4 << 20);
    s.bind(&addr.into())?;
    Ok(s.into())
}

fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = socket(addr, Type::STREAM, Protocol::TCP)?;
    // Restart without waiting out TIME_WAIT connections of the previous process.
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// Binds `workers` UDP sockets and a TCP listener on `addr`; with port 0, all end up on one
/// kernel-chosen port.
fn bind_all(
    addr: SocketAddr,
    workers: usize,
) -> Result<(Vec<std::net::UdpSocket>, TcpListener), ServerError> {
    for _ in 0..20 {
        let first = bind_udp(addr).map_err(|e| bind_error(addr, "udp", e))?;
        let actual = first.local_addr().map_err(|e| bind_error(addr, "udp", e))?;
        let tcp = match bind_tcp(actual) {
            Ok(tcp) => tcp,
            Err(e) if addr.port() == 0 && e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(bind_error(actual, "tcp", e)),
        };
        let mut udp = vec![first];
        for _ in 1..workers {
            udp.push(bind_udp(actual).map_err(|e| bind_error(actual, "udp", e))?);
        }
        return Ok((udp, tcp));
    }
    let in_use = io::Error::from(io::ErrorKind::AddrInUse);
    Err(bind_error(addr, "tcp", in_use))
}

/// A started server.
pub struct Running {
    addrs: Vec<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    handler: Arc<Handler>,
    trigger: Trigger,
    tracker: TaskTracker,
}

/// Binds every listen address and starts serving. Must be called inside a tokio runtime.
pub async fn start(config: Config) -> Result<Running, ServerError> {
    let workers = match config.limits.udp_workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let mut bound = Vec::new();
    for &addr in &config.listen {
        match bind_all(addr, workers) {
            Ok(b) => bound.push(b),
            Err(ServerError::Bind { source, .. })
                if config.listen_is_default && source.kind() == io::ErrorKind::AddrNotAvailable =>
            {
                warn!(%addr, "default listen address not available on this host; skipped");
            }
            Err(e) => return Err(e),
        }
    }
    if bound.is_empty() {
        let addr = config
            .listen
            .first()
            .copied()
            .unwrap_or(([127, 0, 0, 1], 53).into());
        let source = io::Error::from(io::ErrorKind::AddrNotAvailable);
        return Err(ServerError::Bind {
            addr,
            proto: "udp",
            source,
        });
    }
    let metrics_listener = match config.metrics {
        Some(addr) => Some(bind_tcp(addr).map_err(|e| bind_error(addr, "tcp, metrics", e))?),
        None => None,
    };
    let rt = tokio::runtime::Handle::current();
    let handler = Arc::new(Handler::new(config));
    if !handler.config().aliases.is_empty() {
        let h = handler.clone();
        tokio::spawn(async move { h.check_aliases().await });
    }
    let (trigger, shutdown) = shutdown::channel();
    let tracker = TaskTracker::new();
    let mut metrics_addr = None;
    if let Some(listener) = metrics_listener {
        metrics_addr = listener.local_addr().ok();
        // Not tracked: shutdown waits for queries, not for a scrape.
        tokio::spawn(crate::metrics::serve(
            listener,
            handler.metrics().clone(),
            shutdown.clone(),
        ));
    }
    let mut addrs = Vec::new();
    for (udp, tcp) in bound {
        if let Ok(a) = tcp.local_addr() {
            addrs.push(a);
        }
        for sock in udp {
            let (h, s, t, rt) = (
                handler.clone(),
                shutdown.clone(),
                tracker.clone(),
                rt.clone(),
            );
            tracker.spawn_blocking(move || udp::serve(sock, h, s, t, rt));
        }
        let (h, s, t) = (handler.clone(), shutdown.clone(), tracker.clone());
        tracker.spawn(tcp::serve(tcp, h, s, t));
    }
    Ok(Running {
        addrs,
        metrics_addr,
        handler,
        trigger,
        tracker,
    })
}

impl Running {
    /// The bound addresses (UDP and TCP share each one).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Where `/metrics` is served, if it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn handler(&self) -> &Arc<Handler> {
        &self.handler
    }

    /// Stops accepting, then waits up to `grace` for queries in flight to be answered.
    pub async fn shutdown(self, grace: Duration) {
        self.trigger.fire();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            warn!("shutdown: queries still in flight after {grace:?}, exiting anyway");
        } else {
            info!("shutdown complete");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn privileged_port_error_names_the_fix() {
        let e = bind_error(
            "127.0.0.1:53".parse().unwrap(),
            "udp",
            io::Error::from(io::ErrorKind::PermissionDenied),
        );
        let text = e.to_string();
        assert!(
            text.contains("CAP_NET_BIND_SERVICE") && text.contains("--listen 127.0.0.1:5353"),
            "{text}"
        );
    }
}
