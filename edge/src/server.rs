//! The daemon: binds the listeners, serves connections, reloads on SIGHUP
//! (a bad config is refused and the old one keeps serving), watches
//! certificate files, and drains gracefully on SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot, watch};
use tracing::Instrument;

use arc_swap::ArcSwap;

use crate::admin::{self, Admin, Control, Tokens};
use crate::cache::http::HttpCache;
use crate::cache::storage::{Storage, StorageConfig};
use crate::config::{Config, ConfigError, ListenerConfig};
use crate::listener::steer::{self, SteeredSocket};
use crate::listener::tls::{CertSet, CertStore, TlsError, server_config};
use crate::listener::{Inherited, bind_tcp};
use crate::metrics::{Metrics, Outcome};
use crate::proxy::{Proxy, Runtime};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Build(String),
    #[error("signals: {0}")]
    Signals(std::io::Error),
}

/// Counts live client connections, and wakes a waiter when none are left.
#[derive(Debug, Default)]
struct ConnCounter {
    n: AtomicUsize,
    zero: Notify,
}

struct ConnToken(Arc<ConnCounter>);

impl ConnToken {
    fn new(c: &Arc<ConnCounter>) -> Self {
        c.n.fetch_add(1, Ordering::AcqRel);
        ConnToken(c.clone())
    }
}

impl Drop for ConnToken {
    fn drop(&mut self) {
        if self.0.n.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.zero.notify_waiters();
        }
    }
}

