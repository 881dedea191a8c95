//! Name resolution and TCP connects to the upstream (or the egress proxy), bounded in time.
//!
//! `getaddrinfo` blocks and cannot be cancelled. Run on tokio's shared blocking pool (what
//! `tokio::net::lookup_host` does), a resolver that hangs would hold those threads: the file
//! reads of reloads queue behind it, and the runtime's shutdown waits for them, so the process
//! would not exit. Lookups therefore run on their own detached threads, at most
//! [`MAX_LOOKUPS`] at once; a caller waits only until its deadline, and a lookup that never
//! returns costs one parked thread, never a reload or the exit. A thread whose lookup returned
//! waits [`IDLE_KEEP`] for the next one before it ends: starting a thread per dial cost more
//! than the TLS handshake's signature (about 250 µs of CPU per connection to an upstream given by
//! name, measured with `../shared/bench`), and a name is still resolved at every dial.
//!
//! Connects try each address in turn, but one that does not answer (a black-holed address)
//! gets only a share of what is left of `--connect-timeout`, so the next one is still tried.
//! Every socket gets TCP keepalive so a peer that vanishes without a FIN is noticed.

use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::ThreadId;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::time::{Instant, timeout_at};

/// Lookups in flight at once, process-wide. Past this, lookups wait for a slot (until their
/// deadline): a resolver that hangs costs at most this many parked threads.
pub const MAX_LOOKUPS: usize = 16;

/// How long a resolver thread with nothing to do waits for the next lookup before it ends.
pub const IDLE_KEEP: Duration = Duration::from_secs(10);

/// Keepalive: first probe after this much silence ...
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// ... then one every this often ...
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// ... and the connection is dropped after this many unanswered: a dead peer is noticed
/// within 30 + 3 * 10 = 60 s.
const KEEPALIVE_PROBES: u32 = 3;

/// The least one address gets before the next is tried, when several remain (unless less
/// than this is left in all).
const ATTEMPT_FLOOR: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the lookup did not finish in time")]
    Timeout,
    #[error(
        "no lookup started: {MAX_LOOKUPS} earlier lookups have not returned (is the DNS server \
         answering?)"
    )]
    Busy,
    #[error("cannot start a resolver thread: {0}")]
    Thread(io::Error),
    #[error("{0}")]
    Lookup(io::Error),
}

/// A bounded set of resolver threads.
#[derive(Debug, Clone)]
pub struct Resolver {
    slots: Arc<Semaphore>,
    threads: Arc<Threads>,
}

impl Resolver {
    pub fn new(max: usize) -> Resolver {
        Resolver {
            slots: Arc::new(Semaphore::new(max)),
            threads: Arc::new(Threads {
                idle: Mutex::default(),
                idle_keep: IDLE_KEEP,
            }),
        }
    }

    /// A resolver whose idle threads end after `idle_keep` (tests).
    #[cfg(test)]
    fn with_idle_keep(max: usize, idle_keep: Duration) -> Resolver {
        let mut r = Resolver::new(max);
        Arc::get_mut(&mut r.threads).expect("new").idle_keep = idle_keep;
        r
    }

    /// Resolver threads waiting for a lookup (tests).
    #[cfg(test)]
    fn idle_threads(&self) -> usize {
        self.threads.idle().len()
    }

