//! UDP listener: one blocking receive thread per socket, several sockets per address with
//! SO_REUSEPORT so the kernel spreads clients over them (one per core by default), and for
//! each socket a reply thread that waits for the upstream replies of its misses.
//!
//! Why threads and not a tokio receive loop: at tens of thousands of queries per second a
//! readiness-based loop pays, per packet, an epoll wake-up and a `recvfrom` that fails with
//! EAGAIN on top of the one that succeeds. A thread blocked in `recvfrom` pays exactly one
//! receive and one send per cache hit — the cost of a bare UDP echo. A cache hit is answered
//! on the thread itself.
//!
//! A miss is started on the receive thread too ([`Handler::start_miss`]): the upstream query
//! goes out on its fresh socket (R2), which is then registered with the reply thread's epoll
//! set. The reply thread takes the reply, finishes the miss and sends the answer, so a miss
//! costs one wake-up per side, like dnsdist's receiver and responder threads. What needs
//! more than one exchange (a chase, a TCP retry, the next attempt after a timeout, a waiter
//! on another miss) continues as a runtime task, whose reply goes out on the same socket
//! with MSG_DONTWAIT, so a full send buffer drops that reply instead of stalling a thread.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use tokio::runtime::Handle;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, warn};

use crate::handler::{Fast, Handler, Miss, Progress, Started, Task, Transport};
use crate::shutdown::Shutdown;

/// How often an idle receive or reply thread wakes to look for the shutdown signal.
pub const POLL: Duration = Duration::from_millis(100);

/// The reply thread's own token, for its [`Misses::waker`]; a miss never gets it (see
/// [`Misses::add`]).
const WAKE: Token = Token(usize::MAX);

/// How late a miss's timeout may fire rather than wake the reply thread. The receive thread
/// reads a miss's start before it hands the miss over, and the reply thread may reckon its
/// wait from a later reading in between, so a miss with the same attempt time as the wait
/// can fall due a few microseconds before the wait's end: not worth a wake-up.
const LATE_OK: Duration = Duration::from_millis(1);

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

/// What the threads of one listener socket share.
#[derive(Clone)]
struct Listener {
    sock: Arc<UdpSocket>,
    tracker: TaskTracker,
    rt: Handle,
}

impl Listener {
    /// Runs `task` on the runtime and sends its reply to `client`.
    fn spawn(&self, task: Task, client: SocketAddr) {
        let sock = self.sock.clone();
        self.tracker.spawn_on(
            async move {
                if let Some(reply) = task.await {
                    send_nonblocking(&sock, &reply, client);
                }
            },
            &self.rt,
        );
    }
}

