//! A UDP miss without a runtime task, for the common case.
//!
//! The listener's receive thread starts the miss itself ([`Handler::answer_udp`]): the same
//! checks and bookkeeping as [`Handler::answer`] (pending slot, coalescing, in-flight
//! permit), then the first upstream attempt goes out on a fresh connected socket (R2), and
//! the [`Miss`] is handed to the listener's reply thread, which waits for that socket with
//! the sockets of every other miss of the listener ([`crate::server`]). When the reply comes,
//! [`Miss::readable`] checks it (R3) and, when it needs nothing more (no chase, no TCP retry,
//! no further attempt), flattens, caches and renders the answer right there.
//!
//! Why: a miss run as a tokio task paid a wake-up of a runtime worker on top of the reply's
//! (the task is spawned from the receive thread), a reactor registration and deregistration
//! of the upstream socket, and the task's own machinery: about 1.5x dnsdist's CPU per miss.
//! Here the kernel's readiness report for the upstream socket is the only hand-off, as in
//! dnsdist, whose receive and responder threads this mirrors.
//!
//! Everything else (a waiter on another miss, serve-stale, a config ALIAS, a chase or zone
//! ALIAS lookup, a TC=1 reply, a timeout or failure that moves on to the next attempt) goes
//! on as an ordinary task from where the miss stood, through the same code as
//! [`Handler::answer`]: the fast path only decides who runs the steps, never what they do.
//! A miss the reply thread cannot take ([`Miss::into_task`]) becomes a task that waits on
//! the same socket, so its first attempt is neither lost nor counted as a failure.

use std::future::Future;
use std::io;
use std::pin::Pin;

use super::*;
use crate::upstream::{answers, Resume, Sent};

/// A reply-producing task for the listener to spawn; `None`: send nothing.
pub type Task = Pin<Box<dyn Future<Output = Option<Vec<u8>>> + Send + 'static>>;

/// What [`Handler::answer_udp`] did.
pub enum Started {
    /// `out` holds the reply (from the cache, or a local one).
    Reply,
    /// Send nothing.
    Drop,
    /// The first attempt is on its way: wait for [`Miss::socket`] to be readable, or for
    /// [`Miss::until`].
    Sent(Miss),
    /// Run this task.
    Task(Task),
    /// Not for this path: run [`Handler::answer`] in a task.
    Async,
}

/// What became of a miss on an event.
pub enum Progress {
    /// Still waiting (nothing, or only replies that did not match, R3).
    Waiting(Miss),
    /// Done: send the reply left in `out` to the client.
    Reply,
    /// Needs more work: run this task.
    Task(Task),
}

/// A miss whose first upstream attempt is out.
pub struct Miss {
    /// Boxed: a miss moves between threads and tables, and `Led` holds the query.
    led: Box<Led>,
    sent: Sent,
}

/// The client's query, inline when it is no longer than this (nearly every query is): part
/// of the `Led` allocation rather than one more made on the receive thread and freed on the
/// reply thread. Its key is the coalescing slot's ([`Lead`]).
type QueryBytes = smallvec::SmallVec<[u8; 128]>;

/// A miss that leads its key's lookup: everything needed to finish it.
struct Led {
    handler: Arc<Handler>,
    settings: Arc<Settings>,
    msg: QueryBytes,
    /// `msg` as the receive thread scanned it: the reply thread does not scan it again.
    scanned: wire::Scanned,
    client: SocketAddr,
    lead: Lead,
    _pending: crate::limit::Slot,
    /// When the first attempt began (the cached answer's TTLs count from here).
    began: Instant,
    deadline: Instant,
    started: Option<std::time::Instant>,
}

/// Where a task takes a miss up.
enum Next {
    /// At the given attempt.
    Resume(Resume),
    /// Attempt 0 is out: with its TC=1 reply (retried over TCP), or to be waited for here.
    Attempt(Sent, Option<Bytes>),
    /// The upstream's reply is in; flattening needs a lookup.
    Reply(Bytes),
}

impl Handler {
    /// A UDP query, from the listener's receive thread: answered from the cache (steps 1-4,
    /// [`Handler::answer_fast`]), or started as a miss. Never waits.
    pub fn answer_udp(
        self: &Arc<Self>,
        msg: &[u8],
        client: SocketAddr,
        out: &mut Vec<u8>,
    ) -> Started {
        match self.fast(msg, client, Transport::Udp, out) {
            Fasted::Done(Fast::Reply | Fast::Refused) => Started::Reply,
            Fasted::Done(Fast::Drop) => Started::Drop,
            Fasted::Done(Fast::Miss) => Started::Async,
            Fasted::Miss(missed) => self.start_miss(missed, client, out),
        }
    }

