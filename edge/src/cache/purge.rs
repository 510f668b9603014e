//! Purge jobs: purges by URL, tag, prefix or host that run in the background.
//!
//! A hard purge first writes a **purge marker** into the storage's index log
//! ([`Storage::mark_purge`]): one record and one sync, whatever the number of objects. From then
//! on every object it covers that was stored before it is a miss, also after a crash or a
//! restart. The job then removes the objects one by one without a sync each, and ends by retiring
//! the marker (one more sync). A marker still active at start-up is a job that did not finish:
//! it is resumed (`resumed: true`) under a new job record.
//!
//! A soft purge has no marker: it marks its objects stale one by one, as the job reaches them.
//!
//! Jobs run one at a time, in order. At most [`MAX_QUEUED`] wait behind the running one (more are
//! refused with [`PurgeError::Busy`]), and the records of the last [`MAX_KEPT`] jobs are kept
//! for `GET /purge/ID`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use super::storage::{MAX_MARK_SELECTORS, PurgeMatch, PurgeSelectors, Storage, StorageError};
use crate::metrics::{Metrics, Reason};

/// What a purge asks for (the admin API's JSON body).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    #[serde(default)]
    pub urls: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub prefixes: Vec<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Mark stale instead of removing, so stale-while-revalidate and
    /// stale-if-error still protect the origin.
    #[serde(default)]
    pub soft: bool,
}

/// How many objects a purge touched.
#[derive(Debug, Default, serde::Serialize)]
pub struct PurgeCounts {
    pub urls: usize,
    pub tags: usize,
    pub prefixes: usize,
    pub hosts: usize,
    pub purged: usize,
    pub soft: bool,
}

/// Lower-cases a prefix's scheme and host, as keys are.
pub fn normalize_prefix(p: &str) -> String {
    match p.split_once("://") {
        Some((scheme, rest)) => {
            let (host, path) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
            let sep = if rest.contains('/') { "/" } else { "" };
            format!(
                "{}://{}{sep}{path}",
                scheme.to_ascii_lowercase(),
                host.to_ascii_lowercase()
            )
        }
        None => p.to_string(),
    }
}

/// Most jobs waiting behind the running one.
pub const MAX_QUEUED: usize = 16;
/// Most job records kept (finished ones are forgotten oldest first).
pub const MAX_KEPT: usize = 256;
/// The longest a `POST /purge?wait` waits (below the admin connection's 60 s limit).
pub const MAX_WAIT: Duration = Duration::from_secs(50);
/// Removals between two yields of the worker.
const BATCH: usize = 256;

/// Why a purge was not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PurgeError {
    /// The queue of jobs is full.
    #[error("{MAX_QUEUED} purges are already waiting; retry later")]
    Busy,
    /// The purge worker has stopped (the cache is shutting down).
    #[error("the purge worker has stopped")]
    Stopped,
    /// The request names more than [`MAX_MARK_SELECTORS`] keys, tags, prefixes and hosts.
    #[error("too many purge selectors: {0} (at most {MAX_MARK_SELECTORS})")]
    TooMany(usize),
    /// The marker could not be made durable.
    #[error("cache storage: {0}")]
    Storage(#[from] StorageError),
}

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Accepted (its marker is written), waiting for the worker.
    Queued,
    /// Removing its objects.
    Running,
    /// Every object it matched is removed (or marked stale) and its marker retired.
    Done,
    /// Stopped by a storage error; its marker stays, and is resumed at the next start.
    Failed,
}

/// A job's progress, as `GET /purge/ID` shows it. Times are Unix seconds.
#[derive(Clone, Debug, serde::Serialize)]
pub struct JobStatus {
    pub id: String,
    pub state: JobState,
    pub soft: bool,
    /// Resumed at start-up from a marker a previous run left.
    pub resumed: bool,
    /// Objects the purge covered when it was accepted (each once).
    pub matched: u64,
    /// Objects removed (or, soft, marked stale) so far.
    pub removed: u64,
    /// The same as `removed` (the name the synchronous API used).
    pub purged: u64,
    /// Matched through `urls`, `tags`, `prefixes` and `hosts` (an object matched twice counts
    /// in both).
    pub urls: u64,
    pub tags: u64,
    pub prefixes: u64,
    pub hosts: u64,
    pub accepted: f64,
    pub started: Option<f64>,
    pub finished: Option<f64>,
    pub error: Option<String>,
}

struct Progress {
    state: JobState,
    started: Option<SystemTime>,
    finished: Option<SystemTime>,
    error: Option<String>,
}

/// One purge job.
pub struct Job {
    /// The marker's id (hard) or a number of the same sequence (soft).
    id: u64,
    soft: bool,
    resumed: bool,
    by_kind: [u64; 4],
    matched: u64,
    accepted: SystemTime,
    keys: Mutex<Vec<Arc<str>>>,
    removed: AtomicU64,
    progress: Mutex<Progress>,
    done: watch::Sender<bool>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("soft", &self.soft)
            .field("matched", &self.matched)
            .finish()
    }
}

