//! The `meridian-edge` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use meridian_edge::config::{Config, LogFormat};
use meridian_edge::{demo, server};

/// The global allocator: jemalloc (the `jemalloc` feature, on by default).
/// Both it and mimalloc cost a cache hit the same user-space instructions
/// (about 57.5 thousand; glibc's malloc 74 thousand in a 26 November
/// build, a quarter of them in malloc and free). In the soak mimalloc v3
/// kept memory its heap no longer used, and the edge's RSS grew 8.6% in 20
/// minutes, where jemalloc's grew 2.5% (docs/soak-chaos.md). jemalloc's heap
/// statistics are on the admin listener (`meridian_allocator_bytes`).
/// `--no-default-features --features mimalloc` builds with mimalloc, and
/// `--no-default-features` with the system allocator.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "meridian-edge",
    version,
    about = "Meridian's edge: a TLS-terminating HTTP/1.1 and HTTP/2 reverse proxy",
    long_about = "Meridian's edge: a TLS-terminating HTTP/1.1 and HTTP/2 reverse proxy.\n\n\
                  With no command it runs the embedded demo: HTTP on 127.0.0.1:8080, HTTPS on \
                  127.0.0.1:8443 (self-signed for localhost), admin on 127.0.0.1:9901, in front \
                  of a built-in demo origin."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon from a config file (production mode).
    Run {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Override `server.worker_threads`.
        #[arg(long, value_name = "N")]
        worker_threads: Option<usize>,
        /// Override `admin.listen`.
        #[arg(long, value_name = "ADDR")]
        admin: Option<SocketAddr>,
        /// Override `log.access_log` ("stdout", "stderr", "off" or a path).
        #[arg(long, value_name = "TARGET")]
        access_log: Option<String>,
        /// Take the listening sockets of the edge running with the same
        /// config over its `server.handover_socket` (zero-downtime upgrade).
        #[arg(long)]
        takeover: bool,
    },
    /// Validate a config file: exit 0, or 1 with `file:line:col: what is wrong`.
    Check {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Proxy one origin with no config file (compare `caddy reverse-proxy`).
    Proxy(ProxyArgs),
    /// The embedded demo (the default when no command is given).
    Demo(DemoArgs),
    /// Announce the anycast prefix through BIRD while the local edge is ready.
    Anycast {
        /// The edge's admin listener (its /readyz is probed).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
        /// The birdc binary.
        #[arg(long, value_name = "PATH", default_value = "/usr/sbin/birdc")]
        birdc: PathBuf,
        /// BIRD's control socket.
        #[arg(long, value_name = "PATH", default_value = "/run/bird/bird.ctl")]
        socket: PathBuf,
        /// The BIRD static protocol that holds the anycast route.
        #[arg(long, value_name = "NAME", default_value = "anycast")]
        protocol: String,
        /// Probe interval, e.g. "1s".
        #[arg(long, value_name = "DURATION", default_value = "1s")]
        interval: String,
        /// Probe timeout.
        #[arg(long, value_name = "DURATION", default_value = "1s")]
        timeout: String,
        /// Good probes before announcing.
        #[arg(long, default_value_t = 2)]
        rise: u32,
        /// Failed probes before withdrawing.
        #[arg(long, default_value_t = 2)]
        fall: u32,
    },
    /// Run only the built-in demo origin (for trying things and benchmarks).
    Origin {
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        #[arg(long, value_name = "N", default_value_t = 0)]
        worker_threads: usize,
    },
}