    /// Starts a UDP query that missed the cache.
    fn start_miss(
        self: &Arc<Self>,
        missed: Missed<'_>,
        client: SocketAddr,
        out: &mut Vec<u8>,
    ) -> Started {
        let Missed {
            q,
            key,
            started,
            now,
            held,
        } = missed;
        if self.trace.is_some() {
            return Started::Async;
        }
        let Some(key) = key else {
            return Started::Async;
        };
        let s = self.settings.load_full();
        if !s.aliases.is_empty() && self.alias_for(&s, &q) {
            return Started::Async;
        }
        if self.config.cache.stale.is_some() && self.stale_candidate(&q).is_some() {
            return Started::Async;
        }
        // From here on as in `answer` and `resolve`.
        self.metrics.cache_misses.inc();
        let Some(pending) = self.pending.acquire(client.ip()) else {
            debug!(%client, "pending-per-client limit reached");
            response::error_for(&q, wire::RCODE_SERVFAIL, out);
            self.done(
                Transport::Udp,
                client,
                Some(&q),
                out,
                Served::LOCAL,
                started,
            );
            return Started::Reply;
        };
        let now = now.unwrap_or_else(Instant::now);
        let deadline = now + self.config.limits.client_deadline;
        let lead = match self.role(key.as_bytes(), held) {
            Role::Lead(lead) => lead,
            Role::Wait(w) => {
                let (h, msg) = (self.clone(), Bytes::copy_from_slice(q.wire));
                return Started::Task(Box::pin(async move {
                    let _pending = pending;
                    let got = match timeout_at(deadline, w.wait()).await {
                        Ok(Some(e)) => Got::Shared(e),
                        _ => Got::Failed,
                    };
                    let q = Query::parse(&msg).ok()?;
                    Some(h.reply(&q, client, got, started))
                }));
            }
            Role::Failed => {
                self.reply_into(&q, client, Got::Failed, started, None, out);
                return Started::Reply;
            }
        };
        let led = Box::new(Led {
            handler: self.clone(),
            msg: QueryBytes::from_slice(q.wire),
            scanned: q.scanned(),
            client,
            lead,
            _pending: pending,
            began: now,
            deadline,
            started,
            settings: s,
        });
        match led.settings.upstream.send_udp(0, q.wire, now, deadline) {
            Ok(sent) => Started::Sent(Miss { led, sent }),
            // Not sent, not counted: attempt 0 again, from a task that can wait to send.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                Started::Task(led.go_on(Next::Resume(Resume::START)))
            }
            Err(e) => {
                let from = match led.settings.upstream.received(0, Err(e.into())) {
                    Err(from) => from,
                    // Not for an error; to be safe, as a failed first attempt.
                    Ok(_) => Resume::after_first(),
                };
                Started::Task(led.go_on(Next::Resume(from)))
            }
        }
    }

    /// Whether a config ALIAS stands at `q`'s name for its type.
    fn alias_for(&self, s: &Settings, q: &Query<'_>) -> bool {
        if !matches!(q.qtype, wire::TYPE_A | wire::TYPE_AAAA) || q.qclass != wire::CLASS_IN {
            return false;
        }
        let mut name = Vec::with_capacity(q.qname().len());
        wire::push_lower(&mut name, q.qname());
        s.aliases.contains_key(&name)
    }

    /// The client's reply from its lookup, counted and logged.
    fn reply(
        &self,
        q: &Query<'_>,
        client: SocketAddr,
        got: Got,
        started: Option<std::time::Instant>,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        self.reply_into(q, client, got, started, None, &mut out);
        out
    }

    /// Renders the client's reply to `q` from `got` into `out`, counted and logged. `now`:
    /// the time, if the caller has just read it ([`Handler::render_got`]).
    fn reply_into(
        &self,
        q: &Query<'_>,
        client: SocketAddr,
        got: Got,
        started: Option<std::time::Instant>,
        now: Option<Instant>,
        out: &mut Vec<u8>,
    ) {
        let limit = self.limit(q, Transport::Udp);
        let served = self.render_got(got, q, client.ip(), limit, now, out);
        debug!(%client, qtype = q.qtype, rcode = out.get(3).map(|b| b & 0x0f), len = out.len(), "answered");
        self.done(Transport::Udp, client, Some(q), out, served, started);
    }
}

impl Miss {
    /// The socket the upstream's reply comes to.
    pub fn socket(&self) -> &std::net::UdpSocket {
        &self.sent.sock
    }

    /// When the attempt times out: then call [`Miss::timed_out`].
    pub fn until(&self) -> Instant {
        self.sent.until
    }

