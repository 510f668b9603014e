//! The `meridian-dns` binary. With no arguments it serves the embedded demo.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use hickory_proto::rr::{LowerName, Name};
use meridian_dns::{geo, model, server};

/// Meridian's GeoIP-aware authoritative DNS server.
///
/// Without a subcommand, serves the embedded demo zone
/// `demo.meridian.test.` on 127.0.0.1:5353 (UDP+TCP) with the admin API on
/// 127.0.0.1:9953.
#[derive(Debug, Parser)]
#[command(name = "meridian-dns", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Args)]
struct Listen {
    /// DNS listen address (UDP and TCP); repeatable. Overrides the config.
    /// Port 0 picks a free port (UDP and TCP share it).
    #[arg(long, value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// Admin HTTP listen address. Overrides the config.
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,
    /// Do not start the admin listener.
    #[arg(long, conflicts_with = "admin")]
    no_admin: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve a configuration file.
    Run {
        /// The TOML configuration.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        #[command(flatten)]
        listen: Listen,
    },
    /// Serve the embedded demo (what running without arguments does).
    Demo {
        #[command(flatten)]
        listen: Listen,
    },
    /// Validate a configuration and its zone and GeoIP files; exit 1 with
    /// `file:line:col: reason` lines on error.
    Check {
        /// The TOML configuration.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print the steering decision for a client and a name.
    Explain {
        /// The TOML configuration; the embedded demo if omitted.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Client (or ECS) address.
        #[arg(long, value_name = "IP")]
        client: IpAddr,
        /// Take region health from a running server's admin API
        /// (`GET /regions`) instead of assuming every region is up. Sends
        /// the config's `admin.read_token` (else `admin.token`) if set.
        #[arg(long, value_name = "ADDR")]
        admin: Option<SocketAddr>,
        /// Steered name.
        name: String,
    },
    /// GeoIP database tools.
    Geo {
        #[command(subcommand)]
        command: GeoCommand,
    },
    /// DNSSEC key tools.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Generate a zone key: writes a PKCS#8 PEM private key (mode 0600) and
    /// prints its DNSKEY, and for a KSK or CSK its DS and a trust anchor.
    Generate {
        /// The zone apex, e.g. `example.com.`
        #[arg(long, value_name = "NAME")]
        zone: String,
        /// `ksk`, `zsk` or `csk`.
        #[arg(long, default_value = "csk")]
        role: String,
        /// `ecdsap256sha256` (13, the default) or `ed25519` (15).
        #[arg(long, default_value = "ecdsap256sha256")]
        algorithm: String,
        /// Where to write the private key; refuses to overwrite.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum GeoCommand {
    /// Compile `network,country,continent,lat,lon,asn` CSV into a MaxMind DB.
    Build {
        /// Input CSV.
        #[arg(long, value_name = "FILE")]
        csv: PathBuf,
        /// Output `.mmdb`.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Look an address up in a MaxMind DB.
    Lookup {
        /// The database.
        #[arg(long, value_name = "FILE")]
        db: PathBuf,
        /// The address.
        ip: IpAddr,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,hickory_server=warn"));
    // Colours only on a terminal: a file, a pipe or journald gets plain text.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meridian-dns: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        None => serve(
            None,
            Listen {
                listen: vec![],
                admin: None,
                no_admin: false,
            },
            true,
        ),
        Some(Command::Demo { listen }) => serve(None, listen, true),
        Some(Command::Run { config, listen }) => serve(Some(config), listen, false),
        Some(Command::Check { config }) => Ok(check(&config)),
        Some(Command::Explain {
            config,
            client,
            admin,
            name,
        }) => explain(config.as_deref(), client, admin, &name),
        Some(Command::Geo {
            command: GeoCommand::Build { csv, out },
        }) => {
            let text = std::fs::read_to_string(&csv)
                .with_context(|| format!("reading {}", csv.display()))?;
            let rows = geo::parse_csv(&text, &csv)?;
            let bytes = geo::build_mmdb(&rows)?;
            // Write atomically so a running server never reads a partial file.
            let tmp = out.with_extension("mmdb.tmp");
            std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &out)
                .with_context(|| format!("renaming to {}", out.display()))?;
            println!(
                "wrote {} ({} networks, {} bytes)",
                out.display(),
                rows.len(),
                bytes.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Keys {
            command:
                KeysCommand::Generate {
                    zone,
                    role,
                    algorithm,
                    out,
                },
        }) => keys_generate(&zone, &role, &algorithm, &out),
        Some(Command::Geo {
            command: GeoCommand::Lookup { db, ip },
        }) => {
            let bytes = std::fs::read(&db).with_context(|| format!("reading {}", db.display()))?;
            let g = geo::GeoDb::from_bytes(Some(bytes), None)?;
            let i = g.lookup(ip);
            println!(
                "{ip}: country={} continent={} location={} asn={} network_prefix=/{}",
                i.country.map_or("-".into(), |c| c.to_string()),
                i.continent.map_or("-".into(), |c| c.to_string()),
                i.location.map_or("-".into(), |(a, b)| format!("{a},{b}")),
                i.asn.map_or("-".into(), |a| format!("AS{a}")),
                i.prefix_len
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn check(path: &Path) -> ExitCode {
    match model::load_file(path) {
        Ok((m, geo)) => {
            println!(
                "{}: ok ({} zones, {} regions, {} steered names, geoip {})",
                path.display(),
                m.zones.iter().count(),
                m.regions.len(),
                m.steered.len(),
                if geo.is_loaded() { "loaded" } else { "none" }
            );
            ExitCode::SUCCESS
        }
        Err(errs) => {
            for e in &errs.0 {
                eprintln!("{e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// `GET /regions` from a running server: name -> state.
fn fetch_health(
    admin: SocketAddr,
    token: Option<&str>,
) -> Result<std::collections::HashMap<String, meridian_dns::steering::RegionState>> {
    use std::io::Read as _;
    let timeout = std::time::Duration::from_secs(3);
    let mut s = std::net::TcpStream::connect_timeout(&admin, timeout)
        .with_context(|| format!("connecting to the admin API at {admin}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET /regions HTTP/1.1\r\nHost: {admin}\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.take(4 << 20).read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let status = text.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        bail!(
            "the admin API at {admin} answered {status} to GET /regions (a token is read from the config's [admin] section)"
        );
    }
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .context("malformed HTTP response from the admin API")?;
    let v: serde_json::Value = serde_json::from_str(body).context("parsing /regions JSON")?;
    let mut out = std::collections::HashMap::new();
    for r in v["regions"].as_array().into_iter().flatten() {
        if let Some(name) = r["name"].as_str() {
            out.insert(
                name.to_owned(),
                meridian_dns::steering::RegionState {
                    healthy: r["healthy"].as_bool().unwrap_or(true),
                    drained: r["drained"].as_bool().unwrap_or(false),
                },
            );
        }
    }
    Ok(out)
}

fn explain(
    config: Option<&Path>,
    client: IpAddr,
    admin: Option<SocketAddr>,
    name: &str,
) -> Result<ExitCode> {
    let (m, geo) = match config {
        Some(p) => model::load_file(p)?,
        None => model::load_demo()?,
    };
    let mut n = Name::from_ascii(name).with_context(|| format!("invalid name {name:?}"))?;
    n.set_fqdn(true);
    let Some(st) = m.steered.get(&LowerName::new(&n)) else {
        let names: Vec<String> = m.steered.values().map(|s| s.name.to_string()).collect();
        bail!("{n} is not a steered name (steered: {})", names.join(", "));
    };
    let live = admin
        .map(|a| fetch_health(a, m.admin.read_bearer()))
        .transpose()?;
    let up = meridian_dns::steering::RegionState {
        healthy: true,
        drained: false,
    };
    let states: Vec<_> = m
        .regions
        .iter()
        .map(|r| {
            live.as_ref()
                .and_then(|l| l.get(&*r.name).copied())
                .unwrap_or(up)
        })
        .collect();
    let info = geo.lookup(client);
    let d = meridian_dns::steering::decide(&st.policy, &m.regions, &states, &info, 0);
    let mut out = std::io::stdout().lock();
    writeln!(out, "name: {n} (ttl {})", st.ttl)?;
    let unknown = if info.is_unknown() {
        " (not in GeoIP)"
    } else {
        ""
    };
    writeln!(out, "address: {client}{unknown}")?;
    writeln!(out, "{}", d.explain(&m.regions, &info))?;
    match admin {
        Some(a) => writeln!(out, "health: from the admin API at {a}")?,
        None => writeln!(
            out,
            "note: health assumed up (explain does not probe; pass --admin ADDR to use a running server's)"
        )?,
    }
    Ok(ExitCode::SUCCESS)
}

fn serve(config: Option<PathBuf>, listen: Listen, demo: bool) -> Result<ExitCode> {
    init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        let opts = server::RunOptions {
            config,
            listen: listen.listen,
            admin: listen.admin,
            no_admin: listen.no_admin,
        };
        let running = server::start(opts).await?;
        let line = running.bound.line();
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{line}")?;
            if demo {
                let (udp, _) = running.bound.dns.first().copied().unwrap_or((
                    SocketAddr::from(([127, 0, 0, 1], 5353)),
                    SocketAddr::from(([127, 0, 0, 1], 5353)),
                ));
                let (h, p) = (udp.ip(), udp.port());
                let admin = running
                    .bound
                    .admin
                    .map_or("127.0.0.1:9953".to_string(), |a| a.to_string());
                writeln!(out, "Serving the demo zone demo.meridian.test. Try:")?;
                writeln!(out, "  kdig @{h} -p {p} www.demo.meridian.test A +subnet=198.51.100.0/24   # Paris -> eu-west 192.0.2.2")?;
                writeln!(out, "  kdig @{h} -p {p} www.demo.meridian.test AAAA +subnet=2001:db8:2::/48 # Sydney -> ap-southeast")?;
                writeln!(out, "  kdig @{h} -p {p} www.demo.meridian.test A                            # unknown -> us-east 192.0.2.1")?;
                writeln!(out, "  kdig @{h} -p {p} big.demo.meridian.test TXT +notcp                   # truncated; drop +notcp for TCP")?;
                writeln!(out, "  curl -X POST http://{admin}/regions/eu-west/drain                    # then repeat the first query")?;
                writeln!(out, "  curl http://{admin}/regions ; curl http://{admin}/metrics")?;
            }
            out.flush()?;
        }
        running.run_until_signal().await?;
        Ok(ExitCode::SUCCESS)
    })
}

fn keys_generate(zone: &str, role: &str, algorithm: &str, out: &Path) -> Result<ExitCode> {
    use hickory_proto::dnssec::rdata::DNSSECRData;
    use hickory_proto::rr::{RData, Record};
    use meridian_dns::dnssec::keys::{self, KeyAlgorithm, KeyRole, ZoneKey};
    use std::os::unix::fs::OpenOptionsExt as _;

    let mut apex = Name::from_ascii(zone).with_context(|| format!("invalid zone {zone:?}"))?;
    apex.set_fqdn(true);
    let role = match role.to_ascii_lowercase().as_str() {
        "ksk" => KeyRole::Ksk,
        "zsk" => KeyRole::Zsk,
        "csk" => KeyRole::Csk,
        other => bail!("unknown role {other:?} (ksk, zsk or csk)"),
    };
    let alg: KeyAlgorithm = algorithm.parse().map_err(anyhow::Error::msg)?;
    let der = keys::generate(alg)?;
    let key = ZoneKey::from_pkcs8(&der, role, true).map_err(anyhow::Error::msg)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("creating {} (it must not exist)", out.display()))?;
    f.write_all(keys::to_pem(&der).as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", out.display()))?;
    let mut o = std::io::stdout().lock();
    let alg_no = u8::from(alg.dnssec());
    writeln!(
        o,
        "; wrote {} ({role}, algorithm {alg_no}, key tag {})",
        out.display(),
        key.tag
    )?;
    let dnskey = Record::from_rdata(
        apex.clone(),
        3600,
        RData::DNSSEC(DNSSECRData::DNSKEY(key.dnskey.clone())),
    );
    writeln!(o, "{dnskey}")?;
    if role.signs_keys() {
        let ds = RData::DNSSEC(DNSSECRData::DS(key.ds(&apex)?));
        let ds = Record::from_rdata(apex.clone(), 3600, ds);
        writeln!(o, "; DS for the parent zone:")?;
        writeln!(o, "{ds}")?;
        writeln!(o, "; trust anchor (BIND, delv -a):")?;
        writeln!(
            o,
            "trust-anchors {{ \"{apex}\" static-key {} 3 {alg_no} \"{}\"; }};",
            key.dnskey.flags(),
            keys::public_base64(&key)
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