#[derive(Args, Debug)]
struct ProxyArgs {
    /// Plain HTTP listen address (`[[listeners]] address`); repeatable.
    #[arg(long, value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// Origin URL (`[pools.origin] origins`); repeatable.
    #[arg(long, value_name = "URL", required = true)]
    origin: Vec<String>,
    /// HTTPS listen address (`[[listeners]] tls = true`); needs --cert and --key.
    #[arg(long, value_name = "ADDR", requires_all = ["cert", "key"])]
    https: Option<SocketAddr>,
    /// PEM certificate chain (`[[tls.certificates]] cert`).
    #[arg(long, value_name = "PEM")]
    cert: Option<PathBuf>,
    /// PEM private key (`[[tls.certificates]] key`).
    #[arg(long, value_name = "PEM")]
    key: Option<PathBuf>,
    /// Admin listen address (`admin.listen`).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9901")]
    admin: SocketAddr,
    /// Selection across several origins (`selection`).
    #[arg(long, value_name = "POLICY", default_value = "round_robin")]
    selection: String,
    /// Tokio worker threads (`server.worker_threads`), 0 = one per core.
    #[arg(long, value_name = "N", default_value_t = 0)]
    worker_threads: usize,
    /// Access log (`log.access_log`).
    #[arg(long, value_name = "TARGET", default_value = "stdout")]
    access_log: String,
    /// A Wasm plugin for every request (`[[sites.plugins]]`), optionally with
    /// its configuration file: `PATH` or `PATH@CONFIG_FILE`. Repeatable, applied in order.
    #[arg(long, value_name = "PATH[@CONFIG]")]
    plugin: Vec<String>,
    /// Keep a disk cache tier in this directory (`cache.disk_dir`); it survives restarts.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Print the equivalent config file and exit.
    #[arg(long)]
    print_config: bool,
}

#[derive(Parser, Debug)]
struct DemoArgs {
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8443")]
    https: SocketAddr,
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9901")]
    admin: SocketAddr,
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn proxy_config(a: &ProxyArgs) -> anyhow::Result<String> {
    if a.listen.is_empty() && a.https.is_none() {
        bail!("give at least one of --listen ADDR or --https ADDR");
    }
    let mut s = String::new();
    s.push_str(&format!(
        "[server]\nworker_threads = {}\n\n[admin]\nlisten = \"{}\"\n\n[log]\naccess_log = {}\n\n",
        a.worker_threads,
        a.admin,
        toml_str(&a.access_log)
    ));
    for l in &a.listen {
        s.push_str(&format!("[[listeners]]\naddress = \"{l}\"\n\n"));
    }
    if let (Some(h), Some(c), Some(k)) = (a.https, &a.cert, &a.key) {
        s.push_str(&format!("[[listeners]]\naddress = \"{h}\"\ntls = true\n\n"));
        s.push_str(&format!(
            "[[tls.certificates]]\ncert = {}\nkey = {}\ndefault = true\n\n",
            toml_str(&c.display().to_string()),
            toml_str(&k.display().to_string())
        ));
    }
    if let Some(dir) = &a.cache_dir {
        s.push_str(&format!(
            "[cache]\ndisk_dir = {}\n\n",
            toml_str(&dir.display().to_string())
        ));
    }
    s.push_str("[[sites]]\nhosts = [\"*\"]\npool = \"origin\"\n\n");
    for p in &a.plugin {
        let (path, config) = match p.split_once('@') {
            Some((path, cfg)) => {
                // Named, not copied: the plugin's secrets stay in their file.
                std::fs::metadata(cfg).with_context(|| format!("plugin config {cfg}"))?;
                (path, Some(cfg))
            }
            None => (p.as_str(), None),
        };
        s.push_str(&format!("[[sites.plugins]]\npath = {}\n", toml_str(path)));
        if let Some(c) = config {
            s.push_str(&format!("config_file = {}\n", toml_str(c)));
        }
    }
    s.push_str("[pools.origin]\n");
    s.push_str(&format!(
        "selection = {}\norigins = [\n",
        toml_str(&a.selection)
    ));
    for o in &a.origin {
        s.push_str(&format!("  {{ url = {} }},\n", toml_str(o)));
    }
    s.push_str("]\n");
    Ok(s)
}

fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a file, a pipe or journald gets plain text.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => b.json().try_init(),
        LogFormat::Text => b.try_init(),
    };
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    // One worker: a current-thread runtime is an event loop like nginx's,
    // without the multi-thread scheduler's cross-thread wake-ups.
    if threads == 1 {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("meridian-edge")
            .build()
            .context("starting the async runtime");
    }
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all().thread_name("meridian-edge");
    if threads > 0 {
        b.worker_threads(threads);
    }
    b.build().context("starting the async runtime")
}