    /// The process-wide resolver.
    pub fn global() -> &'static Resolver {
        static GLOBAL: std::sync::OnceLock<Resolver> = std::sync::OnceLock::new();
        GLOBAL.get_or_init(|| Resolver::new(MAX_LOOKUPS))
    }

    /// Resolve `host:port` before `deadline`. IP literals need no lookup.
    pub async fn lookup(
        &self,
        host: &str,
        port: u16,
        deadline: Instant,
    ) -> Result<Vec<SocketAddr>, Error> {
        if let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let host = host.to_string();
        self.run(deadline, move || {
            (host.as_str(), port)
                .to_socket_addrs()
                .map(Iterator::collect)
        })
        .await
    }

    /// Run the blocking `lookup` on a resolver thread holding one slot; wait for it until
    /// `deadline`. The thread gives its slot back once the lookup returned, however late.
    pub async fn run<F>(&self, deadline: Instant, lookup: F) -> Result<Vec<SocketAddr>, Error>
    where
        F: FnOnce() -> io::Result<Vec<SocketAddr>> + Send + 'static,
    {
        let permit = match timeout_at(deadline, self.slots.clone().acquire_owned()).await {
            Ok(Ok(p)) => p,
            // The semaphore is never closed; treat it like a full one.
            Ok(Err(_)) | Err(_) => return Err(Error::Busy),
        };
        let (tx, rx) = oneshot::channel();
        let job = Job {
            run: Box::new(move || {
                // The caller may have given up; nothing to do then.
                let _ = tx.send(lookup());
            }),
            slot: permit,
        };
        self.threads.execute(job).map_err(Error::Thread)?;
        match timeout_at(deadline, rx).await {
            Err(_) => Err(Error::Timeout),
            Ok(Err(_)) => Err(Error::Lookup(io::Error::other(
                "the resolver thread panicked",
            ))),
            Ok(Ok(r)) => r.map_err(Error::Lookup),
        }
    }
}

/// A lookup for a resolver thread, and the slot it holds until the thread is free again.
struct Job {
    run: Box<dyn FnOnce() + Send>,
    slot: OwnedSemaphorePermit,
}

/// Resolver threads with nothing to do, each waiting [`IDLE_KEEP`] on its own channel for a
/// job. A thread is started only when none is idle, and every thread that is not idle holds a
/// slot (it gives the slot back only once it is on this list), so there are never more threads
/// than slots.
#[derive(Debug)]
struct Threads {
    idle: Mutex<Vec<Idle>>,
    /// [`IDLE_KEEP`] (shorter in tests).
    idle_keep: Duration,
}

#[derive(Debug)]
struct Idle {
    thread: ThreadId,
    jobs: mpsc::Sender<Job>,
}

impl Threads {
    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hand `job` to an idle thread, or start one.
    fn execute(self: &Arc<Self>, mut job: Job) -> io::Result<()> {
        // Each turn takes one entry off the list, so this ends.
        loop {
            let Some(idle) = self.idle().pop() else {
                return self.start(job);
            };
            match idle.jobs.send(job) {
                Ok(()) => return Ok(()),
                // That thread is gone (its lookup panicked after it listed itself): next.
                Err(mpsc::SendError(back)) => job = back,
            }
        }
    }

    fn start(self: &Arc<Self>, job: Job) -> io::Result<()> {
        let threads = Arc::clone(self);
        std::thread::Builder::new()
            .name("resolver".into())
            .spawn(move || threads.work(job))
            .map(drop)
    }

    /// A resolver thread: run the job, list itself as idle, then give the slot back; wait for
    /// the next job until its idle time has passed.
    fn work(&self, first: Job) {
        let thread = std::thread::current().id();
        let mut job = first;
        loop {
            let Job { run, slot } = job;
            run();
            let (jobs, next) = mpsc::channel();
            self.idle().push(Idle { thread, jobs });
            drop(slot);
            job = match next.recv_timeout(self.idle_keep) {
                Ok(j) => j,
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {
                    let mut idle = self.idle();
                    if let Some(i) = idle.iter().position(|t| t.thread == thread) {
                        idle.swap_remove(i);
                        return;
                    }
                    drop(idle);
                    // A lookup took this thread off the list just now and is sending its job
                    // (or dropped the sender, which ends the wait too).
                    match next.recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    }
                }
            };
        }
    }
}

/// `now + limit`, saturating: a deadline far in the future instead of a panic on overflow.
pub fn deadline_after(limit: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(limit)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 86_400)))
        .unwrap_or(now)
}

/// How long the address at `index` (of `count`) may take to connect, with `left` remaining:
/// an equal share of what is left among the addresses not yet tried, at least
/// [`ATTEMPT_FLOOR`]; the last address gets all that is left.
pub fn attempt_budget(left: Duration, index: usize, count: usize) -> Duration {
    let remaining = count.saturating_sub(index).max(1);
    if remaining == 1 {
        return left;
    }
    let share = left / u32::try_from(remaining).unwrap_or(u32::MAX);
    share.max(ATTEMPT_FLOOR).min(left)
}