impl ConnCounter {
    async fn wait_zero(&self) {
        loop {
            let notified = self.zero.notified();
            if self.n.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ListenerKey {
    address: SocketAddr,
    tls: bool,
    alpn: Vec<String>,
    reuse_port: bool,
    http3: bool,
}

impl ListenerKey {
    fn of(l: &ListenerConfig) -> Self {
        ListenerKey {
            address: l.address,
            tls: l.tls,
            alpn: l.alpn.clone(),
            reuse_port: l.reuse_port,
            http3: l.tls && l.http3,
        }
    }
}

/// A running listener: its sockets and the tasks that serve them.
struct Listening {
    /// The address as configured (port 0 included).
    addr: SocketAddr,
    key: ListenerKey,
    bound: SocketAddr,
    /// The listening TCP socket. Kept across reloads while the listener's
    /// address stays, whatever else changes.
    tcp: Arc<TcpListener>,
    /// The QUIC endpoints (UDP sockets), when the listener serves HTTP/3.
    udp: Vec<quinn::Endpoint>,
    /// The endpoints' sockets (descriptors of the same sockets), to hand over.
    udp_socks: Vec<std::net::UdpSocket>,
    /// The endpoints' steering (as `udp_socks`), to follow a new process
    /// after a handover.
    udp_steer: Vec<Arc<SteeredSocket>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    /// The QUIC endpoints' accept loops, when the listener serves HTTP/3.
    h3_tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Listening {
    /// Stops the accept loops and waits for them; the sockets close when
    /// the last holder drops them.
    async fn stop(self) -> (Arc<TcpListener>, Vec<quinn::Endpoint>) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        for t in self.h3_tasks {
            let _ = t.await;
        }
        (self.tcp, self.udp)
    }

    async fn close(self) {
        drop(self.stop().await);
    }
}

/// Everything a listener needs, built and bound but not yet serving: a
/// reload prepares every new listener first, and only when all are ready
/// does anything change.
struct Prepared {
    cfg: ListenerConfig,
    /// The running listener (an index) whose sockets this one takes over.
    from: Option<usize>,
    bound: SocketAddr,
    tcp: Arc<TcpListener>,
    udp: Vec<quinn::Endpoint>,
    udp_socks: Vec<std::net::UdpSocket>,
    udp_steer: Vec<Arc<SteeredSocket>>,
    /// Whether `udp` comes from the running listener (then its server
    /// config is set at the swap) or was bound now.
    udp_reused: bool,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    h3: Option<quinn::ServerConfig>,
}

/// What a reload does with one listener of the new config.
enum Plan {
    /// The running listener at this index, untouched.
    Keep(usize),
    New(Box<Prepared>),
}

/// The Alt-Svc value of each TLS port that also serves HTTP/3.
fn alt_svc_map(
    listeners: &[Listening],
    cfg: &Config,
) -> std::collections::HashMap<u16, http::HeaderValue> {
    let mut m = std::collections::HashMap::new();
    if !cfg.http3.alt_svc {
        return m;
    }
    for l in listeners.iter().filter(|l| l.key.http3) {
        let v = format!(
            "h3=\":{}\"; ma={}",
            l.bound.port(),
            cfg.http3.alt_svc_max_age.get().as_secs()
        );
        if let Ok(v) = http::HeaderValue::from_str(&v) {
            m.insert(l.bound.port(), v);
        }
    }
    m
}

/// What a running server has bound, for printing and for tests.
#[derive(Clone, Debug)]
pub struct Bound {
    pub listeners: Vec<(bool, SocketAddr)>,
    pub admin: Option<SocketAddr>,
}

struct Shared {
    proxy: Arc<Proxy>,
    certs: Arc<CertStore>,
    conn_stop: watch::Receiver<bool>,
    conns: Arc<ConnCounter>,
    slots: Arc<Semaphore>,
    max_conns: AtomicUsize,
    /// Sockets passed at start (systemd socket activation), taken by the
    /// listeners that name their addresses.
    inherited: std::sync::Mutex<Inherited>,
}

/// Runs the edge until SIGTERM or SIGINT, then drains and returns.
/// `on_ready` is called once every listener is bound.
pub async fn run(
    config: Config,
    path: Option<PathBuf>,
    on_ready: impl FnOnce(&Bound),
) -> Result<(), ServerError> {
    run_with(config, path, Inherited::default(), on_ready).await
}

/// [`run`], with sockets the process was started with (systemd socket
/// activation): a listener whose address one of them has takes it instead
/// of binding.
pub async fn run_with(
    config: Config,
    path: Option<PathBuf>,
    inherited: Inherited,
    on_ready: impl FnOnce(&Bound),
) -> Result<(), ServerError> {
    let metrics = Metrics::new();
    let config = Arc::new(config);
    let certs = CertStore::new(CertSet::load(&config.tls)?);
    let runtime = Runtime::build(config.clone(), None, &metrics).map_err(ServerError::Build)?;
    let cache = open_cache(&config, &metrics).await?;
    let proxy = Proxy::new(runtime, metrics.clone(), cache.clone());
    let (conn_stop_tx, conn_stop) = watch::channel(false);
    let shared = Arc::new(Shared {
        proxy: proxy.clone(),
        certs: certs.clone(),
        conn_stop,
        conns: Arc::new(ConnCounter::default()),
        slots: Arc::new(Semaphore::new(config.server.max_connections)),
        max_conns: AtomicUsize::new(config.server.max_connections),
        inherited: std::sync::Mutex::new(inherited),
    });

    // Signals first, so a SIGHUP or SIGTERM during start-up is not lost.
    use tokio::signal::unix::{SignalKind, signal};
    let mut sighup = signal(SignalKind::hangup()).map_err(ServerError::Signals)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(ServerError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(ServerError::Signals)?;

    if config.listeners.iter().any(|l| l.reuse_port)
        && std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
            .is_ok_and(|v| v.trim() == "0")
    {
        tracing::warn!(
            "net.ipv4.tcp_migrate_req is 0: during a SO_REUSEPORT upgrade, connections queued on the old \
             listener will be reset; set it to 1 for lossless upgrades"
        );
    }
    let tokens = Arc::new(ArcSwap::from_pointee(
        Tokens::load(&config.admin).map_err(ServerError::Build)?,
    ));
    let mut listeners = Vec::new();
    let plans = plan_listeners(&config, &listeners, &shared)?;
    commit_listeners(plans, &mut listeners, &shared, &config).await;
    let (control_tx, mut control_rx) = mpsc::channel::<Control>(8);
    let (admin_stop_tx, admin_stop) = watch::channel(false);
    let mut admin_addr = None;
    // The admin socket's descriptor, to hand over.
    let mut admin_fd = None;
    let mut admin_task = None;
    if let Some(addr) = config.admin.listen {
        let l = match shared.take_tcp(addr) {
            Some(l) => l,
            None => {
                bind_tcp(addr, false, 128).map_err(|source| ServerError::Bind { addr, source })?
            }
        };
        admin_addr = l.local_addr().ok();
        admin_fd = std::os::fd::AsFd::as_fd(&l).try_clone_to_owned().ok();
        let overload_shared = shared.clone();
        let overloaded = Arc::new(move || {
            let rt = overload_shared.proxy.runtime();
            let max = rt.config.server.max_connections;
            let limit = match rt.config.server.overload_connections {
                0 => max - max / 10,
                n => n,
            };
            overload_shared.conns.n.load(Ordering::Acquire) >= limit
        });
        let a = Admin {
            proxy: proxy.clone(),
            tokens: tokens.clone(),
            control: control_tx.clone(),
            overloaded,
        };
        admin_task = Some(tokio::spawn(admin::serve(l, a, admin_stop)));
    }
    proxy.set_alt_svc(alt_svc_map(&listeners, &config));
    on_ready(&Bound {
        listeners: listeners.iter().map(|l| (l.key.tls, l.bound)).collect(),
        admin: admin_addr,
    });
    systemd_notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("serving"),
    ]);
    spawn_watchdog();
    let (handover_tx, mut handover_rx) = mpsc::channel::<Handover>(4);
    if let Some(p) = &config.server.handover_socket {
        match bind_handover(p) {
            Ok(l) => {
                tokio::spawn(serve_handover(l, handover_tx));
            }
            Err(e) => {
                tracing::error!(path = %p.display(), error = %e, "cannot listen on the handover socket: upgrades will not hand over sockets")
            }
        }
    }
    tracing::info!(listeners = listeners.len(), "meridian-edge ready");
    if let Ok(i) = shared.inherited.lock()
        && !i.is_empty()
    {
        tracing::warn!(unused = ?i.leftover(), "inherited sockets that no listener names");
    }

    let mut cert_tick = tokio::time::interval(
        config
            .tls
            .watch_interval
            .map_or(Duration::from_secs(3600), |d| {
                d.get().max(Duration::from_millis(100))
            }),
    );
    cert_tick.tick().await;
    let mut handed_over = false;
    loop {
        tokio::select! {
            _ = sighup.recv() => {
                tracing::info!("SIGHUP: reloading");
                notify_reloading();
                let _ = reload(&shared, path.as_ref(), &mut listeners, &tokens).await;
                systemd_notify(&[sd_notify::NotifyState::Ready]);
            }
            Some(Control::Reload(reply)) = control_rx.recv() => {
                notify_reloading();
                let r = reload(&shared, path.as_ref(), &mut listeners, &tokens).await;
                systemd_notify(&[sd_notify::NotifyState::Ready]);
                let _ = reply.send(r);
            }
            _ = cert_tick.tick() => {
                let rt = proxy.runtime();
                if rt.config.tls.watch_interval.is_some() && certs.current().changed_on_disk() {
                    reload_certs(&shared, &rt.config).await;
                }
            }
            Some(h) = handover_rx.recv() => match h {
                Handover::Fds(reply) => {
                    let _ = reply.send(handover_fds(&listeners, admin_fd.as_ref()));
                }
                Handover::Done => {
                    handed_over = true;
                    break;
                }
            },
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }

    let cfg = proxy.runtime().config.clone();
    systemd_notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("draining"),
    ]);
    if handed_over {
        // The new process serves on the same sockets: stop accepting at
        // once (admin too), readiness untouched, and finish what is in flight.
        let _ = admin_stop_tx.send(true);
        tracing::info!(grace = ?cfg.server.graceful_timeout.get(), "sockets handed over: draining");
    } else {
        // Drain: not ready, stop accepting, let in-flight requests finish.
        proxy.set_draining(true);
        tracing::info!(grace = ?cfg.server.graceful_timeout.get(), "draining: /readyz now answers 503");
        if !cfg.server.drain_delay.get().is_zero() {
            tokio::time::sleep(cfg.server.drain_delay.get()).await;
        }
    }
    for l in listeners.drain(..) {
        l.close().await;
    }
    let _ = conn_stop_tx.send(true);
    let open = shared.conns.n.load(Ordering::Acquire);
    if tokio::time::timeout(cfg.server.graceful_timeout.get(), shared.conns.wait_zero())
        .await
        .is_err()
    {
        tracing::warn!(
            left = shared.conns.n.load(Ordering::Acquire),
            "grace period over; closing remaining connections"
        );
    } else {
        tracing::info!(drained = open, "all connections finished");
    }
    let _ = admin_stop_tx.send(true);
    // Admin requests in flight are answered (admin::serve bounds the wait).
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    if let Some(c) = &cache
        && let Err(e) = c.storage.close().await
    {
        tracing::warn!(error = %e, "closing the cache storage failed");
    }
    Ok(())
}

/// Between the handover socket's task and the control loop.
enum Handover {
    /// A new process asks: the descriptors of every listening socket.
    Fds(oneshot::Sender<HandoverFds>),
    /// The new process serves: stop accepting and drain.
    Done,
}

/// What the running edge hands over: descriptors (duplicates) of every
/// listening socket, and, at the same index, the steering of each QUIC
/// socket (none for TCP and admin sockets).
struct HandoverFds {
    fds: Vec<std::os::fd::OwnedFd>,
    steer: Vec<Option<Arc<SteeredSocket>>>,
}

/// Each listener's TCP socket and QUIC UDP sockets, and the admin socket.
fn handover_fds(listeners: &[Listening], admin: Option<&std::os::fd::OwnedFd>) -> HandoverFds {
    use std::os::fd::AsFd;
    let mut out = HandoverFds {
        fds: Vec::new(),
        steer: Vec::new(),
    };
    for l in listeners {
        if let Ok(fd) = l.tcp.as_fd().try_clone_to_owned() {
            out.fds.push(fd);
            out.steer.push(None);
        }
        for (u, st) in l.udp_socks.iter().zip(&l.udp_steer) {
            if let Ok(fd) = u.as_fd().try_clone_to_owned() {
                out.fds.push(fd);
                out.steer.push(Some(st.clone()));
            }
        }
    }
    if let Some(fd) = admin.and_then(|a| a.try_clone().ok()) {
        out.fds.push(fd);
        out.steer.push(None);
    }
    out
}

/// Listens on the handover socket, readable and writable by this user only.
fn bind_handover(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// How long a new process may take from receiving the sockets to serving.
const TAKEOVER_WAIT: Duration = Duration::from_secs(300);

/// Hands the sockets to each process that connects, one at a time, and
/// tells the control loop once one of them serves.
async fn serve_handover(listener: tokio::net::UnixListener, control: mpsc::Sender<Handover>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "handover accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (tx, rx) = oneshot::channel();
        if control.send(Handover::Fds(tx)).await.is_err() {
            return;
        }
        let Ok(HandoverFds { fds, steer }) = rx.await else {
            return;
        };
        let n = fds.len();
        let std = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "handover: bad stream");
                continue;
            }
        };
        let r = tokio::task::spawn_blocking(move || {
            std.set_nonblocking(false)?;
            std.set_write_timeout(Some(Duration::from_secs(10)))?;
            crate::listener::handover::send_fds(&std, &fds, steer::process_tag())?;
            drop(fds);
            Ok::<_, std::io::Error>(crate::listener::handover::wait_ready(&std, TAKEOVER_WAIT))
        })
        .await;
        match r {
            Ok(Ok(Some(pairs))) => {
                // The new process reads the QUIC sockets from now on and
                // forwards what belongs to this one's connections.
                let mut steered = 0;
                for (i, fd) in pairs {
                    match steer.get(i) {
                        Some(Some(st)) => match st.follow_successor(fd) {
                            Ok(()) => steered += 1,
                            Err(e) => tracing::warn!(error = %e, "handover: QUIC steering failed"),
                        },
                        _ => tracing::warn!(
                            index = i,
                            "handover: a forwarding pair for a socket that is not QUIC"
                        ),
                    }
                }
                tracing::info!(
                    sockets = n,
                    quic_steered = steered,
                    "handover: the new process serves; draining"
                );
                let _ = control.send(Handover::Done).await;
                return;
            }
            Ok(Ok(None)) => {
                tracing::warn!("handover: the new process went away before serving; still serving")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "handover failed; still serving"),
            Err(e) => tracing::warn!(error = %e, "handover task failed; still serving"),
        }
    }
}