/// The receive loop of one socket; runs on a blocking thread until shutdown.
pub fn serve(
    sock: UdpSocket,
    handler: Arc<Handler>,
    shutdown: Shutdown,
    tracker: TaskTracker,
    rt: Handle,
) {
    let listener = Listener {
        sock: Arc::new(sock),
        tracker,
        rt,
    };
    let receiving = Arc::new(AtomicBool::new(true));
    // However this thread ends (a panic included), the reply thread learns it may stop.
    let _receiving = Lower(receiving.clone());
    let reply_poll = Poll::new().and_then(|poll| {
        let waker = Waker::new(poll.registry(), WAKE)?;
        Ok((poll.registry().try_clone()?, waker, poll))
    });
    let misses = match reply_poll {
        Ok((registry, waker, poll)) => {
            let misses = Arc::new(Misses {
                table: Mutex::new(Table::default()),
                registry,
                waker,
                // Set by the reply thread once it runs: until then (or if the blocking pool
                // never gets to it) misses run as tasks.
                alive: AtomicBool::new(false),
            });
            let (m, l, r) = (misses.clone(), listener.clone(), receiving.clone());
            listener
                .tracker
                .spawn_blocking_on(move || replies(poll, m, l, r), &listener.rt);
            Some(misses)
        }
        Err(e) => {
            // Misses still work, each as a runtime task.
            warn!(error = %e, "no epoll instance for the UDP miss path; misses run as tasks");
            None
        }
    };
    let sock = listener.sock.clone();
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
        let msg = &buf[..n];
        let fast = misses.as_ref().filter(|m| m.alive.load(Ordering::Relaxed));
        let started = match fast {
            Some(_) => handler.answer_udp(msg, src, &mut out),
            None => match handler.answer_fast(msg, src, Transport::Udp, &mut out) {
                Fast::Reply | Fast::Refused => Started::Reply,
                Fast::Drop => Started::Drop,
                Fast::Miss => Started::Async,
            },
        };
        match (started, fast) {
            (Started::Reply, _) => send(&sock, &out, src),
            (Started::Drop, _) => {}
            (Started::Sent(miss), Some(misses)) => {
                if let Err((miss, e)) = misses.add(miss) {
                    debug!(error = %e, "miss handed to a task");
                    listener.spawn(miss.into_task(), src);
                }
            }
            (Started::Task(task), _) => listener.spawn(task, src),
            (Started::Sent(_), None) | (Started::Async, _) => {
                let msg = Bytes::copy_from_slice(msg);
                let h = handler.clone();
                // The pipeline's future (about 3 KB) is boxed once, so the task itself stays
                // small: tokio moves a task's whole future by value when it creates the task
                // and again when the task finishes.
                let task: Task = Box::pin(async move { h.answer(msg, src, Transport::Udp).await });
                listener.spawn(task, src);
            }
        }
    }
}

/// Clears a flag when dropped.
struct Lower(Arc<AtomicBool>);

impl Drop for Lower {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The misses of one listener socket waiting for their first upstream reply, by token.
struct Misses {
    table: Mutex<Table>,
    registry: Registry,
    /// Wakes the reply thread when a miss is due before the end of its current wait.
    waker: Waker,
    /// Cleared (under the table lock) if the reply thread stops: misses then run as tasks.
    alive: AtomicBool,
}

#[derive(Default)]
struct Table {
    next: usize,
    waiting: HashMap<usize, Miss, foldhash::fast::RandomState>,
    /// Every miss's timeout; an entry whose miss is done is skipped.
    deadlines: Deadlines,
    /// The latest time the reply thread is known to look at the deadlines again (the end of
    /// its current or last wait): a miss due before then must wake it, or its timeout would
    /// fire up to [`POLL`] late (the attempt timeout can be as short as 10 ms).
    wait_ends: Option<Instant>,
    /// How long the reply thread waits when no miss is due: the last miss's attempt time
    /// while misses come (at most [`POLL`]), so a miss that arrives during the wait is due
    /// after its end and needs no wake-up; [`POLL`] again after a wait that saw nothing.
    /// With the default 2 s timeout it is always [`POLL`], and no miss ever wakes the thread.
    idle: Option<Duration>,
}

impl Table {
    /// Drops the deadlines of misses that are done from the front, so the reply thread sleeps
    /// until the oldest miss still waiting times out rather than waking for every miss
    /// answered since.
    fn drop_done(&mut self) {
        let waiting = &self.waiting;
        self.deadlines.skip(|token| !waiting.contains_key(&token));
    }
}

/// Timeouts, soonest first. Misses are registered in the order they are sent, each with the
/// same attempt timeout, so deadlines nearly always arrive in order: those go to a FIFO
/// (O(1), and the front is the next to expire). One earlier than the last queued (the
/// timeout was shortened by a reload) goes to a heap instead.
#[derive(Default)]
struct Deadlines {
    fifo: VecDeque<(Instant, usize)>,
    early: BinaryHeap<Reverse<(Instant, usize)>>,
}

impl Deadlines {
    fn push(&mut self, at: Instant, token: usize) {
        match self.fifo.back() {
            Some(&(last, _)) if at < last => self.early.push(Reverse((at, token))),
            _ => self.fifo.push_back((at, token)),
        }
    }

