//! Wiring: bind the listeners, run hickory's `Server` with our handler, the
//! admin API and the health probes; reload on SIGHUP and on GeoIP file
//! change; shut down gracefully on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use hickory_server::Server;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::config::ConfigErrors;
use crate::handler::{DnsHandler, Runtime, Shared};
use crate::health::{ProbeSpec, spawn_probe};
use crate::metrics::{Metrics, ReloadLabels};
use crate::model::{self, Model};

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The configuration is invalid.
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// A listener could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// How to run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Config file; None serves the embedded demo.
    pub config: Option<PathBuf>,
    /// Override `server.listen`.
    pub listen: Vec<SocketAddr>,
    /// Override `admin.listen` (and `server.admin`).
    pub admin: Option<SocketAddr>,
    /// Disable the admin listener.
    pub no_admin: bool,
}

/// Addresses actually bound.
#[derive(Debug, Clone)]
pub struct Bound {
    /// (UDP, TCP) per listen address.
    pub dns: Vec<(SocketAddr, SocketAddr)>,
    /// Admin listener.
    pub admin: Option<SocketAddr>,
}

impl Bound {
    /// The machine-readable startup line:
    /// `meridian-dns: dns udp A tcp B [udp C tcp D ...] admin E`.
    pub fn line(&self) -> String {
        let mut s = String::from("meridian-dns: dns");
        for (u, t) in &self.dns {
            s.push_str(&format!(" udp {u} tcp {t}"));
        }
        match self.admin {
            Some(a) => s.push_str(&format!(" admin {a}")),
            None => s.push_str(" admin off"),
        }
        s
    }
}

fn load(opts: &RunOptions) -> Result<(Model, crate::geo::GeoDb), ConfigErrors> {
    let (mut m, g) = match &opts.config {
        Some(p) => model::load_file(p)?,
        None => model::load_demo()?,
    };
    if !opts.listen.is_empty() {
        m.config.server.listen = opts.listen.clone();
    }
    // From here on `admin.listen` is the one address in effect (None: off).
    let addr = if opts.no_admin {
        None
    } else {
        Some(opts.admin.unwrap_or_else(|| m.config.admin_listen()))
    };
    m.config.admin.listen = addr;
    m.config.server.admin = None;
    if let (Some(a), Some(flag)) = (addr, opts.admin)
        && let Some(reason) = crate::admin::exposure(a, m.admin.has_token())
    {
        return Err(ConfigErrors(vec![crate::config::ConfigError {
            file: PathBuf::from("<command line>"),
            line: 1,
            col: 1,
            reason: format!("--admin {flag}: {reason}"),
        }]));
    }
    Ok((m, g))
}