/// Why connecting to every address failed.
#[derive(Debug)]
pub enum ConnectEnd {
    /// The overall deadline passed while trying `at`.
    Deadline { at: SocketAddr },
    /// Every address failed; the errors are in the attempts list.
    AllFailed,
}

/// Connect to each address in turn until one answers, each within its share of the time left
/// before `deadline`. Every failed address is pushed to `attempts` (a silent one as
/// `TimedOut`). The stream has `TCP_NODELAY` and keepalive set.
pub async fn connect_each(
    addrs: &[SocketAddr],
    deadline: Instant,
    attempts: &mut Vec<(SocketAddr, io::Error)>,
) -> Result<(TcpStream, SocketAddr), ConnectEnd> {
    for (i, &addr) in addrs.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let budget = attempt_budget(left, i, addrs.len());
        let until = Instant::now().checked_add(budget).unwrap_or(deadline);
        match timeout_at(until, TcpStream::connect(addr)).await {
            Err(_) if until >= deadline => return Err(ConnectEnd::Deadline { at: addr }),
            Err(_) => attempts.push((
                addr,
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no answer within {} (its share of the connect timeout)",
                        humantime::format_duration(budget)
                    ),
                ),
            )),
            Ok(Err(e)) => attempts.push((addr, e)),
            Ok(Ok(s)) => {
                tune(&s);
                return Ok((s, addr));
            }
        }
    }
    Err(ConnectEnd::AllFailed)
}