fn unix(t: SystemTime) -> f64 {
    let s = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    (s * 1000.0).round() / 1000.0
}

/// The id of job `n` as the API shows it.
fn show_id(n: u64) -> String {
    format!("{n:016x}")
}

impl Job {
    fn new(id: u64, soft: bool, resumed: bool, m: PurgeMatch) -> Arc<Self> {
        let (done, _) = watch::channel(false);
        Arc::new(Job {
            id,
            soft,
            resumed,
            by_kind: [m.keys, m.tags, m.prefixes, m.hosts].map(|n| n as u64),
            matched: m.matched.len() as u64,
            accepted: SystemTime::now(),
            keys: Mutex::new(m.matched),
            removed: AtomicU64::new(0),
            progress: Mutex::new(Progress {
                state: JobState::Queued,
                started: None,
                finished: None,
                error: None,
            }),
            done,
        })
    }

    /// The job's id as the API shows it.
    pub fn id(&self) -> String {
        show_id(self.id)
    }

    /// Its progress now.
    pub fn status(&self) -> JobStatus {
        let p = self.progress.lock();
        let removed = self.removed.load(Ordering::Relaxed);
        JobStatus {
            id: self.id(),
            state: p.state,
            soft: self.soft,
            resumed: self.resumed,
            matched: self.matched,
            removed,
            purged: removed,
            urls: self.by_kind[0],
            tags: self.by_kind[1],
            prefixes: self.by_kind[2],
            hosts: self.by_kind[3],
            accepted: unix(self.accepted),
            started: p.started.map(unix),
            finished: p.finished.map(unix),
            error: p.error.clone(),
        }
    }

    fn is_finished(&self) -> bool {
        matches!(
            self.progress.lock().state,
            JobState::Done | JobState::Failed
        )
    }

    fn start(&self) {
        let mut p = self.progress.lock();
        p.state = JobState::Running;
        p.started = Some(SystemTime::now());
    }

    fn finish(&self, result: Result<(), String>) {
        {
            let mut p = self.progress.lock();
            let now = SystemTime::now();
            p.started.get_or_insert(now);
            p.finished = Some(now);
            match result {
                Ok(()) => p.state = JobState::Done,
                Err(e) => {
                    p.state = JobState::Failed;
                    p.error = Some(e);
                }
            }
        }
        self.done.send_replace(true);
    }

    /// Waits until the job is finished, at most `timeout`; returns whether it is.
    pub async fn wait(&self, timeout: Duration) -> bool {
        let mut rx = self.done.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|d| *d))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

struct Worker {
    rx: mpsc::Receiver<Arc<Job>>,
    resumed: Vec<Arc<Job>>,
}

/// The purge jobs of one cache.
pub struct PurgeJobs {
    storage: Storage,
    metrics: Arc<Metrics>,
    jobs: Mutex<VecDeque<Arc<Job>>>,
    tx: mpsc::Sender<Arc<Job>>,
    /// The worker's parts until it is started.
    worker: Mutex<Option<Worker>>,
}

impl std::fmt::Debug for PurgeJobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PurgeJobs")
            .field("jobs", &self.jobs.lock().len())
            .finish()
    }
}

impl PurgeJobs {
    /// Takes over the purges a previous run left unfinished (markers still in the storage), and
    /// starts the worker if a tokio runtime is running (else at the first purge).
    pub fn new(storage: &Storage, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::channel(MAX_QUEUED);
        let mut resumed = Vec::new();
        for (id, _) in storage.pending_purges() {
            let Some(m) = storage.index().marker_matches(id) else {
                continue;
            };
            tracing::info!(
                job = %show_id(id),
                matched = m.matched.len(),
                "resuming a purge that had not finished"
            );
            resumed.push(Job::new(id, false, true, m));
        }
        let jobs = PurgeJobs {
            storage: storage.clone(),
            metrics,
            jobs: Mutex::new(resumed.iter().cloned().collect()),
            tx,
            worker: Mutex::new(Some(Worker { rx, resumed })),
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            jobs.start_worker();
        }
        jobs
    }

    fn start_worker(&self) {
        let Some(w) = self.worker.lock().take() else {
            return;
        };
        let storage = self.storage.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let Worker { mut rx, resumed } = w;
            for job in resumed {
                run(&job, &storage, &metrics).await;
            }
            while let Some(job) = rx.recv().await {
                run(&job, &storage, &metrics).await;
            }
        });
    }

    /// The job `id` (as the API shows it), if its record is kept.
    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs.lock().iter().find(|j| j.id() == id).cloned()
    }

    /// The kept jobs, newest first.
    pub fn list(&self) -> Vec<JobStatus> {
        self.jobs.lock().iter().rev().map(|j| j.status()).collect()
    }

    fn keep(&self, job: Arc<Job>) {
        let mut jobs = self.jobs.lock();
        jobs.push_back(job);
        while jobs.len() > MAX_KEPT {
            match jobs.iter().position(|j| j.is_finished()) {
                Some(i) => {
                    jobs.remove(i);
                }
                None => break,
            }
        }
    }
}