fn print_bound(b: &server::Bound) {
    for (tls, addr) in &b.listeners {
        println!(
            "meridian-edge: listening {}://{addr}",
            if *tls { "https" } else { "http" }
        );
    }
    if let Some(a) = b.admin {
        println!("meridian-edge: admin http://{a}");
    }
    println!("meridian-edge: ready");
}

fn run_config(cfg: Config, path: Option<PathBuf>, banner: Option<String>) -> anyhow::Result<()> {
    run_config_with(cfg, path, banner, false)
}

fn run_config_with(
    cfg: Config,
    path: Option<PathBuf>,
    banner: Option<String>,
    takeover: bool,
) -> anyhow::Result<()> {
    use meridian_edge::listener::{Inherited, handover};
    // Sockets from the running edge (an upgrade), or from systemd socket
    // activation (LISTEN_FDS), if any.
    let (inherited, old) = if takeover {
        let p = cfg
            .server
            .handover_socket
            .clone()
            .context("--takeover needs server.handover_socket in the config")?;
        let taken = handover::take_over(&p, std::time::Duration::from_secs(10))
            .with_context(|| format!("taking the sockets over {}", p.display()))?;
        // QUIC connection IDs of this process carry a tag the old one does
        // not use, so each process's packets can be told apart.
        meridian_edge::listener::steer::choose_tag(taken.old_tag);
        let (inherited, give_back) = Inherited::from_fds(taken.fds, taken.old_tag)?;
        (
            inherited,
            Some((taken.stream, taken.old_tag.is_some(), give_back)),
        )
    } else {
        (
            Inherited::from_env().context("sockets from LISTEN_FDS")?,
            None,
        )
    };
    init_logging(&cfg.log.level, cfg.log.format);
    let rt = runtime(cfg.server.worker_threads)?;
    rt.block_on(server::run_with(cfg, path, inherited, |b| {
        // The old process's ends of the pairs close here once sent, so
        // that forwarding stops when the old process exits.
        if let Some((s, steered, give_back)) = old
            && let Err(e) = handover::say_ready(&s, steered, &give_back)
        {
            eprintln!("meridian-edge: telling the old process that this one serves: {e}");
        }
        print_bound(b);
        if let Some(text) = &banner {
            println!("{text}");
        }
    }))?;
    Ok(())
}

fn demo_main(a: DemoArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("meridian-demo-{}", std::process::id()));
    let (cert, key) = demo::write_self_signed(&dir).context("writing the demo certificate")?;
    let rt = runtime(0)?;
    let origin = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        tokio::spawn(demo::serve_origin(l));
        Ok::<_, std::io::Error>(addr)
    })?;
    let text = demo::config_toml(a.http, a.https, a.admin, origin, &cert, &key);
    let cfg = Config::from_toml(&text, "<embedded demo config>")?;
    init_logging(&cfg.log.level, cfg.log.format);
    let r = rt.block_on(server::run(cfg, None, |b| {
        print_bound(b);
        let http = b.listeners.iter().find(|(t, _)| !t).map(|x| x.1);
        let https = b.listeners.iter().find(|(t, _)| *t).map(|x| x.1);
        if let (Some(http), Some(https), Some(admin)) = (http, https, b.admin) {
            println!(
                "\nMeridian demo: the edge fronts a built-in origin ({origin}). Try:\n\
                 \x20 curl -i http://{http}/\n\
                 \x20 curl -i http://{http}/api/items\n\
                 \x20 curl -sk --http2 -o /dev/null -w '%{{http_version}} %{{size_download}} bytes\\n' https://localhost:{}/img/logo.png\n\
                 \x20 curl -s -o /dev/null -w '%{{size_download}} bytes in %{{time_total}}s\\n' http://{http}/large?mb=256\n\
                 \x20 curl -i http://{http}/slow?ms=1500\n\
                 \x20 curl -si http://{http}/cache/public | grep -i cache-status   (twice: a miss, then a hit)\n\
                 \x20 curl -s http://{admin}/metrics | grep meridian_requests\n\
                 \x20 curl -s http://{admin}/readyz\n\
                 Access log lines follow as JSON. Stop with Ctrl-C.\n",
                https.port()
            );
        }
    }));
    let _ = std::fs::remove_dir_all(&dir);
    r?;
    Ok(())
}