/// Opens the cache's storage, if any site caches. The storage settings take
/// effect at start-up; a reload keeps the storage that is open.
async fn open_cache(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<Option<Arc<HttpCache>>, ServerError> {
    if !config.sites.iter().any(|s| s.cache.enabled) {
        return Ok(None);
    }
    let c = &config.cache;
    if let Some(dir) = &c.disk_dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| ServerError::Build(format!("cache directory {}: {e}", dir.display())))?;
    }
    let storage = Storage::open(StorageConfig {
        memory_capacity: c.memory.get(),
        disk_dir: c.disk_dir.clone(),
        disk_capacity: c.disk.get(),
        chunk_size: u32::try_from(c.chunk_size.get()).unwrap_or(1 << 20),
        max_object_size: c.max_object_size.get(),
        memory_eviction: None,
        disk_block_size: None,
    })
    .await
    .map_err(|e| ServerError::Build(format!("cache storage: {e}")))?;
    // foyer does not report disk evictions: drop index entries of evicted objects now and then.
    let sweeper = storage.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        tick.tick().await;
        loop {
            tick.tick().await;
            match sweeper.sweep_index().await {
                Ok(n) if n > 0 => tracing::debug!(dropped = n, "cache index swept"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cache index sweep failed"),
            }
        }
    });
    Ok(Some(HttpCache::new(storage, metrics.clone())))
}