    /// How long the attempt was given, from its sending to [`Miss::until`].
    pub fn span(&self) -> Duration {
        self.sent.until.saturating_duration_since(self.sent.began)
    }

    /// The socket is readable: takes every datagram waiting there (the socket is
    /// edge-triggered) until one is the reply.
    /// A finished miss leaves its client's reply in `out` (the reply thread's one buffer).
    pub fn readable(self, buf: &mut [u8], out: &mut Vec<u8>) -> Progress {
        loop {
            match self.sent.sock.recv(buf) {
                Ok(n) => {
                    let reply = &buf[..n];
                    if answers(&self.led.msg, self.sent.id, reply) {
                        let reply = Bytes::copy_from_slice(reply);
                        return self.replied(reply, out);
                    }
                    debug!(server = ?self.sent.sock.peer_addr().ok(), "discarded a reply that does not match the query");
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Progress::Waiting(self),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Progress::Task(self.failed(UpstreamError::Io(e))),
            }
        }
    }

    /// The client to send the reply to.
    pub fn client(&self) -> SocketAddr {
        self.led.client
    }

    /// No reply within the attempt's time: the next attempt, as a task.
    pub fn timed_out(self) -> Task {
        self.failed(UpstreamError::Timeout)
    }

    /// The whole miss as a task, still waiting for attempt 0 on the same socket (when the
    /// reply thread cannot take it).
    pub fn into_task(self) -> Task {
        self.led.go_on(Next::Attempt(self.sent, None))
    }

    fn failed(self, e: UpstreamError) -> Task {
        let from = match self.led.settings.upstream.received(0, Err(e)) {
            Err(from) => from,
            // `received` never takes an error for an answer; to be safe, as a failed attempt.
            Ok(_) => Resume::after_first(),
        };
        self.led.go_on(Next::Resume(from))
    }

    fn replied(self, reply: Bytes, out: &mut Vec<u8>) -> Progress {
        let Miss { led, sent } = self;
        if wire::Header::read(&reply).is_some_and(|h| h.has(wire::FLAG_TC)) {
            return Progress::Task(led.go_on(Next::Attempt(sent, Some(reply))));
        }
        drop(sent);
        let upstream = &led.settings.upstream;
        // The one clock read of the reply's side: how long the attempt took, and the age the
        // answer is given with.
        let now = Instant::now();
        let took = now.saturating_duration_since(led.began);
        let reply = match upstream.received(0, Ok((reply, took))) {
            Ok((reply, _)) => reply,
            Err(from) => return Progress::Task(led.go_on(Next::Resume(from))),
        };
        // The query as the receive thread scanned it, for both steps below.
        let Some(q) = led.scanned.of(&led.msg) else {
            return Progress::Task(led.go_on(Next::Reply(reply)));
        };
        let h = led.handler.clone();
        let Some(flattened) = h.flatten_now(&led.settings, &q, &reply) else {
            return Progress::Task(led.go_on(Next::Reply(reply)));
        };
        let p = h.entry_from(reply, flattened, led.began);
        let Led {
            client,
            lead,
            started,
            ..
        } = *led;
        h.settle(lead, &p);
        h.reply_into(&q, client, Got::Leader(p), started, Some(now), out);
        Progress::Reply
    }
}

impl Led {
    /// The rest of the miss as a task, from `next`.
    fn go_on(self, next: Next) -> Task {
        Box::pin(async move {
            let s = self.settings.clone();
            let h = self.handler.clone();
            let deadline = self.deadline;
            let q = Query::parse(&self.msg).ok()?;
            let upstream = &s.upstream;
            let asked = match next {
                Next::Resume(from) => upstream.resume(q.wire, false, from, deadline).await,
                Next::Attempt(sent, udp_reply) => {
                    let Sent {
                        sock,
                        id,
                        server,
                        began,
                        until,
                    } = sent;
                    let reply = match udp_reply {
                        // TC=1: the UDP socket is done with, closed before the TCP retry.
                        Some(reply) => {
                            drop(sock);
                            Ok(reply)
                        }
                        None => {
                            let waited = crate::upstream::wait_udp(sock, q.wire, id);
                            match timeout_at(until, waited).await {
                                Ok(r) => r,
                                Err(_) => Err(UpstreamError::Timeout),
                            }
                        }
                    };
                    let got = attempt_rest(upstream, server, q.wire, began, until, reply).await;
                    match upstream.received(0, got) {
                        Ok(done) => Ok(done),
                        Err(from) => upstream.resume(q.wire, false, from, deadline).await,
                    }
                }
                Next::Reply(reply) => Ok((reply, SocketAddr::from(([0, 0, 0, 0], 0)))),
            };
            let p = h
                .produced(&s, &q, asked.map(|(r, _)| r), self.began, deadline)
                .await;
            let Led {
                msg,
                client,
                lead,
                started,
                ..
            } = self;
            let q = Query::parse(&msg).ok()?;
            let mut out = Vec::new();
            h.settle(lead, &p);
            h.reply_into(&q, client, Got::Leader(p), started, None, &mut out);
            Some(out)
        })
    }
}

/// The rest of attempt 0 once its UDP exchange ended (`reply`): a TC=1 reply is retried over
/// TCP within the attempt's time, as `Upstream::query_from` does. The outcome with how long
/// the attempt took, for [`crate::upstream::Upstream::received`].
async fn attempt_rest(
    upstream: &crate::upstream::Upstream,
    server: usize,
    msg: &[u8],
    began: Instant,
    until: Instant,
    reply: Result<Bytes, UpstreamError>,
) -> Result<(Bytes, Duration), UpstreamError> {
    let reply = match reply {
        Ok(r) if wire::Header::read(&r).is_some_and(|h| h.has(wire::FLAG_TC)) => {
            match timeout_at(until, upstream.tcp_retry(server, msg, r)).await {
                Ok(full) => Ok(full),
                Err(_) => Err(UpstreamError::Timeout),
            }
        }
        other => other,
    };
    reply.map(|r| (r, began.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `x.test. A` with ID 0x1234, RD, no EDNS.
    fn query() -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x01x\x04test\x00\x00\x01\x00\x01");
        q
    }

    /// A one-shot upstream on loopback: answers the first query with `x.test. 300 A
    /// 192.0.2.1` after `delay`.
    async fn upstream(delay: Duration) -> SocketAddr {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                return;
            };
            tokio::time::sleep(delay).await;
            let mut reply = buf[..n].to_vec();
            reply[2] |= 0x80; // QR
            reply[7] = 1; // ANCOUNT
            reply.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4, 192, 0, 2, 1]);
            let _ = sock.send_to(&reply, from).await;
        });
        addr
    }

    /// A miss the reply thread cannot take goes on as a task that waits on the very socket
    /// its first attempt went out on: the client gets the answer, and it is cached.
    #[tokio::test]
    async fn a_miss_handed_to_a_task_still_gets_its_first_reply() {
        let up = upstream(Duration::from_millis(50)).await;
        let config = Config::for_test("127.0.0.1:0".parse().unwrap(), vec![up]);
        let h = Arc::new(Handler::new(config));
        let client: SocketAddr = "127.0.0.1:5300".parse().unwrap();
        let mut out = Vec::new();
        let Started::Sent(miss) = h.answer_udp(&query(), client, &mut out) else {
            panic!("expected the first attempt to go out");
        };
        assert_eq!(miss.client(), client);
        let reply = timeout_at(Instant::now() + Duration::from_secs(5), miss.into_task())
            .await
            .expect("answered in time")
            .expect("a reply");
        let header = wire::Header::read(&reply).unwrap();
        assert_eq!((header.id, header.rcode(), header.ancount), (0x1234, 0, 1));
        assert_eq!(&reply[reply.len() - 4..], &[192, 0, 2, 1]);
        // One attempt, answered: nothing moved on to another, and the answer is cached.
        let text = h.metrics().render();
        let count = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        };
        assert_eq!(count("flatdns_upstream_queries_total"), Some(1), "{text}");
        assert_eq!(count("flatdns_upstream_timeouts_total"), Some(0), "{text}");
        assert!(matches!(
            h.answer_fast(&query(), client, Transport::Udp, &mut out),
            Fast::Reply
        ));
    }

    /// The same when the reply takes longer than the attempt's time: the task times out
    /// attempt 0 and counts it once (one server, so no attempt follows).
    #[tokio::test]
    async fn a_handed_over_miss_times_out_like_any_attempt() {
        let up = upstream(Duration::from_secs(10)).await;
        let mut config = Config::for_test("127.0.0.1:0".parse().unwrap(), vec![up]);
        config.timeout = Duration::from_millis(200);
        config.attempts = 1;
        let h = Arc::new(Handler::new(config));
        let client: SocketAddr = "127.0.0.1:5300".parse().unwrap();
        let mut out = Vec::new();
        let Started::Sent(miss) = h.answer_udp(&query(), client, &mut out) else {
            panic!("expected the first attempt to go out");
        };
        let reply = miss.into_task().await.expect("a reply");
        assert_eq!(
            wire::Header::read(&reply).unwrap().rcode(),
            wire::RCODE_SERVFAIL
        );
        let text = h.metrics().render();
        assert!(
            text.lines()
                .any(|l| l.starts_with("flatdns_upstream_timeouts_total") && l.ends_with(" 1")),
            "{text}"
        );
    }
}