/// `TCP_NODELAY` (small writes of interactive protocols must not wait for Nagle) and keepalive
/// (a peer that vanished without a FIN is noticed within about a minute). Best effort: a
/// socket that refuses an option still works.
pub fn tune(s: &TcpStream) {
    let _ = s.set_nodelay(true);
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let _ = SockRef::from(s).set_tcp_keepalive(&keepalive);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_share_what_is_left() {
        let s = Duration::from_secs;
        assert_eq!(attempt_budget(s(10), 0, 2), s(5));
        assert_eq!(attempt_budget(s(10), 1, 2), s(10));
        assert_eq!(attempt_budget(s(9), 0, 3), s(3));
        // The floor, but never more than is left.
        assert_eq!(attempt_budget(s(2), 0, 10), s(1));
        assert_eq!(
            attempt_budget(Duration::from_millis(300), 0, 10),
            Duration::from_millis(300)
        );
        assert_eq!(attempt_budget(s(5), 0, 1), s(5));
        assert_eq!(attempt_budget(s(5), 3, 1), s(5));
    }

    /// Wait (bounded) until `resolver` has `n` idle threads; false if it never does.
    fn idle_becomes(resolver: &Resolver, n: usize) -> bool {
        for _ in 0..500 {
            if resolver.idle_threads() == n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// The thread that ran a lookup.
    async fn which_thread(resolver: &Resolver) -> std::thread::ThreadId {
        let (tx, rx) = std::sync::mpsc::channel();
        resolver
            .run(Instant::now() + Duration::from_secs(5), move || {
                let _ = tx.send(std::thread::current().id());
                Ok(vec![])
            })
            .await
            .unwrap();
        rx.recv_timeout(Duration::from_secs(5)).unwrap()
    }

    /// A lookup after another goes to the same thread instead of starting one, and concurrent
    /// lookups never use more threads than there are slots.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn threads_are_reused_and_never_more_than_the_slots() {
        let resolver = Resolver::with_idle_keep(2, Duration::from_secs(60));
        let first = which_thread(&resolver).await;
        assert!(
            idle_becomes(&resolver, 1),
            "the thread did not wait for more"
        );
        assert_eq!(
            which_thread(&resolver).await,
            first,
            "a new thread was started"
        );

        // Waves of four lookups at once on two slots: at most two threads, ever.
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10 {
            let wave = (0..4).map(|_| which_thread(&resolver));
            seen.extend(futures::future::join_all(wave).await);
        }
        assert!(seen.len() <= 2, "{} threads for 2 slots", seen.len());
        assert!(seen.contains(&first));
    }

    /// A thread with nothing to do for its idle time ends; the next lookup starts another.
    #[tokio::test]
    async fn idle_threads_end() {
        let resolver = Resolver::with_idle_keep(2, Duration::from_secs(1));
        let first = which_thread(&resolver).await;
        assert!(
            idle_becomes(&resolver, 1),
            "the thread did not wait for more"
        );
        assert!(idle_becomes(&resolver, 0), "the idle thread did not end");
        assert_ne!(
            which_thread(&resolver).await,
            first,
            "an ended thread ran a lookup"
        );
    }

    /// A lookup that never returns ends at the deadline, and once every slot is held by one,
    /// later lookups fail at their deadline instead of queueing forever; neither touches
    /// tokio's blocking pool, so the runtime shuts down at once.
    #[test]
    fn hung_lookups_are_bounded_and_do_not_hold_the_runtime() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let hold = Arc::new(std::sync::Mutex::new(hold));
        let resolver = Resolver::new(1);
        rt.block_on(async {
            let started = Instant::now();
            let h = hold.clone();
            let r = resolver
                .run(started + Duration::from_millis(200), move || {
                    // Hangs until the test ends.
                    let _ = h.lock().map(|rx| rx.recv());
                    Ok(vec![])
                })
                .await;
            assert!(matches!(r, Err(Error::Timeout)), "{r:?}");
            assert!(started.elapsed() < Duration::from_secs(2));
            // The one slot is still held by the hung lookup.
            let started = Instant::now();
            let r = resolver
                .run(started + Duration::from_millis(200), || Ok(vec![]))
                .await;
            assert!(matches!(r, Err(Error::Busy)), "{r:?}");
            assert!(started.elapsed() < Duration::from_secs(2));
            // The blocking pool (one thread here) is free for a reload's file reads.
            let read =
                tokio::time::timeout(Duration::from_secs(2), tokio::task::spawn_blocking(|| 42))
                    .await;
            assert_eq!(read.ok().and_then(Result::ok), Some(42));
            // A working resolver answers; IP literals need no thread.
            let other = Resolver::new(1);
            let r = other
                .lookup("[::1]", 8443, Instant::now() + Duration::from_secs(1))
                .await
                .unwrap();
            assert_eq!(r, vec!["[::1]:8443".parse().unwrap()]);
        });
        let started = std::time::Instant::now();
        rt.shutdown_timeout(Duration::from_secs(30));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the runtime waited for the hung lookup"
        );
        drop(release);
    }

    /// With two addresses where the first never answers (a listener whose accept queue is
    /// full, so the kernel drops SYNs), the second is reached well within the timeout.
    #[tokio::test]
    async fn a_silent_first_address_costs_only_its_share() {
        let Some((silent, _hole)) = black_hole().await else {
            eprintln!("skipped: could not make a listener that drops SYNs");
            return;
        };
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        let started = Instant::now();
        let mut attempts = Vec::new();
        let (s, at) = connect_each(
            &[silent, good_addr],
            started + Duration::from_secs(6),
            &mut attempts,
        )
        .await
        .unwrap();
        let took = started.elapsed();
        assert_eq!(at, good_addr);
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(5),
            "{took:?}"
        );
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].1.kind(), io::ErrorKind::TimedOut);
        let keepalive = SockRef::from(&s).keepalive().unwrap();
        assert!(keepalive, "keepalive is set on upstream sockets");
    }

    /// A loopback address whose SYNs go unanswered: a listener with a backlog of 0 that never
    /// accepts, filled until a connect no longer completes. The listener and the connections
    /// that filled it are returned so they live as long as the test.
    async fn black_hole() -> Option<(SocketAddr, (socket2::Socket, Vec<TcpStream>))> {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
        sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .ok()?;
        sock.listen(0).ok()?;
        let addr = sock.local_addr().ok()?.as_socket()?;
        let mut held = Vec::new();
        for _ in 0..16 {
            match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
                Ok(Ok(c)) => held.push(c),
                Ok(Err(_)) => return None,
                Err(_) => return Some((addr, (sock, held))),
            }
        }
        None
    }
}
