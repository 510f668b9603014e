//! `meridian-chaos`: the soak and the chaos scenarios of issue #16, against
//! the real `meridian-edge` and `meridian-dns` binaries.
//!
//! ```text
//! meridian-chaos soak --duration SECS --out DIR [--load 0.7] [--calibrate SECS]
//! meridian-chaos flap | kill9 | diskfull | diskerror | netem | plugin | dnsflap [--duration SECS]
//! meridian-chaos origin --listen ADDR      (the test origin alone, for netem)
//! meridian-chaos plugin-wasm --out PATH    (the plugin scenario's misbehaving plugin, for bench/plugin)
//! ```
//! The binaries come from `MERIDIAN_EDGE_BIN` and `MERIDIAN_DNS_BIN`
//! (bench/soak/run.sh and bench/chaos/run.sh set them). Every scenario prints
//! one line of counts, `NAME: sent=… succeeded=… expected_failures=…
//! unexpected_failures=… corrupt_bodies=…`, and exits 1 when the last two
//! are not 0 or another of its checks failed. See docs/soak-chaos.md.

mod chaos;
mod dns;
mod load;
mod netem;
mod procs;
mod soak;
mod wire;

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Instant;

/// Milliseconds since the process started.
pub fn now_ms() -> u64 {
    static T0: OnceLock<Instant> = OnceLock::new();
    T0.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// `--key value` pairs after the subcommand.
pub struct Args(HashMap<String, String>);

impl Args {
    fn parse(rest: &[String]) -> anyhow::Result<Args> {
        let mut m = HashMap::new();
        let mut it = rest.iter();
        while let Some(k) = it.next() {
            let Some(k) = k.strip_prefix("--") else {
                anyhow::bail!("unexpected argument {k:?} (options are --key value)");
            };
            let v = it
                .next()
                .ok_or_else(|| anyhow::anyhow!("--{k} needs a value"))?;
            m.insert(k.to_string(), v.clone());
        }
        Ok(Args(m))
    }

    pub fn get<T: std::str::FromStr>(&self, k: &str, default: T) -> anyhow::Result<T> {
        match self.0.get(k) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| anyhow::anyhow!("--{k}: cannot parse {v:?}")),
        }
    }

    pub fn str(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }
}

fn main() {
    now_ms();
    meridian_e2e::init();
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first().cloned() else {
        eprintln!(
            "usage: meridian-chaos soak|flap|kill9|diskfull|diskerror|netem|plugin|dnsflap|origin|plugin-wasm [--key value]…"
        );
        std::process::exit(2);
    };
    let args = match Args::parse(&argv[1..]) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("meridian-chaos: {e:#}");
            std::process::exit(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meridian-chaos: cannot start the runtime: {e}");
            std::process::exit(2);
        }
    };
    let res = rt.block_on(async move {
        match cmd.as_str() {
            "soak" => soak::run(&args).await,
            "flap" => chaos::flap(&args).await,
            "kill9" => chaos::kill9(&args).await,
            "diskfull" => chaos::diskfull(&args).await,
            "diskerror" => chaos::diskerror(&args).await,
            "netem" => chaos::netem(&args).await,
            "plugin" => chaos::plugin(&args).await,
            "dnsflap" => chaos::dnsflap(&args).await,
            "origin" => chaos::origin_only(&args).await,
            "plugin-wasm" => chaos::plugin_wasm(&args),
            other => Err(anyhow::anyhow!("unknown command {other:?}")),
        }
    });
    // Children (edge, dns) are killed by their handles' Drop inside `res`'s
    // future; nothing else outlives the runtime.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    match res {
        Ok(()) => {}
        Err(e) => {
            eprintln!("meridian-chaos: FAILED: {e:#}");
            std::process::exit(1);
        }
    }
}
