//! The only code that talks to nameservers: UDP with TC->TCP fallback, TCP, timeouts and
//! failover.
//!
//! Anti-spoofing follows RFC 5452: every attempt uses a fresh random 16-bit ID and a fresh
//! socket, bound to port 0 so the kernel picks a random ephemeral source port, and connected
//! to the server so the kernel itself drops datagrams from any other address. A reply is
//! accepted only if its ID, QR bit, opcode and question (name compared without case, type,
//! class) match the query and the whole message scans; anything else is discarded and the wait
//! goes on until the attempt's deadline (R3).
//!
//! TCP queries (from TCP clients, and retries of truncated UDP replies) go over one reused,
//! pipelined connection per server (`pool`).

mod pool;
pub mod valid;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::time::{timeout_at, Instant};
use tracing::debug;

use crate::metrics::{Metrics, ServerStats};
use crate::wire::{self, Header, HEADER_LEN};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no answer before the deadline")]
    Timeout,
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl UpstreamError {
    /// Whether the upstream is to blame (no answer, refused, reset), as opposed to a local
    /// fault such as running out of sockets.
    pub fn is_upstream_fault(&self) -> bool {
        match self {
            UpstreamError::Timeout => true,
            UpstreamError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::UnexpectedEof
            ),
        }
    }
}

/// A set of nameservers asked in order, one attempt each, at most `attempts` in all.
/// Clones share the TCP connections.
#[derive(Clone)]
pub struct Upstream {
    servers: Vec<SocketAddr>,
    pools: Arc<[pool::Pool]>,
    stats: Arc<[ServerStats]>,
    timeout: Duration,
    attempts: usize,
}

impl Upstream {
    /// `tcp_idle`: how long an upstream TCP connection with nothing outstanding stays open.
    pub fn new(
        servers: Vec<SocketAddr>,
        timeout: Duration,
        attempts: usize,
        tcp_idle: Duration,
    ) -> Upstream {
        Upstream {
            pools: servers
                .iter()
                .map(|&s| pool::Pool::new(s, tcp_idle))
                .collect(),
            stats: servers.iter().map(|_| ServerStats::default()).collect(),
            servers,
            timeout,
            attempts: attempts.max(1),
        }
    }

    /// Counts every attempt in `metrics`, per server, under `role` ("upstream", "resolver").
    pub fn with_metrics(mut self, metrics: &Metrics, role: &'static str) -> Upstream {
        self.stats = self
            .servers
            .iter()
            .map(|&s| metrics.server(role, s))
            .collect();
        self
    }

