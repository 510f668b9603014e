//! A network link in user space, for kernels without `sch_netem`: two TUN
//! devices, one moved into each network namespace, and this process copying
//! every IP packet from one to the other with the delay and the loss it is
//! told. The packets are the kernel's own (TCP's handshake, retransmissions
//! and window included); only the wire between the two stacks is ours.
//!
//! Like netem on each end of a veth pair: the delay applies to each
//! direction, a lost packet is dropped in either direction with the given
//! probability, loss 100% is a partition, and a queue holds at most 1000
//! packets per direction (netem's default `limit`); past that, packets are
//! dropped and counted. The order of packets in a direction is kept.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The queue limit per direction, in packets (netem's default).
const LIMIT: usize = 1000;

/// Opens `/dev/net/tun` and creates the layer-3 device `name` (no packet
/// information header: each read or write is one IP packet).
pub fn tun(name: &str) -> anyhow::Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| anyhow::anyhow!("/dev/net/tun: {e}"))?;
    let bytes = name.as_bytes();
    anyhow::ensure!(
        bytes.len() < libc::IFNAMSIZ,
        "interface name too long: {name}"
    );
    // struct ifreq: the name, then a union whose first member the kernel
    // reads as the flags (a short); 40 bytes on Linux.
    let mut ifr = [0u8; 40];
    ifr[..bytes.len()].copy_from_slice(bytes);
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    let rc = tunsetiff(&f, &mut ifr);
    anyhow::ensure!(
        rc == 0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    Ok(f)
}

#[allow(unsafe_code)]
fn tunsetiff(f: &File, ifr: &mut [u8; 40]) -> libc::c_int {
    use std::os::fd::AsRawFd;
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which is 40 bytes
    // on Linux; `ifr` is a live, exclusively borrowed buffer of that size,
    // and the descriptor is open for the duration of the call.
    unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF as _, ifr.as_mut_ptr()) }
}

/// What the wire does to each packet now.
#[derive(Debug, Default)]
pub struct Impairment {
    delay_us: AtomicU64,
    /// Loss in parts per million (1,000,000: a partition).
    loss_ppm: AtomicU64,
}

/// Packets the wire dropped: by its loss, and for a full queue.
#[derive(Debug, Default)]
pub struct Counts {
    pub forwarded: AtomicU64,
    pub lost: AtomicU64,
    pub overflow: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct Wire {
    imp: Arc<Impairment>,
    pub counts: Arc<Counts>,
}

/// One direction's packets in flight, and whether its reader has ended.
#[derive(Default)]
struct InFlight {
    packets: VecDeque<(Instant, Vec<u8>)>,
    closed: bool,
}

type Queue = Arc<(Mutex<InFlight>, Condvar)>;

impl Wire {
    /// Starts copying between `a` and `b`, both ways, on four threads that
    /// end when a device goes away (its namespace is deleted).
    pub fn start(a: File, b: File) -> anyhow::Result<Wire> {
        let wire = Wire {
            imp: Arc::default(),
            counts: Arc::default(),
        };
        let (a2, b2) = (a.try_clone()?, b.try_clone()?);
        wire.direction(a, b2, 1)?;
        wire.direction(b, a2, 2)?;
        Ok(wire)
    }

    /// From now on: `delay` on each direction, and `loss_pct` percent of
    /// the packets dropped (100: a partition).
    pub fn set(&self, delay: Duration, loss_pct: f64) {
        self.imp
            .delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
        let ppm = (loss_pct.clamp(0.0, 100.0) * 10_000.0).round() as u64;
        self.imp.loss_ppm.store(ppm, Ordering::Relaxed);
    }

    fn direction(&self, mut from: File, mut to: File, seed: u64) -> anyhow::Result<()> {
        let q: Queue = Arc::default();
        let (imp, counts, rq) = (self.imp.clone(), self.counts.clone(), q.clone());
        std::thread::Builder::new()
            .name("wire-read".into())
            .spawn(move || {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed);
                let mut buf = vec![0u8; 65_536];
                let mut last_due = Instant::now();
                let close = |rq: &Queue| {
                    let (lock, cv) = &**rq;
                    if let Ok(mut q) = lock.lock() {
                        q.closed = true;
                    }
                    cv.notify_one();
                };
                loop {
                    let n = match from.read(&mut buf) {
                        Ok(n) if n > 0 => n,
                        _ => return close(&rq),
                    };
                    let loss = imp.loss_ppm.load(Ordering::Relaxed);
                    if loss > 0 && rng.next() % 1_000_000 < loss {
                        counts.lost.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let delay = Duration::from_micros(imp.delay_us.load(Ordering::Relaxed));
                    // In order: never due before the packet ahead of it.
                    let due = (Instant::now() + delay).max(last_due);
                    let (lock, cv) = &*rq;
                    let Ok(mut queue) = lock.lock() else { return };
                    if queue.packets.len() >= LIMIT {
                        counts.overflow.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    last_due = due;
                    queue.packets.push_back((due, buf[..n].to_vec()));
                    cv.notify_one();
                }
            })?;
        let counts = self.counts.clone();
        std::thread::Builder::new()
            .name("wire-write".into())
            .spawn(move || {
                let (lock, cv) = &*q;
                loop {
                    let packet = {
                        let Ok(mut queue) = lock.lock() else { return };
                        loop {
                            let now = Instant::now();
                            match queue.packets.front() {
                                Some((due, _)) if *due <= now => break queue.packets.pop_front(),
                                Some((due, _)) => {
                                    let wait = *due - now;
                                    match cv.wait_timeout(queue, wait) {
                                        Ok((g, _)) => queue = g,
                                        Err(_) => return,
                                    }
                                }
                                None if queue.closed => return,
                                None => match cv.wait(queue) {
                                    Ok(g) => queue = g,
                                    Err(_) => return,
                                },
                            }
                        }
                    };
                    if let Some((_, p)) = packet {
                        // A packet the device refuses is lost; the thread
                        // ends when the reader of this direction does.
                        // (A TUN write takes the whole packet or fails.)
                        match to.write(&p) {
                            Ok(n) if n == p.len() => {
                                counts.forwarded.fetch_add(1, Ordering::Relaxed)
                            }
                            _ => counts.lost.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                }
            })?;
        Ok(())
    }
}

/// xorshift64*: enough for a loss decision, and reproducible per direction.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_decisions_are_uniform_enough() {
        // 5% of 200,000 draws below 50,000 ppm, within 0.3 points.
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ 1);
        let lost = (0..200_000)
            .filter(|_| rng.next() % 1_000_000 < 50_000)
            .count();
        let pct = lost as f64 / 2000.0;
        assert!((4.7..=5.3).contains(&pct), "{pct}% lost");
    }
}