/// Tells systemd (Type=notify) about the service's state; a no-op outside systemd.
fn systemd_notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// RELOADING=1 with the monotonic time, as systemd's reload protocol asks.
fn notify_reloading() {
    match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(now) => systemd_notify(&[sd_notify::NotifyState::Reloading, now]),
        Err(_) => systemd_notify(&[sd_notify::NotifyState::Reloading]),
    }
}

/// Pings systemd's watchdog at half its interval while the runtime is alive.
fn spawn_watchdog() {
    // As sd_watchdog_enabled(3): WATCHDOG_USEC set, and WATCHDOG_PID unset or ours.
    let usec = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let ours = std::env::var("WATCHDOG_PID")
        .map_or(true, |p| p.parse::<u32>().ok() == Some(std::process::id()));
    if usec == 0 || !ours {
        return;
    }
    let every = Duration::from_micros(usec / 2);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            systemd_notify(&[sd_notify::NotifyState::Watchdog]);
        }
    });
}

impl Shared {
    fn take_tcp(&self, addr: SocketAddr) -> Option<TcpListener> {
        self.inherited.lock().ok()?.take_tcp(addr)
    }

    fn take_udp(&self, addr: SocketAddr) -> Vec<(std::net::UdpSocket, Option<steer::Forward>)> {
        self.inherited
            .lock()
            .map(|mut i| i.take_udp(addr))
            .unwrap_or_default()
    }
}