/// Runs one job to its end.
async fn run(job: &Arc<Job>, storage: &Storage, metrics: &Metrics) {
    job.start();
    let keys = std::mem::take(&mut *job.keys.lock());
    let reason = if job.soft { "soft" } else { "hard" };
    let counter = metrics
        .cache_purges
        .get_or_create(&Reason { reason })
        .clone();
    let result: Result<(), String> = async {
        let now = SystemTime::now();
        for batch in keys.chunks(BATCH) {
            let mut n = 0;
            for k in batch {
                let removed = match job.soft {
                    true => super::meta::soft_purge(storage, k, now).await,
                    false => storage
                        .remove_purged(k, job.id)
                        .await
                        .map_err(|e| e.to_string())?,
                };
                n += u64::from(removed);
            }
            job.removed.fetch_add(n, Ordering::Relaxed);
            counter.inc_by(n);
            tokio::task::yield_now().await;
        }
        if !job.soft {
            storage
                .retire_purge(job.id)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = &result {
        tracing::warn!(job = %job.id(), error = %e, "purge job failed; its marker stays");
    }
    job.finish(result);
}

/// Reads `POST /purge`'s query: `wait` (or `wait=true`) waits up to [`MAX_WAIT`], `wait=N` up
/// to N seconds (at most [`MAX_WAIT`]); without it, the call does not wait.
pub fn parse_wait(query: Option<&str>) -> Result<Option<Duration>, String> {
    let Some(q) = query else { return Ok(None) };
    let mut wait = None;
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k != "wait" {
            return Err(format!("unknown query parameter {k:?}"));
        }
        wait = match v {
            "" | "true" => Some(MAX_WAIT),
            "false" | "0" => None,
            n => {
                let secs: u64 = n
                    .parse()
                    .map_err(|_| format!("wait must be true, false or seconds, not {n:?}"))?;
                Some(Duration::from_secs(secs).min(MAX_WAIT))
            }
        };
    }
    Ok(wait)
}

impl PurgeJobs {
    /// Accepts a purge of `req`, whose URLs' keys are `url_keys`: for a
    /// hard one, the objects it covers are misses when this returns, and the
    /// purge survives a crash; their removal goes on in the background.
    pub async fn submit(
        &self,
        req: &PurgeRequest,
        url_keys: Vec<String>,
    ) -> Result<Arc<Job>, PurgeError> {
        let jobs = self;
        let mut sel = PurgeSelectors {
            keys: url_keys,
            ..PurgeSelectors::default()
        };
        sel.keys.sort_unstable();
        sel.keys.dedup();
        sel.tags = req.tags.clone();
        sel.prefixes = req.prefixes.iter().map(|p| normalize_prefix(p)).collect();
        sel.hosts = req.hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
        for v in [&mut sel.tags, &mut sel.prefixes, &mut sel.hosts] {
            v.retain(|s| !s.is_empty());
            v.sort_unstable();
            v.dedup();
        }
        if sel.len() > MAX_MARK_SELECTORS {
            return Err(PurgeError::TooMany(sel.len()));
        }
        jobs.start_worker();
        let permit = jobs.tx.try_reserve().map_err(|e| match e {
            mpsc::error::TrySendError::Full(()) => PurgeError::Busy,
            mpsc::error::TrySendError::Closed(()) => PurgeError::Stopped,
        })?;
        let job = if req.soft {
            let m = self.storage.index().matching(&sel);
            Job::new(self.storage.next_id(), true, false, m)
        } else if sel.is_empty() {
            Job::new(self.storage.next_id(), false, false, PurgeMatch::default())
        } else {
            let (id, m) = self.storage.mark_purge(&sel).await?;
            Job::new(id, false, false, m)
        };
        jobs.keep(job.clone());
        permit.send(job.clone());
        Ok(job)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn wait_parameter() {
        assert_eq!(parse_wait(None).unwrap(), None);
        assert_eq!(parse_wait(Some("wait")).unwrap(), Some(MAX_WAIT));
        assert_eq!(parse_wait(Some("wait=true")).unwrap(), Some(MAX_WAIT));
        assert_eq!(parse_wait(Some("wait=false")).unwrap(), None);
        assert_eq!(
            parse_wait(Some("wait=5")).unwrap(),
            Some(Duration::from_secs(5))
        );
        assert_eq!(parse_wait(Some("wait=999")).unwrap(), Some(MAX_WAIT));
        assert!(parse_wait(Some("wait=soon")).is_err());
        assert!(parse_wait(Some("tags=a")).is_err());
    }
}
