//! Purges as background jobs, through real sockets: `POST /purge` answers 202 with a job at
//! once, nothing the purge covers is served from then on (while the job still removes, and
//! after a kill -9), and `GET /purge/ID` follows the job to `done`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meridian_e2e::client::{Conn, get, get_plain, req};
use meridian_e2e::harness::eventually;
use meridian_e2e::origin::TestOrigin;

use crate::{Edge, basic_config};

/// An edge with a small memory tier over a disk tier in `dir`.
fn disk_config(origin: &TestOrigin, dir: &std::path::Path) -> String {
    format!(
        "{}\n[pools.main.retry]\nattempts = 1\n[pools.main.passive]\nmax_failures = 0\n\
         [cache]\nmemory = \"1MiB\"\ndisk = \"128MiB\"\ndisk_dir = \"{}\"\n",
        basic_config(&[origin.url()], ""),
        dir.join("cache").display()
    )
}

fn path(tag: &str, i: usize) -> String {
    format!("/cc/{tag}/{i}?cc=max-age%3D3600&size=1500&tag={tag}")
}

/// GETs every path over 8 keep-alive connections; with `cached_only`, asks with
/// `Cache-Control: only-if-cached`, which the cache answers from storage or with 504, never
/// from the origin. Returns `(path, status, cache-status)`.
async fn get_all(
    addr: SocketAddr,
    paths: &[String],
    cached_only: bool,
) -> anyhow::Result<Vec<(String, u16, String)>> {
    let mut tasks = Vec::new();
    for part in paths.chunks(paths.len().div_ceil(8).max(1)) {
        let part = part.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::plain(addr, false).await?;
            let mut out = Vec::with_capacity(part.len());
            for p in part {
                let mut r = get("cache.test", &p);
                if cached_only {
                    r.headers_mut()
                        .insert("cache-control", "only-if-cached".parse()?);
                }
                let resp = conn.send(r).await?;
                let cs = resp.header("cache-status").unwrap_or("").to_string();
                out.push((p, resp.status, cs));
            }
            Ok::<_, anyhow::Error>(out)
        }));
    }
    let mut all = Vec::with_capacity(paths.len());
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

async fn cache_stats(edge: &Edge) -> anyhow::Result<serde_json::Value> {
    get_plain(edge.admin(), "admin", "/cache").await?.json()
}

/// Fills the cache with every path and waits until all are indexed.
async fn fill(edge: &Edge, paths: &[String]) -> anyhow::Result<()> {
    for (p, status, _) in get_all(edge.http(), paths, false).await? {
        anyhow::ensure!(status == 200, "{p}: {status}");
    }
    let want = paths.len() as u64;
    let indexed = eventually(Duration::from_secs(20), || async {
        cache_stats(edge)
            .await
            .is_ok_and(|s| s["indexed_keys"].as_u64().unwrap_or(0) >= want)
    })
    .await;
    anyhow::ensure!(
        indexed,
        "not every object was stored: {}",
        cache_stats(edge).await?
    );
    Ok(())
}

async fn post_purge(edge: &Edge, body: &str) -> anyhow::Result<meridian_e2e::client::Resp> {
    Conn::plain(edge.admin(), false)
        .await?
        .send(req("POST", "admin", "/purge", body.to_string()))
        .await
}

async fn job(edge: &Edge, id: &str) -> anyhow::Result<serde_json::Value> {
    let r = get_plain(edge.admin(), "admin", &format!("/purge/{id}")).await?;
    anyhow::ensure!(
        r.status == 200,
        "GET /purge/{id}: {} {}",
        r.status,
        r.text()
    );
    r.json()
}

/// Polls `GET /purge/ID` until the job is done (at most 60 s).
async fn until_done(edge: &Edge, id: &str) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = job(edge, id).await?;
        match j["state"].as_str() {
            Some("done") => return Ok(j),
            Some("queued" | "running") if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ => anyhow::bail!("job {id} did not end well: {j}"),
        }
    }
}

/// Asserts that the cache serves none of `paths` (504 to only-if-cached).
async fn none_served(edge: &Edge, paths: &[String]) -> anyhow::Result<()> {
    let served: Vec<_> = get_all(edge.http(), paths, true)
        .await?
        .into_iter()
        .filter(|(_, status, _)| *status != 504)
        .collect();
    anyhow::ensure!(
        served.is_empty(),
        "{} purged objects were served, first: {:?}",
        served.len(),
        served.first()
    );
    Ok(())
}