/// Finds the running listener a listener of the new config continues: the
/// same configured address, or (when the new one names a port) the address
/// the running one has bound. `taken` marks those already matched.
fn find_running(l: &ListenerConfig, running: &[Listening], taken: &[bool]) -> Option<usize> {
    running.iter().enumerate().position(|(i, r)| {
        !taken[i] && (r.addr == l.address || (l.address.port() != 0 && r.bound == l.address))
    })
}

/// Builds and binds one listener of `cfg` without serving it: the TCP
/// socket (or the running one's, when `from` names it), the QUIC sockets,
/// the TLS acceptor. Dropping the result closes what it bound.
fn prepare_listener(
    l: &ListenerConfig,
    from: Option<&Listening>,
    from_index: Option<usize>,
    shared: &Arc<Shared>,
    cfg: &Config,
) -> Result<Prepared, ServerError> {
    let min13 = cfg.tls.min_version.as_deref() == Some("1.3");
    let (tcp, bound) = match from {
        Some(r) => (r.tcp.clone(), r.bound),
        None => {
            let t = match shared.take_tcp(l.address) {
                Some(t) => t,
                None => bind_tcp(l.address, l.reuse_port, l.backlog).map_err(|source| {
                    ServerError::Bind {
                        addr: l.address,
                        source,
                    }
                })?,
            };
            let bound = t.local_addr().map_err(|source| ServerError::Bind {
                addr: l.address,
                source,
            })?;
            (Arc::new(t), bound)
        }
    };
    let acceptor = if l.tls {
        Some(tokio_rustls::TlsAcceptor::from(server_config(
            shared.certs.clone(),
            &l.alpn,
            min13,
        )?))
    } else {
        None
    };
    let (mut udp, mut udp_socks, mut udp_steer, mut udp_reused, mut h3) =
        (Vec::new(), Vec::new(), Vec::new(), false, None);
    if l.tls && l.http3 {
        let sc = crate::http3::server_config(shared.certs.clone(), &cfg.http3)
            .map_err(|e| ServerError::Build(e.to_string()))?;
        let bind_err = |source| ServerError::Bind {
            addr: bound,
            source,
        };
        match from {
            Some(r) if !r.udp.is_empty() => {
                udp = r.udp.clone();
                udp_socks = r
                    .udp_socks
                    .iter()
                    .map(std::net::UdpSocket::try_clone)
                    .collect::<Result<_, _>>()
                    .map_err(bind_err)?;
                udp_steer = r.udp_steer.clone();
                udp_reused = true;
            }
            _ => {
                // HTTP/3 on the same address and (bound) port, over UDP:
                // inherited sockets, else new ones.
                let mut socks = shared.take_udp(bound);
                if socks.is_empty() {
                    socks = bind_udp(bound, cfg.http3.endpoints)
                        .map_err(|source| {
                            ServerError::Build(format!("binding UDP {bound}: {source}"))
                        })?
                        .into_iter()
                        .map(|s| (s, None))
                        .collect();
                }
                for (s, forward) in socks {
                    // Tagged connection IDs and a steered socket: see
                    // listener::steer (QUIC across a socket handover).
                    let st = SteeredSocket::new(s.try_clone().map_err(bind_err)?, forward)
                        .map_err(bind_err)?;
                    let ep = quinn::Endpoint::new_with_abstract_socket(
                        steer::endpoint_config(),
                        Some(sc.clone()),
                        st.clone(),
                        Arc::new(quinn::TokioRuntime),
                    )
                    .map_err(bind_err)?;
                    udp.push(ep);
                    udp_socks.push(s);
                    udp_steer.push(st);
                }
            }
        }
        h3 = Some(sc);
    }
    Ok(Prepared {
        cfg: l.clone(),
        from: from_index,
        bound,
        tcp,
        udp,
        udp_socks,
        udp_steer,
        udp_reused,
        acceptor,
        h3,
    })
}