    /// The servers a query that fails every attempt has asked, in order.
    pub fn tried(&self) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = Vec::new();
        for a in 0..self.attempts {
            if let Some(&s) = self.servers.get(a % self.servers.len().max(1)) {
                if !v.contains(&s) {
                    v.push(s);
                }
            }
        }
        v
    }

    /// Sends `query` (any ID; a fresh one is set per attempt) and returns the first matching
    /// reply, with the upstream's ID still in it.
    pub async fn query(
        &self,
        query: &[u8],
        tcp: bool,
        deadline: Instant,
    ) -> Result<Bytes, UpstreamError> {
        self.query_from(query, tcp, deadline).await.map(|(r, _)| r)
    }

    /// [`Upstream::query`], also saying which server the reply came from.
    ///
    /// Attempt k goes to server k (wrapping), each bounded by the per-attempt timeout and by
    /// `deadline`. A timeout, network error or SERVFAIL/REFUSED moves on to the next attempt;
    /// when every attempt failed, the last SERVFAIL/REFUSED reply is returned if there was one.
    pub async fn query_from(
        &self,
        query: &[u8],
        tcp: bool,
        deadline: Instant,
    ) -> Result<(Bytes, SocketAddr), UpstreamError> {
        self.resume(query, tcp, Resume::START, deadline).await
    }

    /// [`Upstream::query_from`] from where an earlier, non-waiting attempt ([`Upstream::send_udp`]
    /// and [`Upstream::received`]) left off.
    pub async fn resume(
        &self,
        query: &[u8],
        tcp: bool,
        from: Resume,
        deadline: Instant,
    ) -> Result<(Bytes, SocketAddr), UpstreamError> {
        let Resume {
            attempt: first,
            mut fallback,
            mut last_err,
        } = from;
        if self.servers.is_empty() {
            return Err(last_err);
        }
        for attempt in first..self.attempts {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let index = attempt % self.servers.len();
            let server = self.servers[index];
            let until = (now + self.timeout).min(deadline);
            self.stats[index].queries.inc();
            let result =
                match timeout_at(until, exchange(server, &self.pools[index], query, tcp)).await {
                    Ok(r) => r,
                    Err(_) => Err(UpstreamError::Timeout),
                };
            let result = result.map(|reply| (reply, now.elapsed()));
            match self.received(attempt, result) {
                Ok(done) => return Ok(done),
                Err(next) => {
                    if next.fallback.is_some() {
                        fallback = next.fallback;
                    }
                    last_err = next.last_err;
                }
            }
        }
        fallback.ok_or(last_err)
    }

    /// Starts attempt `attempt` over UDP and returns at once: a fresh connected socket (its
    /// own random port, R2) holding the query with a fresh random ID. The caller waits for
    /// the socket itself, checks replies with [`answers`] against the query and [`Sent::id`], and hands
    /// the outcome to [`Upstream::received`]. The listeners' miss path uses this to run a
    /// miss without a runtime task. `now`: the time as the caller just read it (the attempt
    /// begins then).
    pub fn send_udp(
        &self,
        attempt: usize,
        query: &[u8],
        now: Instant,
        deadline: Instant,
    ) -> io::Result<Sent> {
        let index = attempt % self.servers.len().max(1);
        let Some(&server) = self.servers.get(index) else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        let id = rand::random::<u16>();
        let began = now;
        let sock = udp_socket(server);
        let sent = sock.and_then(|s| send_with_id(&s, query, id).map(|_| s));
        // EAGAIN (a full buffer: memory pressure) is not the server's fault: the caller retries
        // the attempt as a task, which waits until the socket is writable, and counts it then.
        if let Err(e) = &sent {
            if e.kind() == io::ErrorKind::WouldBlock {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
        self.stats[index].queries.inc();
        let sock = sent?;
        Ok(Sent {
            sock: sock.into(),
            id,
            server: index,
            began,
            until: (began + self.timeout).min(deadline),
        })
    }

    /// Accounts for the outcome of attempt `attempt` (a reply and how long it took, or why
    /// there was none): the reply to use, or where the next attempt starts.
    pub fn received(
        &self,
        attempt: usize,
        result: Result<(Bytes, Duration), UpstreamError>,
    ) -> Result<(Bytes, SocketAddr), Resume> {
        let index = attempt % self.servers.len().max(1);
        let (Some(stats), Some(&server)) = (self.stats.get(index), self.servers.get(index)) else {
            return Err(Resume::next(attempt, None, UpstreamError::Timeout));
        };
        match result {
            Ok((reply, took)) => {
                stats.answered(took);
                let rcode = reply.get(3).map_or(0, |b| b & 0x0f);
                let failed = rcode == wire::RCODE_SERVFAIL || rcode == wire::RCODE_REFUSED;
                if failed {
                    stats.errors.inc();
                }
                if failed && attempt + 1 < self.attempts && self.servers.len() > 1 {
                    debug!(%server, rcode, "upstream failure reply, trying the next");
                    return Err(Resume::next(
                        attempt,
                        Some((reply, server)),
                        UpstreamError::Timeout,
                    ));
                }
                Ok((reply, server))
            }
            Err(e) => {
                match e {
                    UpstreamError::Timeout => stats.timeouts.inc(),
                    UpstreamError::Io(_) => stats.errors.inc(),
                };
                debug!(%server, error = %e, "upstream attempt failed");
                Err(Resume::next(attempt, None, e))
            }
        }
    }

    /// Retries over TCP a query whose UDP reply (`truncated`) had TC=1, on the same server
    /// ([`Sent::server`]); a failed retry passes the truncated reply on (never cached).
    pub async fn tcp_retry(&self, server: usize, msg: &[u8], truncated: Bytes) -> Bytes {
        match (self.pools.get(server), self.servers.get(server)) {
            (Some(pool), Some(&addr)) => retry_over_tcp(addr, pool, msg, truncated).await,
            _ => truncated,
        }
    }
}

/// Where a query's attempts go on: the next attempt's number, the last SERVFAIL/REFUSED
/// reply so far (returned when every attempt fails) and the last error.
pub struct Resume {
    pub attempt: usize,
    fallback: Option<(Bytes, SocketAddr)>,
    last_err: UpstreamError,
}

impl Resume {
    pub const START: Resume = Resume {
        attempt: 0,
        fallback: None,
        last_err: UpstreamError::Timeout,
    };

    /// After a failed first attempt.
    pub fn after_first() -> Resume {
        Resume::next(0, None, UpstreamError::Timeout)
    }

    fn next(attempt: usize, fallback: Option<(Bytes, SocketAddr)>, e: UpstreamError) -> Resume {
        Resume {
            attempt: attempt + 1,
            fallback,
            last_err: e,
        }
    }
}

/// A UDP attempt on its way ([`Upstream::send_udp`]).
pub struct Sent {
    /// Connected to the server, non-blocking.
    pub sock: std::net::UdpSocket,
    /// The query's fresh ID: replies are checked against it and the query ([`answers`]).
    /// Only the ID is kept, not a copy of the query with it: one allocation fewer per miss.
    pub id: u16,
    /// Which of the servers.
    pub server: usize,
    pub began: Instant,
    /// When this attempt times out.
    pub until: Instant,
}

/// One attempt: UDP (then TCP if truncated), or TCP directly.
async fn exchange(
    server: SocketAddr,
    tcp_pool: &pool::Pool,
    query: &[u8],
    tcp: bool,
) -> Result<Bytes, UpstreamError> {
    if tcp {
        return tcp_pool.query(query).await;
    }
    let mut msg = query.to_vec();
    wire::put_u16(&mut msg, 0, rand::random::<u16>());
    let reply = udp_exchange(server, &msg).await?;
    if Header::read(&reply).is_some_and(|h| h.has(wire::FLAG_TC)) {
        return Ok(retry_over_tcp(server, tcp_pool, &msg, reply).await);
    }
    Ok(reply)
}

/// The TCP retry of a query (`msg`) whose UDP reply was `truncated`: same attempt, same
/// deadline (the caller's), and the pool sets a fresh ID. If TCP fails, the truncated reply is
/// passed on (it is never cached).
async fn retry_over_tcp(
    server: SocketAddr,
    pool: &pool::Pool,
    msg: &[u8],
    truncated: Bytes,
) -> Bytes {
    debug!(%server, "truncated over UDP, retrying over TCP");
    match pool.query(msg).await {
        Ok(full) => full,
        Err(e) => {
            debug!(%server, error = %e, "TCP retry failed, passing TC on");
            truncated
        }
    }
}

async fn udp_exchange(server: SocketAddr, msg: &[u8]) -> Result<Bytes, UpstreamError> {
    // Non-blocking from creation, and connect() binds the socket to a random ephemeral port
    // itself (Linux picks it as for bind(0)): two system calls fewer per miss than
    // bind + set_nonblocking, the same fresh random port (R2).
    let sock = udp_socket(server)?;
    // Sent before the socket meets the reactor: a new socket's send buffer is empty, so the
    // send goes out now instead of after a reactor turn has reported the socket writable.
    // Should it still say EAGAIN (memory pressure), the send waits for readiness below.
    let sent = match sock.send(msg) {
        Ok(_) => true,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
        Err(e) => return Err(e.into()),
    };
    let sock = UdpSocket::from_std(sock.into())?;
    if !sent {
        sock.send(msg).await?;
    }
    recv_matching(&sock, msg, wire::u16_at(msg, 0).unwrap_or(0)).await
}

/// Waits on `sock`, a socket from [`Upstream::send_udp`] whose query (`query`, sent with ID
/// `id`) is out, for the matching reply (R3): the listener's miss path hands a miss over to
/// a task this way.
pub async fn wait_udp(
    sock: std::net::UdpSocket,
    query: &[u8],
    id: u16,
) -> Result<Bytes, UpstreamError> {
    let sock = UdpSocket::from_std(sock)?;
    recv_matching(&sock, query, id).await
}

/// The first datagram on `sock` that answers `query` sent with ID `id`; the others are
/// discarded.
async fn recv_matching(sock: &UdpSocket, query: &[u8], id: u16) -> Result<Bytes, UpstreamError> {
    let server = sock.peer_addr().ok();
    loop {
        sock.readable().await?;
        // Received into this thread's 64 KiB buffer, then copied at its exact length: a miss
        // pays neither a 64 KiB allocation (whose free makes glibc consolidate its fastbins
        // and trim the heap) nor a memset.
        let got = RECV_BUF.with_borrow_mut(|buf| {
            let n = sock.try_recv(buf)?;
            let reply = &buf[..n];
            io::Result::Ok(answers(query, id, reply).then(|| Bytes::copy_from_slice(reply)))
        });
        match got {
            Ok(Some(reply)) => return Ok(reply),
            Ok(None) => debug!(?server, "discarded a reply that does not match the query"),
            // Readiness was stale (tokio has cleared it): wait again.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends `query` with its ID replaced by `id`, from a copy on the stack when it fits (a
/// query is rarely longer than 512 octets).
fn send_with_id(sock: &socket2::Socket, query: &[u8], id: u16) -> io::Result<usize> {
    let mut small = [0u8; 512];
    let mut large = Vec::new();
    let msg = match small.get_mut(..query.len()) {
        Some(m) => {
            m.copy_from_slice(query);
            m
        }
        None => {
            large.extend_from_slice(query);
            &mut large[..]
        }
    };
    wire::put_u16(msg, 0, id);
    sock.send(msg)
}

/// A fresh UDP socket connected to `server`.
fn udp_socket(server: SocketAddr) -> io::Result<socket2::Socket> {
    let domain = socket2::Domain::for_address(server);
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM.nonblocking().cloexec(), None)?;
    sock.connect(&server.into())?;
    Ok(sock)
}

thread_local! {
    /// Receive buffer for upstream UDP replies: one per runtime worker, borrowed only between
    /// a readiness report and the copy out, never across an await.
    static RECV_BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; 65_535].into_boxed_slice());
}

/// Whether `reply` answers `query` (RFC 5452 section 9.1) and scans as a whole message.
pub fn matches(query: &[u8], reply: &[u8]) -> bool {
    Header::read(query).is_some_and(|q| answers(query, q.id, reply))
}

/// [`matches`] for `query` sent with the ID `id` instead of its own.
pub fn answers(query: &[u8], id: u16, reply: &[u8]) -> bool {
    let (Some(q), Some(r)) = (Header::read(query), Header::read(reply)) else {
        return false;
    };
    if r.id != id
        || !r.has(wire::FLAG_QR)
        || r.opcode() != q.opcode()
        || r.qdcount != 1
        || q.qdcount != 1
    {
        return false;
    }
    let Ok(name_end) = wire::skip_name(query, HEADER_LEN) else {
        return false;
    };
    // Name without case (0x20 randomisation upstream of us is allowed), type and class exact.
    let (Some(rn), Some(rtc), Some(qtc)) = (
        reply.get(HEADER_LEN..name_end),
        reply.get(name_end..name_end + 4),
        query.get(name_end..name_end + 4),
    ) else {
        return false;
    };
    if !wire::name_eq(rn, &query[HEADER_LEN..name_end]) || rtc != qtc {
        return false;
    }
    // More than one OPT is malformed (RFC 6891 6.1.1), and a second one could carry a client's
    // cookie past the stripping that shared answers get. The scan counts them on its way.
    if let Some((parses, opts)) = valid::scan_counting(reply) {
        return parses && opts <= 1;
    }
    let mut opts = 0;
    if wire::walk_records(reply, |r| opts += usize::from(r.rtype == wire::TYPE_OPT)).is_err()
        || opts > 1
    {
        return false;
    }
    well_formed_domain(reply)
}

/// Whether every name in `reply` decompresses (no pointer loops, forward pointers or names
/// over 255 octets) and every record of a known type parses. The hot path's scanner never
/// follows pointers, so without this a reply with a pointer loop would be passed to the
/// client (R20). [`valid::scan`] for the common record types, `domain` for the rest.
/// [`matches`] makes this same decision for every upstream reply (never on a cache hit),
/// inline there because it also counts the OPT records on the way.
pub fn well_formed(reply: &[u8]) -> bool {
    valid::scan(reply).unwrap_or_else(|| well_formed_domain(reply))
}

/// [`well_formed`] as a full parse with `domain`, which caps pointer chains.
pub fn well_formed_domain(reply: &[u8]) -> bool {
    use domain::base::name::ParsedName;
    use domain::base::Message;
    use domain::rdata::AllRecordData;
    let Ok(m) = Message::from_slice(reply) else {
        return false;
    };
    if m.question().any(|q| q.is_err()) {
        return false;
    }
    let Ok(mut section) = m.answer() else {
        return false;
    };
    loop {
        for rec in &mut section {
            let Ok(rec) = rec else { return false };
            if rec
                .to_any_record::<AllRecordData<&[u8], ParsedName<&[u8]>>>()
                .is_err()
            {
                return false;
            }
        }
        match section.next_section() {
            Ok(Some(next)) => section = next,
            Ok(None) => return true,
            Err(_) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::hex;

    #[test]
    fn a_reply_with_two_opt_records_is_rejected() {
        // Found by fuzzing (reply target): the second OPT carries a cookie.
        let reply = hex("12348180000100010000000203777777076578616d706c650000010001c00c000100010000012c0004c000020100002904d000000000000000002904d000000000000c000a00080001020304050607");
        let mut q = reply[..29].to_vec();
        q[2] = 0x01;
        q[3] = 0x00;
        q[6..12].copy_from_slice(&[0, 0, 0, 0, 0, 0]);
        assert!(!matches(&q, &reply));
        // The same reply with one OPT is accepted.
        let mut one = reply[..45].to_vec();
        one[11] = 1;
        one.extend_from_slice(&hex("00002904d0000000000000"));
        assert!(matches(&q, &one));
    }

    /// A reply with a TXT answer: a type the scan leaves to `domain`, so OPTs are counted
    /// by the walk instead.
    fn txt_reply(opts: usize) -> (Vec<u8>, Vec<u8>) {
        let mut reply = hex("12348180000100010000000003777777076578616d706c650000100001");
        reply[11] = opts as u8;
        reply.extend_from_slice(&hex("c00c001000010000003c000403616263"));
        for _ in 0..opts {
            reply.extend_from_slice(&hex("00002904d0000000000000"));
        }
        let mut q = reply[..29].to_vec();
        q[2] = 0x01;
        q[3] = 0x00;
        q[6..12].copy_from_slice(&[0, 0, 0, 0, 0, 0]);
        (q, reply)
    }

    #[test]
    fn two_opt_records_are_rejected_when_domain_checks_the_reply() {
        let (q, one) = txt_reply(1);
        assert_eq!(valid::scan(&one), None);
        assert!(matches(&q, &one));
        let (q, two) = txt_reply(2);
        assert!(!matches(&q, &two));
    }

    #[test]
    fn a_reply_must_carry_the_id_sent_not_the_query_s_own() {
        let (mut q, reply) = txt_reply(1);
        wire::put_u16(&mut q, 0, 0x1234);
        assert!(answers(&q, 0x1234, &reply));
        assert!(!answers(&q, 0x4321, &reply));
        wire::put_u16(&mut q, 0, 0x4321);
        // The reply's ID (0x1234) is the one sent; the query's own ID does not count.
        assert!(answers(&q, 0x1234, &reply));
        assert!(!matches(&q, &reply));
    }

    #[test]
    fn a_query_goes_out_whole_with_the_new_id_whatever_its_length() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let sock = udp_socket(server.local_addr().unwrap()).unwrap();
        for len in [12, 512, 513, 1400] {
            let query: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            send_with_id(&sock, &query, 0xbeef).unwrap();
            let mut buf = [0u8; 2048];
            let n = server.recv(&mut buf).unwrap();
            assert_eq!(n, len);
            assert_eq!(&buf[..2], &[0xbe, 0xef]);
            assert_eq!(&buf[2..n], &query[2..]);
        }
    }

    #[test]
    fn a_reply_with_a_pointer_loop_is_rejected() {
        let mut reply = hex("12348180000100010000000003777777076578616d706c650000010001");
        reply.extend_from_slice(&[0xc0, 29, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 1, 2, 3, 4]);
        let mut q = reply[..29].to_vec();
        q[2] = 0x01;
        q[3] = 0x00;
        q[6..12].copy_from_slice(&[0, 0, 0, 0, 0, 0]);
        assert!(!matches(&q, &reply));
    }
}