/// Asserts that the cache serves every one of `paths` as a hit.
async fn all_hits(edge: &Edge, paths: &[String]) -> anyhow::Result<()> {
    for (p, status, cs) in get_all(edge.http(), paths, true).await? {
        anyhow::ensure!(
            status == 200 && cs.starts_with("meridian; hit"),
            "{p}: {status} {cs}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn tag_purge_of_2000_disk_objects_is_a_job_and_hides_them_at_once() -> anyhow::Result<()> {
    let origin = TestOrigin::start("o").await?;
    let dir = meridian_e2e::certs::TempDir::new("purge-jobs")?;
    let edge = Edge::start(&disk_config(&origin, dir.path()))?;
    let bulk: Vec<String> = (0..2000).map(|i| path("bulk", i)).collect();
    let keep: Vec<String> = (0..20).map(|i| path("keep", i)).collect();
    fill(&edge, &bulk).await?;
    fill(&edge, &keep).await?;
    let before = cache_stats(&edge).await?;
    assert!(
        before["disk"]["write_bytes"].as_u64().unwrap_or(0) > 2000 * 1500,
        "the objects are on the disk tier: {before}"
    );

    let start = Instant::now();
    let r = post_purge(&edge, r#"{"tags":["bulk"]}"#).await?;
    let took = start.elapsed();
    assert_eq!(r.status, 202, "{}", r.text());
    let accepted = r.json()?;
    let id = accepted["id"].as_str().unwrap_or_default().to_string();
    assert!(!id.is_empty(), "{accepted}");
    assert_eq!(r.header("location"), Some(format!("/purge/{id}").as_str()));
    assert_eq!(accepted["matched"], 2000, "{accepted}");
    assert!(
        took < Duration::from_secs(2),
        "the purge call took {took:?}"
    );
    // Nothing of the tag is served from the moment the call returned.
    none_served(&edge, &bulk).await?;
    all_hits(&edge, &keep).await?;

    let done = until_done(&edge, &id).await?;
    assert_eq!(done["matched"], 2000, "{done}");
    assert_eq!(done["removed"], 2000, "{done}");
    assert_eq!(done["tags"], 2000, "{done}");
    assert_eq!(done["soft"], false, "{done}");
    let (started, finished) = (
        done["started"].as_f64().unwrap_or(0.0),
        done["finished"].as_f64().unwrap_or(0.0),
    );
    assert!(
        done["accepted"].as_f64().unwrap_or(f64::MAX) <= started && started <= finished,
        "{done}"
    );
    none_served(&edge, &bulk).await?;
    all_hits(&edge, &keep).await?;
    let after = cache_stats(&edge).await?;
    assert_eq!(after["indexed_keys"], 20, "{after}");
    // The only-if-cached probes never reached the origin: one fetch per object.
    assert_eq!(origin.count("/cc/bulk/7").await, 1);
    // The job is listed, and unknown ids are 404.
    let list = get_plain(edge.admin(), "admin", "/purge").await?.json()?;
    assert_eq!(list[0]["id"], id.as_str(), "{list}");
    let r = get_plain(edge.admin(), "admin", "/purge/ffffffffffffffff").await?;
    assert_eq!(r.status, 404);
    // Purged objects come back from the origin on the next ordinary request.
    let r = get_plain(edge.http(), "cache.test", &bulk[7]).await?;
    assert!(
        r.header("cache-status")
            .unwrap_or("")
            .contains("fwd=uri-miss"),
        "{:?}",
        r.header("cache-status")
    );
    assert_eq!(origin.count("/cc/bulk/7").await, 2);
    Ok(())
}

#[tokio::test]
async fn kill_9_after_the_marker_never_serves_the_purged_objects() -> anyhow::Result<()> {
    use nix::sys::signal::Signal;
    let origin = TestOrigin::start("o").await?;
    let dir = meridian_e2e::certs::TempDir::new("purge-kill")?;
    let cfg = disk_config(&origin, dir.path());
    let edge = Edge::start(&cfg)?;
    let slow: Vec<String> = (0..3000).map(|i| path("slow", i)).collect();
    let gone: Vec<String> = (0..1000).map(|i| path("gone", i)).collect();
    let keep: Vec<String> = (0..20).map(|i| path("keep", i)).collect();
    // foyer's disk tier loses the last entries of its open block to a kill -9: the objects
    // checked after the restart are written first, the soft purge's objects last.
    fill(&edge, &keep).await?;
    fill(&edge, &gone).await?;
    fill(&edge, &slow).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Jobs run one at a time: a soft purge of 3000 objects (each rewritten) keeps the worker
    // busy, so the hard purge behind it has its marker written but nothing removed yet.
    let r = post_purge(&edge, r#"{"tags":["slow"], "soft": true}"#).await?;
    assert_eq!(r.status, 202, "{}", r.text());
    let r = post_purge(&edge, r#"{"tags":["gone"]}"#).await?;
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()?["id"].as_str().unwrap_or_default().to_string();
    // The queue is bounded: more purges are refused with 429 while it is full.
    let mut refused = None;
    for i in 0..40 {
        let r = post_purge(&edge, &format!(r#"{{"tags":["none-{i}"]}}"#)).await?;
        if r.status == 429 {
            refused = Some((i, r.header("retry-after").map(str::to_string)));
            break;
        }
        assert_eq!(r.status, 202, "{}", r.text());
    }
    let (queued_more, retry) = refused.ok_or_else(|| anyhow::anyhow!("no purge was refused"))?;
    assert!(queued_more <= 16, "{queued_more} purges queued");
    assert_eq!(retry.as_deref(), Some("1"));
    let state = job(&edge, &id).await?;
    assert_eq!(state["state"], "queued", "{state}");
    none_served(&edge, &gone[..100]).await?;
    edge.signal(Signal::SIGKILL)?;
    let mut edge = edge;
    let _ = tokio::task::spawn_blocking(move || edge.wait_exit(Duration::from_secs(10))).await?;

    let edge = Edge::start(&cfg)?;
    // Right after the restart (the resumed job may still be running): none of them is served.
    none_served(&edge, &gone).await?;
    all_hits(&edge, &keep).await?;
    // The unfinished purge was resumed from its marker, and ends.
    let list = get_plain(edge.admin(), "admin", "/purge").await?.json()?;
    let resumed: Vec<&serde_json::Value> = list
        .as_array()
        .map(|a| a.iter().filter(|j| j["resumed"] == true).collect())
        .unwrap_or_default();
    assert!(
        resumed.iter().any(|j| j["id"] == id.as_str()),
        "the hard purge was not resumed: {list}"
    );
    let done = until_done(&edge, &id).await?;
    assert_eq!(done["matched"], done["removed"], "{done}");
    assert!(done["matched"].as_u64().unwrap_or(0) >= 1, "{done}");
    none_served(&edge, &gone).await?;
    all_hits(&edge, &keep).await?;
    assert_eq!(origin.count("/cc/gone/3").await, 1);
    Ok(())
}