/// Binds `n` UDP sockets on `addr` with SO_REUSEPORT (the kernel spreads
/// clients across them), one per QUIC endpoint.
fn bind_udp(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::UdpSocket>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut out = Vec::with_capacity(n.max(1));
    for _ in 0..n.max(1) {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.bind(&addr.into())?;
        out.push(socket.into());
    }
    Ok(out)
}

/// Plans every listener of `cfg` against the running ones: keeps those
/// whose settings are unchanged, prepares the others. Fails, having changed
/// nothing, when any cannot be built or bound.
fn plan_listeners(
    cfg: &Config,
    running: &[Listening],
    shared: &Arc<Shared>,
) -> Result<Vec<Plan>, ServerError> {
    let mut taken = vec![false; running.len()];
    let mut plans = Vec::with_capacity(cfg.listeners.len());
    for l in &cfg.listeners {
        let from = find_running(l, running, &taken);
        if let Some(i) = from {
            taken[i] = true;
            let mut want = ListenerKey::of(l);
            // A port-0 listener that matched by its configured address, or
            // one pinned to the port it has bound: the same listener.
            want.address = running[i].key.address;
            if want == running[i].key {
                plans.push(Plan::Keep(i));
                continue;
            }
            if l.reuse_port != running[i].key.reuse_port {
                tracing::warn!(
                    address = %l.address,
                    "reuse_port changed: the listening socket is kept, so this takes effect on restart"
                );
            }
        }
        let p = prepare_listener(l, from.map(|i| &running[i]), from, shared, cfg)?;
        plans.push(Plan::New(Box::new(p)));
    }
    Ok(plans)
}