/// Transparent huge pages off for the process, unless `MERIDIAN_ALLOW_THP`
/// (or mimalloc's own switch, `MIMALLOC_ALLOW_THP`) is set. khugepaged
/// makes a 2 MiB region with a single live page wholly resident: when the
/// edge allocated with mimalloc, which asks for huge pages on its arenas,
/// its RSS crept up for as long as the 30-minute soak ran (124.7 → 169.2
/// MiB, +36%; docs/soak-chaos.md). jemalloc does not ask for them, but a
/// system with THP set to `always` would give them anyway.
fn no_huge_pages() {
    if std::env::var_os("MERIDIAN_ALLOW_THP").is_none()
        && std::env::var_os("MIMALLOC_ALLOW_THP").is_none()
        && let Err(e) = nix::sys::prctl::set_thp_disable(true)
    {
        eprintln!("meridian-edge: cannot turn transparent huge pages off: {e}");
    }
}

fn main() -> ExitCode {
    no_huge_pages();
    #[cfg(feature = "jemalloc")]
    meridian_edge::metrics::jemalloc_is_global();
    meridian_edge::install_crypto_provider();
    let cli = Cli::parse();
    let result = match cli.command {
        None => demo_main(DemoArgs::parse_from(["demo"])),
        Some(Command::Demo(a)) => demo_main(a),
        Some(Command::Check { config }) => match Config::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(1);
            }
        },
        Some(Command::Run {
            config,
            worker_threads,
            admin,
            access_log,
            takeover,
        }) => match Config::load(&config) {
            Ok(mut cfg) => {
                if let Some(n) = worker_threads {
                    cfg.server.worker_threads = n;
                }
                if let Some(a) = admin {
                    if !a.ip().to_canonical().is_loopback() && !cfg.admin.has_token() {
                        eprintln!(
                            "meridian-edge: --admin {a}: not a loopback address, and {} sets no \
                             admin.token or admin.token_file",
                            config.display()
                        );
                        return ExitCode::from(1);
                    }
                    cfg.admin.listen = Some(a);
                }
                if let Some(t) = access_log {
                    cfg.log.access_log = t;
                }
                run_config_with(cfg, Some(config), None, takeover)
            }
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(1);
            }
        },
        Some(Command::Proxy(a)) => (|| {
            let text = proxy_config(&a)?;
            if a.print_config {
                print!("{text}");
                return Ok(());
            }
            let cfg = Config::from_toml(&text, "<command line>")?;
            run_config(cfg, None, None)
        })(),
        Some(Command::Anycast {
            admin,
            birdc,
            socket,
            protocol,
            interval,
            timeout,
            rise,
            fall,
        }) => (|| {
            init_logging("info", LogFormat::Text);
            let interval =
                meridian_edge::config::parse_duration(&interval).map_err(anyhow::Error::msg)?;
            let timeout =
                meridian_edge::config::parse_duration(&timeout).map_err(anyhow::Error::msg)?;
            let s = meridian_edge::anycast::Settings {
                admin,
                birdc,
                socket,
                protocol,
                interval,
                timeout,
                rise,
                fall,
            };
            let rt = runtime(1)?;
            rt.block_on(meridian_edge::anycast::run(s, |route| {
                println!(
                    "meridian-edge anycast: {}",
                    match route {
                        meridian_edge::anycast::Route::Announced => "announced",
                        meridian_edge::anycast::Route::Withdrawn => "withdrawn",
                    }
                );
            }))?;
            Ok(())
        })(),
        Some(Command::Origin {
            listen,
            worker_threads,
        }) => (|| {
            let rt = runtime(worker_threads)?;
            rt.block_on(async {
                let l = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("binding {listen}"))?;
                println!("meridian-edge: demo origin http://{}", l.local_addr()?);
                tokio::select! {
                    _ = demo::serve_origin(l) => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                Ok(())
            })
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meridian-edge: {e:#}");
            ExitCode::from(1)
        }
    }
}