/// Bind UDP and TCP on the same port (for port 0, retry until both fit).
async fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), ServerError> {
    let err = |source| ServerError::Bind { addr, source };
    let attempts = if addr.port() == 0 { 20 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = UdpSocket::bind(addr).await.map_err(err)?;
        let port = udp.local_addr().map_err(err)?.port();
        match TcpListener::bind(SocketAddr::new(addr.ip(), port)).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    Err(err(
        last.unwrap_or_else(|| std::io::Error::other("bind failed"))
    ))
}

fn spawn_probes(model: &Model, shared: &Shared) -> Vec<JoinHandle<()>> {
    model
        .config
        .regions
        .iter()
        .filter_map(|r| ProbeSpec::for_region(r, shared.health.get_or_create(&r.name)))
        .map(|spec| spawn_probe(spec, shared.metrics.clone()))
        .collect()
}

fn mtimes(paths: &[PathBuf]) -> Vec<Option<SystemTime>> {
    paths
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

fn base_of(p: &Path) -> PathBuf {
    p.parent().unwrap_or(Path::new(".")).to_owned()
}

/// A running server.
pub struct Running {
    /// Bound addresses.
    pub bound: Bound,
    /// Shared state.
    pub shared: Arc<Shared>,
    opts: RunOptions,
    server: Server<DnsHandler>,
    probes: Vec<JoinHandle<()>>,
    notifier: crate::notify::Notifier,
    admin_stop: watch::Sender<bool>,
    admin_task: Option<JoinHandle<()>>,
    tcp_tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("bound", &self.bound)
            .finish()
    }
}

/// Load the configuration and start every listener.
pub async fn start(opts: RunOptions) -> Result<Running, ServerError> {
    let (model, geo) = load(&opts)?;
    let metrics = Arc::new(Metrics::new());
    let health = crate::health::HealthTable::default();
    let runtime = Runtime::new(model, &health);
    let shared = Arc::new(Shared {
        runtime: ArcSwap::from_pointee(runtime),
        geo: ArcSwap::from_pointee(geo),
        health,
        metrics,
    });
    let rt = shared.runtime.load_full();
    let cfg = &rt.model.config;

    let mut server = Server::new(DnsHandler {
        shared: shared.clone(),
    });
    let mut dns = Vec::new();
    // One stop signal for the admin API and the TCP listeners (hickory's
    // server, which runs UDP, has its own).
    let (admin_stop, admin_rx) = watch::channel(false);
    let mut tcp_tasks = Vec::new();
    let tcp_table = Arc::new(crate::tcp::Table::default());
    for addr in &cfg.server.listen {
        let (udp, tcp) = bind_pair(*addr).await?;
        let ua = udp.local_addr().map_err(|source| ServerError::Bind {
            addr: *addr,
            source,
        })?;
        let ta = tcp.local_addr().map_err(|source| ServerError::Bind {
            addr: *addr,
            source,
        })?;
        server.register_socket(udp);
        tcp_tasks.push(tokio::spawn(crate::tcp::serve(
            tcp,
            DnsHandler {
                shared: shared.clone(),
            },
            tcp_table.clone(),
            admin_rx.clone(),
        )));
        dns.push((ua, ta));
    }
    let mut admin = None;
    let mut admin_task = None;
    if let Some(addr) = cfg.admin.listen {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        admin = Some(
            l.local_addr()
                .map_err(|source| ServerError::Bind { addr, source })?,
        );
        admin_task = Some(tokio::spawn(crate::admin::serve(
            l,
            shared.clone(),
            admin_rx,
        )));
    }
    let probes = spawn_probes(&rt.model, &shared);
    let mut notifier = crate::notify::Notifier::default();
    notifier.zones_loaded(&rt.model, &shared.metrics);
    Ok(Running {
        notifier,
        bound: Bound { dns, admin },
        shared,
        opts,
        server,
        probes,
        admin_stop,
        admin_task,
        tcp_tasks,
    })
}

impl Running {
    /// Re-read the configuration; on error keep serving the old one.
    pub async fn reload(&mut self) -> Result<(), ConfigErrors> {
        let opts = self.opts.clone();
        let loaded = tokio::task::spawn_blocking(move || load(&opts))
            .await
            .unwrap_or_else(|e| {
                Err(ConfigErrors(vec![crate::config::ConfigError {
                    file: PathBuf::from("<reload>"),
                    line: 1,
                    col: 1,
                    reason: e.to_string(),
                }]))
            });
        let m = &self.shared.metrics;
        match loaded {
            Ok((model, geo)) => {
                let names: Vec<&str> = model.regions.iter().map(|r| &*r.name).collect();
                self.shared.health.retain(&names);
                let rt = Runtime::new(model, &self.shared.health);
                for p in self.probes.drain(..) {
                    p.abort();
                }
                self.probes = spawn_probes(&rt.model, &self.shared);
                self.shared.runtime.store(Arc::new(rt));
                self.shared.geo.store(Arc::new(geo));
                // NOTIFY the secondaries of zones whose serial changed.
                self.notifier
                    .zones_loaded(&self.shared.runtime.load().model, &self.shared.metrics);
                m.reloads
                    .get_or_create(&ReloadLabels {
                        what: "config",
                        result: "ok",
                    })
                    .inc();
                info!("configuration reloaded");
                Ok(())
            }
            Err(e) => {
                m.reloads
                    .get_or_create(&ReloadLabels {
                        what: "config",
                        result: "error",
                    })
                    .inc();
                error!(errors = %e, "reload refused; still serving the previous configuration");
                Err(e)
            }
        }
    }

    async fn reload_geo(&self) {
        let rt = self.shared.runtime.load_full();
        let Some(path) = rt.model.path.clone() else {
            return;
        };
        let config = rt.model.config.clone();
        let res = tokio::task::spawn_blocking(move || {
            model::load_geo(&config, &base_of(&path), &model::Fs)
        })
        .await;
        let m = &self.shared.metrics;
        match res {
            Ok(Ok(g)) => {
                self.shared.geo.store(Arc::new(g));
                m.reloads
                    .get_or_create(&ReloadLabels {
                        what: "geoip",
                        result: "ok",
                    })
                    .inc();
                info!("GeoIP databases reloaded");
            }
            Ok(Err(e)) => {
                m.reloads
                    .get_or_create(&ReloadLabels {
                        what: "geoip",
                        result: "error",
                    })
                    .inc();
                error!(error = %e, "GeoIP reload failed; keeping the previous databases");
            }
            Err(e) => error!(error = %e, "GeoIP reload task failed"),
        }
    }

    /// Serve until SIGTERM or SIGINT; reload on SIGHUP.
    pub async fn run_until_signal(mut self) -> Result<(), SignalError> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup()).map_err(SignalError)?;
        let mut term = signal(SignalKind::terminate()).map_err(SignalError)?;
        let mut int = signal(SignalKind::interrupt()).map_err(SignalError)?;
        let mut geo_paths = Vec::new();
        let mut geo_mtimes = Vec::new();
        let refresh = |rt: &Runtime| -> (Vec<PathBuf>, u64) {
            match &rt.model.path {
                Some(p) => (
                    model::geo_files(&rt.model.config, &base_of(p)),
                    rt.model.config.geoip.reload_check_secs,
                ),
                None => (Vec::new(), 0),
            }
        };
        let (paths, mut every) = refresh(&self.shared.runtime.load());
        if !paths.is_empty() {
            geo_mtimes = mtimes(&paths);
            geo_paths = paths;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(every.max(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // systemd (Type=notify): serving now. A no-op outside systemd.
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    info!("SIGHUP: reloading");
                    let mut reloading = vec![sd_notify::NotifyState::Reloading];
                    if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
                        reloading.push(now);
                    }
                    let _ = sd_notify::notify(false, &reloading);
                    let reloaded = self.reload().await.is_ok();
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
                    if reloaded {
                        let (paths, e) = refresh(&self.shared.runtime.load());
                        geo_mtimes = mtimes(&paths);
                        geo_paths = paths;
                        if e != every {
                            every = e;
                            tick = tokio::time::interval(Duration::from_secs(every.max(1)));
                        }
                    }
                }
                _ = tick.tick(), if every > 0 && !geo_paths.is_empty() => {
                    let paths = geo_paths.clone();
                    let now = tokio::task::spawn_blocking(move || mtimes(&paths)).await.unwrap_or_default();
                    if now != geo_mtimes {
                        geo_mtimes = now;
                        self.reload_geo().await;
                    }
                }
                _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
                _ = int.recv() => { info!("SIGINT: shutting down"); break; }
            }
        }
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        self.shutdown().await;
        Ok(())
    }

    /// Stop listeners (letting in-flight queries finish, bounded) and probes.
    pub async fn shutdown(mut self) {
        let _ = self.admin_stop.send(true);
        for p in self.probes.drain(..) {
            p.abort();
        }
        match tokio::time::timeout(Duration::from_secs(5), self.server.shutdown_gracefully()).await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "DNS server stopped with an error"),
            Err(_) => warn!("DNS server did not stop within 5s"),
        }
        if let Some(t) = self.admin_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        for t in self.tcp_tasks.drain(..) {
            // Each stops accepting at once and closes its connections
            // within 2 s.
            let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
        }
        info!("stopped");
    }
}

/// Signal handlers could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("installing signal handlers: {0}")]
pub struct SignalError(pub std::io::Error);