/// Starts serving a prepared listener. Cannot fail.
fn spawn_listener(p: Prepared, shared: &Arc<Shared>, cfg: &Config) -> Listening {
    let Prepared {
        cfg: l,
        bound,
        tcp,
        udp,
        udp_socks,
        udp_steer,
        udp_reused,
        acceptor,
        h3,
        ..
    } = p;
    let (stop, mut stop_rx) = watch::channel(false);
    let accept_shared = shared.clone();
    let listener = tcp.clone();
    let task = tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
                _ = stop_rx.changed() => break,
            };
            let Ok(permit) = accept_shared.slots.clone().try_acquire_owned() else {
                accept_shared.proxy.metrics.connections_rejected.inc();
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let token = ConnToken::new(&accept_shared.conns);
            let local = stream.local_addr().unwrap_or(bound);
            let fut = crate::http::serve_tcp(
                stream,
                peer,
                local,
                acceptor.clone(),
                accept_shared.proxy.clone(),
                accept_shared.conn_stop.clone(),
                // Held for the connection's life, a tunnel's after an upgrade included.
                Arc::new((permit, token)),
            );
            let span = tracing::debug_span!("conn", %peer);
            tokio::spawn(fut.instrument(span));
        }
        tracing::info!(%bound, "listener stopped accepting");
    });
    let mut h3_tasks = Vec::new();
    if let Some(sc) = h3 {
        let ctx = crate::http3::H3Ctx {
            proxy: shared.proxy.clone(),
            retry: cfg.http3.retry,
            retry_threshold: cfg.http3.retry_threshold,
            early_data: cfg.http3.early_data,
            handshake_timeout: cfg.limits.tls_handshake_timeout.get(),
            max_header_bytes: cfg.limits.max_header_bytes.get(),
            handshaking: Arc::default(),
            accepted: Default::default(),
        };
        for (i, ep) in udp.iter().enumerate() {
            let mut ctx = ctx.clone();
            ctx.accepted = shared
                .proxy
                .metrics
                .quic_endpoint_connections
                .get_or_create(&crate::metrics::QuicEndpoint {
                    address: bound.to_string(),
                    endpoint: u32::try_from(i).unwrap_or(u32::MAX),
                })
                .clone();
            if udp_reused {
                // The previous accept loop cleared it when it stopped.
                ep.set_server_config(Some(sc.clone()));
            }
            let conns = shared.conns.clone();
            let slots = shared.slots.clone();
            h3_tasks.push(tokio::spawn(crate::http3::serve(
                ep.clone(),
                ctx.clone(),
                stop.subscribe(),
                // QUIC connections take a `max_connections` slot like TCP ones.
                move || {
                    let permit = slots.clone().try_acquire_owned().ok()?;
                    Some((permit, ConnToken::new(&conns)))
                },
            )));
        }
    }
    Listening {
        addr: l.address,
        key: ListenerKey::of(&l),
        bound,
        tcp,
        udp,
        udp_socks,
        udp_steer,
        stop,
        task,
        h3_tasks,
    }
}

/// Applies a plan: the listeners that take over a running one's sockets
/// stop its accept loops and start their own; new ones start; running ones
/// the plan does not name close. Cannot fail.
async fn commit_listeners(
    plans: Vec<Plan>,
    running: &mut Vec<Listening>,
    shared: &Arc<Shared>,
    cfg: &Config,
) {
    let mut old: Vec<Option<Listening>> = running.drain(..).map(Some).collect();
    let mut next = Vec::with_capacity(plans.len());
    for plan in plans {
        match plan {
            Plan::Keep(i) => {
                if let Some(l) = old[i].take() {
                    next.push(l);
                }
            }
            Plan::New(p) => {
                if let Some(i) = p.from
                    && let Some(prev) = old[i].take()
                {
                    // Connections wait in the socket's backlog meanwhile.
                    drop(prev.stop().await);
                    // listen(2) again on a listening socket sets its backlog.
                    let backlog = p.cfg.backlog.min(i32::MAX as u32) as i32;
                    if let Err(e) = socket2::SockRef::from(&*p.tcp).listen(backlog) {
                        tracing::warn!(address = %p.bound, error = %e, "cannot change the backlog");
                    }
                }
                next.push(spawn_listener(*p, shared, cfg));
            }
        }
    }
    for l in old.into_iter().flatten() {
        tracing::info!(address = %l.bound, "listener removed by the new config");
        l.close().await;
    }
    *running = next;
}