    /// The soonest deadline.
    fn peek(&self) -> Option<(Instant, usize)> {
        let fifo = self.fifo.front().copied();
        let early = self.early.peek().map(|Reverse(d)| *d);
        match (fifo, early) {
            (Some(f), Some(e)) => Some(f.min(e)),
            (f, e) => f.or(e),
        }
    }

    fn pop(&mut self) -> Option<(Instant, usize)> {
        let first = self.peek()?;
        if self.fifo.front() == Some(&first) {
            self.fifo.pop_front()
        } else {
            self.early.pop().map(|Reverse(d)| d)
        }
    }

    /// Pops deadlines from the front while `done` says their miss is over.
    fn skip(&mut self, done: impl Fn(usize) -> bool) {
        while let Some((_, token)) = self.peek() {
            if !done(token) {
                break;
            }
            self.pop();
        }
    }

    fn clear(&mut self) {
        self.fifo.clear();
        self.early.clear();
    }
}

impl Misses {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `miss` to the reply thread. Registered under the lock, so the reply thread
    /// cannot see the socket's event before the miss is in the table.
    fn add(&self, miss: Miss) -> Result<(), (Miss, io::Error)> {
        let mut t = self.lock();
        if !self.alive.load(Ordering::Relaxed) {
            return Err((miss, io::Error::other("the reply thread has stopped")));
        }
        let token = t.next;
        // Tokens run through 0..usize::MAX, never reaching WAKE.
        t.next = (t.next + 1) % WAKE.0;
        let fd = miss.socket().as_raw_fd();
        if let Err(e) = self
            .registry
            .register(&mut SourceFd(&fd), Token(token), Interest::READABLE)
        {
            return Err((miss, e));
        }
        let until = miss.until();
        t.idle = Some(miss.span().min(POLL));
        t.deadlines.push(until, token);
        t.waiting.insert(token, miss);
        let early = t.wait_ends.is_some_and(|end| until + LATE_OK < end);
        if early {
            // The thread will look by `until`: a later miss due no sooner needs no wake-up.
            t.wait_ends = Some(until);
        }
        drop(t);
        if early {
            if let Err(e) = self.waker.wake() {
                // The timeout then fires when the reply thread next wakes, at most POLL late.
                debug!(error = %e, "could not wake the udp reply thread");
            }
        }
        Ok(())
    }
}

/// The reply thread of one listener socket: waits for the upstream sockets of its misses
/// and their timeouts, until the receive thread has stopped and no miss is left. A miss's
/// socket leaves the epoll set when the miss drops it (closing it), so no deregistration.
fn replies(mut poll: Poll, misses: Arc<Misses>, listener: Listener, receiving: Arc<AtomicBool>) {
    misses.alive.store(true, Ordering::Relaxed);
    // However this thread ends, no miss is left behind (see `Stopped`).
    let _stopped = Stopped {
        misses: misses.clone(),
        listener: listener.clone(),
    };
    let mut events = Events::with_capacity(256);
    let mut buf = vec![0u8; 65_535];
    // Every reply this thread sends is rendered here: no allocation per answered miss.
    let mut out = Vec::with_capacity(4096);
    let mut expired = Vec::new();
    // The clock is read once per round, after the events: timeouts are judged by it, and
    // the next wait is measured from it. A timeout can so fire late by the microseconds it
    // takes to hand the expired misses on.
    let mut now = Instant::now();
    loop {
        let wait = {
            let mut t = misses.lock();
            t.drop_done();
            let wait = match t.deadlines.peek() {
                Some((at, _)) => at.saturating_duration_since(now).min(POLL),
                None => t.idle.unwrap_or(POLL),
            };
            t.wait_ends = Some(now + wait);
            wait
        };
        if let Err(e) = poll.poll(&mut events, Some(wait)) {
            if e.kind() != io::ErrorKind::Interrupted {
                error!(error = %e, "udp reply thread failed; misses on this socket run as tasks");
                break;
            }
        }
        for event in events.iter() {
            let token = event.token().0;
            if token == WAKE.0 {
                // Nothing to do: the next wait is reckoned from the deadlines, which now hold
                // the miss that was due before this wait's end.
                continue;
            }
            let Some(miss) = misses.lock().waiting.remove(&token) else {
                continue;
            };
            let client = miss.client();
            // A bug in one miss must not stop every other miss of this socket.
            let progress = catch_unwind(AssertUnwindSafe(|| miss.readable(&mut buf, &mut out)));
            match progress {
                Ok(Progress::Waiting(miss)) => {
                    misses.lock().waiting.insert(token, miss);
                }
                Ok(Progress::Reply) => send_nonblocking(&listener.sock, &out, client),
                Ok(Progress::Task(task)) => listener.spawn(task, client),
                Err(_) => error!(%client, "a query's miss path panicked"),
            }
        }
        now = Instant::now();
        {
            let mut t = misses.lock();
            if events.is_empty() && t.deadlines.peek().is_none() {
                // A wait that saw nothing: the next may be long again.
                t.idle = None;
            }
            while let Some((at, token)) = t.deadlines.peek() {
                if at > now {
                    break;
                }
                t.deadlines.pop();
                if let Some(miss) = t.waiting.remove(&token) {
                    expired.push(miss);
                }
            }
        }
        for miss in expired.drain(..) {
            let client = miss.client();
            listener.spawn(miss.timed_out(), client);
        }
        if !receiving.load(Ordering::Acquire) && misses.lock().waiting.is_empty() {
            break;
        }
    }
}

/// Dropped when the reply thread ends, normally or not: the receive thread stops handing it
/// misses, and every miss still waiting goes on as a task that waits for the same socket.
struct Stopped {
    misses: Arc<Misses>,
    listener: Listener,
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let waiting: Vec<Miss> = {
            let mut t = self.misses.lock();
            self.misses.alive.store(false, Ordering::Relaxed);
            t.deadlines.clear();
            t.waiting.drain().map(|(_, m)| m).collect()
        };
        for miss in waiting {
            let client = miss.client();
            self.listener.spawn(miss.into_task(), client);
        }
    }
}

