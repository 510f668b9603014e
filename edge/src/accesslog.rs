//! The access log: one JSON object per line, written by a background task
//! behind a bounded queue. When the writer falls behind, lines are dropped
//! and counted (`meridian_access_log_dropped_total`), never queued without bound.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::Request;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::http::Downstream;
use crate::metrics::Metrics;

const QUEUE: usize = 8192;

/// One request's log line.
#[derive(Debug, Serialize)]
pub struct LogRecord {
    pub ts: String,
    pub client: SocketAddr,
    pub proto: &'static str,
    pub tls: bool,
    pub method: String,
    pub host: Option<String>,
    pub path: String,
    pub status: u16,
    pub bytes_out: u64,
    #[serde(serialize_with = "as_millis")]
    pub duration: Duration,
    pub site: Option<Arc<str>>,
    pub origin: Option<Arc<str>>,
    pub upstream_status: Option<u16>,
    pub attempts: u32,
    pub error: Option<&'static str>,
    /// False when the client went away or the body broke before its end.
    pub complete: bool,
    pub user_agent: Option<String>,
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1e6).round() / 1e3)
}

impl LogRecord {
    /// A record with only the connection's facts filled in.
    fn bare(client: SocketAddr, proto: &'static str, tls: bool) -> Self {
        LogRecord {
            ts: String::new(),
            client,
            proto,
            tls,
            method: String::new(),
            host: None,
            path: String::new(),
            status: 0,
            bytes_out: 0,
            duration: Duration::ZERO,
            site: None,
            origin: None,
            upstream_status: None,
            attempts: 0,
            error: None,
            complete: false,
            user_agent: None,
        }
    }

    /// A record for work no client asked for (background revalidation); never written.
    pub fn background() -> Self {
        Self::bare(SocketAddr::from(([0, 0, 0, 0], 0)), "background", false)
    }

    /// Starts a record. With `detailed` false (access log off) the strings
    /// are not built: only what the metrics need is kept.
    pub fn begin<B>(req: &Request<B>, ds: &Downstream, detailed: bool) -> Self {
        if !detailed {
            return Self::bare(ds.client, ds.proto.label(), ds.tls);
        }
        let h = req.headers();
        let s = |n: http::header::HeaderName| {
            h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string)
        };
        LogRecord {
            ts: rfc3339(SystemTime::now()),
            client: ds.client,
            proto: ds.proto.label(),
            tls: ds.tls,
            method: req.method().as_str().to_string(),
            host: req
                .uri()
                .authority()
                .map(|a| a.to_string())
                .or_else(|| s(http::header::HOST)),
            path: req
                .uri()
                .path_and_query()
                .map_or_else(|| "/".into(), |p| p.to_string()),
            status: 0,
            bytes_out: 0,
            duration: Duration::ZERO,
            site: None,
            origin: None,
            upstream_status: None,
            attempts: 0,
            error: None,
            complete: false,
            user_agent: s(http::header::USER_AGENT),
        }
    }
}

/// Formats a time as RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Where access log lines go.
#[derive(Clone, Debug)]
pub struct AccessLog {
    tx: Option<mpsc::Sender<Vec<u8>>>,
    metrics: Arc<Metrics>,
}

impl AccessLog {
    /// "off", "stdout", "stderr" or a file path (appended to; reopened on reload).
    pub fn open(target: &str, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = match target {
            "off" => return Ok(AccessLog { tx: None, metrics }),
            "stdout" => Box::new(std::io::stdout()),
            "stderr" => Box::new(std::io::stderr()),
            path => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
        // Writes block: run them on a blocking thread, batch by batch.
        tokio::task::spawn_blocking(move || {
            let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
            while let Some(line) = rx.blocking_recv() {
                let _ = out.write_all(&line);
                while let Ok(more) = rx.try_recv() {
                    let _ = out.write_all(&more);
                }
                let _ = out.flush();
            }
        });
        Ok(AccessLog {
            tx: Some(tx),
            metrics,
        })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn write(&self, rec: &LogRecord) {
        let Some(tx) = &self.tx else { return };
        let mut line = Vec::with_capacity(320);
        if serde_json::to_writer(&mut line, rec).is_ok() {
            line.push(b'\n');
            if tx.try_send(line).is_err() {
                self.metrics.access_log_dropped.inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