async fn load_config(path: PathBuf) -> Result<(Config, CertSet), String> {
    tokio::task::spawn_blocking(move || {
        let cfg = Config::load(&path).map_err(|e| e.to_string())?;
        let certs = CertSet::load(&cfg.tls).map_err(|e| e.to_string())?;
        Ok((cfg, certs))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Loads the config file again and swaps it in, or refuses it whole.
///
/// Transactional: everything the new config needs is built and bound first
/// (runtime with its pools and plugins, certificates, admin tokens, TCP and
/// QUIC sockets). Only when all of it is ready does anything change; a
/// failure before that drops what was built, and every listener,
/// certificate, plugin and pool stays as it was. Then the swap, then the
/// listeners the new config removed close. A listener whose address stays
/// keeps its sockets (they are never bound again).
async fn reload(
    shared: &Arc<Shared>,
    path: Option<&PathBuf>,
    listeners: &mut Vec<Listening>,
    tokens: &ArcSwap<Tokens>,
) -> Result<(), String> {
    let m = &shared.proxy.metrics;
    let result = async {
        let Some(path) = path else {
            // The demo and one-line modes have no file: reload certificates only.
            let rt = shared.proxy.runtime();
            let certs = CertSet::load(&rt.config.tls).map_err(|e| e.to_string())?;
            shared.certs.replace(certs);
            return Ok(());
        };
        // 1. Build.
        let (mut cfg, certs) = load_config(path.clone()).await?;
        let old = shared.proxy.runtime();
        if let Some(host) = &old.plugin_host {
            keep_plugin_host_settings(&mut cfg, host.config());
        }
        let cfg = Arc::new(cfg);
        let new_tokens = Tokens::load(&cfg.admin)?;
        // Building reads files, compiles changed plugins and opens
        // databases: blocking work, kept off the async workers (on a
        // one-worker runtime it would stall every connection meanwhile).
        let rt = {
            let (cfg, m) = (cfg.clone(), m.clone());
            tokio::task::spawn_blocking(move || Runtime::build(cfg, Some(&old), &m))
                .await
                .map_err(|e| format!("building the new config: {e}"))??
        };
        // 2. Bind (on failure, `rt` and everything bound so far drop here).
        let plans = plan_listeners(&cfg, listeners, shared).map_err(|e| e.to_string())?;
        // 3. Swap: nothing below can fail.
        shared.certs.replace(certs);
        commit_listeners(plans, listeners, shared, &cfg).await;
        let want = cfg.server.max_connections;
        let have = shared.max_conns.swap(want, Ordering::AcqRel);
        if want > have {
            shared.slots.add_permits(want - have);
        } else {
            shared.slots.forget_permits(have - want);
        }
        tokens.store(Arc::new(new_tokens));
        shared.proxy.set_alt_svc(alt_svc_map(listeners, &cfg));
        shared.proxy.swap(rt);
        Ok(())
    }
    .await;
    match &result {
        Ok(()) => {
            m.config_reloads
                .get_or_create(&Outcome { result: "ok" })
                .inc();
            tracing::info!("config reloaded");
        }
        Err(e) => {
            m.config_reloads
                .get_or_create(&Outcome { result: "refused" })
                .inc();
            tracing::error!(error = %e, "reload refused; the running config stays in force");
        }
    }
    result
}

/// The Wasm host (one engine per process) outlives reloads, so
/// `[plugins] max_instances`, `instance_wait` and `fuel` change on restart
/// only: a
/// reload that changes them keeps the running values, says so in the log,
/// and `GET /config` shows the values in force.
fn keep_plugin_host_settings(cfg: &mut Config, host: &meridian_wasm_host::HostConfig) {
    fn keep<T: PartialEq + std::fmt::Debug>(key: &str, configured: &mut T, running: T) {
        if *configured != running {
            tracing::warn!(
                ?configured,
                ?running,
                "[plugins] {key} changes on restart only; the running value stays"
            );
            *configured = running;
        }
    }
    let p = &mut cfg.plugins;
    keep("max_instances", &mut p.max_instances, host.max_instances);
    keep(
        "instance_wait",
        &mut p.instance_wait,
        crate::config::Dur(host.lock_wait),
    );
    keep("fuel", &mut p.fuel, host.fuel);
}

async fn reload_certs(shared: &Arc<Shared>, cfg: &Config) {
    let tls = cfg.tls.clone();
    let r = tokio::task::spawn_blocking(move || CertSet::load(&tls)).await;
    match r {
        Ok(Ok(set)) => {
            shared.certs.replace(set);
            shared
                .proxy
                .metrics
                .cert_reloads
                .get_or_create(&Outcome { result: "ok" })
                .inc();
            tracing::info!("certificates changed on disk: reloaded");
        }
        Ok(Err(e)) => {
            shared
                .proxy
                .metrics
                .cert_reloads
                .get_or_create(&Outcome { result: "refused" })
                .inc();
            tracing::error!(error = %e, "certificate reload refused; the current certificates stay");
        }
        Err(e) => tracing::error!(error = %e, "certificate reload task failed"),
    }
}
