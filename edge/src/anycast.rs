//! The anycast controller (`meridian-edge anycast`): announces the POP's
//! anycast prefix through BIRD only while the local edge is ready, and
//! withdraws it when `/readyz` fails (drain, overload, a dead process) or
//! when the controller itself stops.
//!
//! It does not speak BGP: BIRD does. The controller enables or disables a
//! BIRD `static` protocol that holds the anycast route, with `birdc`, and
//! BIRD's BGP session exports or withdraws it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Whether the prefix should be announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Announced,
    Withdrawn,
}

/// Rise/fall hysteresis over readiness probes; pure.
#[derive(Debug)]
pub struct Hysteresis {
    pub state: Route,
    rise: u32,
    fall: u32,
    ok: u32,
    bad: u32,
}

impl Hysteresis {
    /// Starts withdrawn: the prefix is announced only after `rise` good probes.
    pub fn new(rise: u32, fall: u32) -> Self {
        Hysteresis {
            state: Route::Withdrawn,
            rise: rise.max(1),
            fall: fall.max(1),
            ok: 0,
            bad: 0,
        }
    }

    /// Records a probe; returns the new state if it changed.
    pub fn observe(&mut self, ready: bool) -> Option<Route> {
        if ready {
            self.bad = 0;
            self.ok = self.ok.saturating_add(1);
            if self.state == Route::Withdrawn && self.ok >= self.rise {
                self.state = Route::Announced;
                return Some(Route::Announced);
            }
        } else {
            self.ok = 0;
            self.bad = self.bad.saturating_add(1);
            if self.state == Route::Announced && self.bad >= self.fall {
                self.state = Route::Withdrawn;
                return Some(Route::Withdrawn);
            }
        }
        None
    }
}

/// The controller's settings (the subcommand's flags).
#[derive(Clone, Debug)]
pub struct Settings {
    /// The edge's admin listener.
    pub admin: SocketAddr,
    pub birdc: PathBuf,
    /// BIRD's control socket.
    pub socket: PathBuf,
    /// The BIRD static protocol holding the anycast route.
    pub protocol: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AnycastError {
    #[error("running {cmd}: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} failed: {output}")]
    Bird { cmd: String, output: String },
    #[error("{cmd} timed out")]
    Timeout { cmd: String },
}

/// One readiness probe: `GET /readyz` answered 200 within the timeout.
pub async fn probe(admin: SocketAddr, timeout: Duration) -> bool {
    let fut = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(admin).await.ok()?;
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).await.ok()?;
        Some(buf[..n].starts_with(b"HTTP/1.1 200"))
    };
    matches!(tokio::time::timeout(timeout, fut).await, Ok(Some(true)))
}

/// Enables (announce) or disables (withdraw) the static protocol with birdc.
pub async fn apply(s: &Settings, route: Route) -> Result<(), AnycastError> {
    let verb = match route {
        Route::Announced => "enable",
        Route::Withdrawn => "disable",
    };
    let cmd = format!(
        "{} -s {} {verb} {}",
        s.birdc.display(),
        s.socket.display(),
        s.protocol
    );
    let out = tokio::process::Command::new(&s.birdc)
        .arg("-s")
        .arg(&s.socket)
        .arg(verb)
        .arg(&s.protocol)
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(Duration::from_secs(5), out).await {
        Err(_) => return Err(AnycastError::Timeout { cmd }),
        Ok(Err(source)) => return Err(AnycastError::Spawn { cmd, source }),
        Ok(Ok(o)) => o,
    };
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    // birdc answers "<proto>: enabled", "<proto>: already enabled", or the disabled forms.
    let ok = out.status.success() && (text.contains("enabled") || text.contains("disabled"));
    if !ok {
        return Err(AnycastError::Bird {
            cmd,
            output: text.trim().to_string(),
        });
    }
    Ok(())
}

/// Runs until SIGTERM or SIGINT, then withdraws and returns.
pub async fn run(s: Settings, mut on_change: impl FnMut(Route)) -> Result<(), AnycastError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|source| AnycastError::Spawn {
        cmd: "signal".into(),
        source,
    })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| AnycastError::Spawn {
        cmd: "signal".into(),
        source,
    })?;
    let mut h = Hysteresis::new(s.rise, s.fall);
    // Start from a known state: withdrawn until the edge proves ready.
    apply(&s, Route::Withdrawn).await?;
    on_change(Route::Withdrawn);
    let mut tick = tokio::time::interval(s.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let ready = probe(s.admin, s.timeout).await;
                if let Some(route) = h.observe(ready) {
                    match apply(&s, route).await {
                        Ok(()) => {
                            tracing::warn!(?route, "anycast route changed");
                            on_change(route);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "could not change the anycast route; retrying");
                            // Retry on the next probe.
                            h = Hysteresis { state: if route == Route::Announced { Route::Withdrawn } else { Route::Announced }, ..h };
                        }
                    }
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    apply(&s, Route::Withdrawn).await?;
    on_change(Route::Withdrawn);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_and_fall() {
        let mut h = Hysteresis::new(2, 3);
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(true), Some(Route::Announced));
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(true), None, "a good probe resets the fall count");
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), Some(Route::Withdrawn));
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(true), Some(Route::Announced));
    }
}