/// Off the receive thread: never block on a full send buffer (the socket itself is blocking,
/// for its receive thread; O_NONBLOCK would be shared, so the flag is per call).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_come_out_soonest_first_in_or_out_of_order() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut d = Deadlines::default();
        // In order (the FIFO), then earlier ones after a shortened timeout (the heap).
        for (ms, token) in [
            (10, 1),
            (20, 2),
            (30, 3),
            (15, 4),
            (12, 5),
            (40, 6),
            (35, 7),
        ] {
            d.push(at(ms), token);
        }
        assert_eq!(d.fifo.len(), 4);
        assert_eq!(d.peek(), Some((at(10), 1)));
        let order: Vec<usize> = std::iter::from_fn(|| d.pop().map(|(_, t)| t)).collect();
        assert_eq!(order, [1, 5, 4, 2, 3, 7, 6]);
        assert_eq!(d.peek(), None);
        d.push(at(1), 8);
        d.clear();
        assert_eq!(d.pop(), None);
    }

    #[test]
    fn done_misses_leave_the_front_of_the_deadlines() {
        let t0 = Instant::now();
        let mut d = Deadlines::default();
        for token in 0..5 {
            d.push(t0 + Duration::from_millis(token as u64), token);
        }
        // 0, 1 and 3 are answered: the front goes up to 2, which still waits.
        d.skip(|token| [0, 1, 3].contains(&token));
        assert_eq!(d.peek(), Some((t0 + Duration::from_millis(2), 2)));
        d.skip(|_| false);
        assert_eq!(d.fifo.len(), 3);
        let mut t = Table {
            deadlines: d,
            ..Table::default()
        };
        // Nothing waits in an empty table: every deadline goes.
        t.drop_done();
        assert_eq!(t.deadlines.peek(), None);
    }
}
