//! Handing listening sockets to a new process over a unix socket, as
//! nginx's binary upgrade and Pingora's fd transfer do: the running edge
//! sends every listening socket (TCP, the QUIC UDP sockets, admin) with
//! SCM_RIGHTS; the new process serves on the same sockets (the same
//! kernel queues: nothing is re-bound, no connection is refused), says
//! "ready", and the old one stops accepting and drains.

use std::io::{IoSlice, IoSliceMut, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// The greeting of an edge that does not steer QUIC packets (before
/// December 2026): still understood, so such an edge can be upgraded.
const HELLO_V1: &[u8] = b"meridian-edge-handover-1";
/// The greeting that carries the descriptors, then the running edge's QUIC
/// connection-ID tag as two hex digits ([`super::steer`]).
const HELLO: &str = "meridian-edge-handover-2 tag=";
/// What the new process answers once it serves.
pub const READY: &[u8] = b"ready\n";
/// After [`READY`] (protocol 2), the indices of the UDP sockets whose
/// forwarding pair comes with the message: `fwd 1 4\n`.
const FWD: &str = "fwd";
/// The kernel's limit on descriptors in one message (SCM_MAX_FD).
const MAX_FDS: usize = 253;

fn io(e: nix::Error) -> std::io::Error {
    std::io::Error::from(e)
}

/// Sends `fds` over `stream` (the old process's side), with this process's
/// QUIC connection-ID tag.
pub fn send_fds(stream: &UnixStream, fds: &[OwnedFd], tag: u8) -> std::io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(std::io::Error::other(format!(
            "{} sockets to hand over; at most {MAX_FDS} fit in one message",
            fds.len()
        )));
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let hello = format!("{HELLO}{tag:02x}");
    let iov = [IoSlice::new(hello.as_bytes())];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let n = sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).map_err(io)?;
    if n != hello.len() {
        return Err(std::io::Error::other("short handover message"));
    }
    Ok(())
}

/// What a new process received from the running edge.
pub struct TakenOver {
    pub fds: Vec<OwnedFd>,
    /// The stream on which to say [`READY`] ([`say_ready`]).
    pub stream: UnixStream,
    /// The running edge's QUIC connection-ID tag, when it steers QUIC
    /// packets (protocol 2); `None` for an edge of protocol 1.
    pub old_tag: Option<u8>,
}

/// Connects to the running edge at `path` and receives its sockets (the new
/// process's side).
pub fn take_over(path: &Path, wait: Duration) -> std::io::Result<TakenOver> {
    let stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(wait))?;
    stream.set_write_timeout(Some(wait))?;
    let mut buf = [0u8; 64];
    let mut fds = Vec::new();
    let n = recv_with_fds(&stream, &mut buf, &mut fds)?;
    let got = buf.get(..n).unwrap_or_default();
    let old_tag = if got == HELLO_V1 {
        None
    } else {
        let tag = std::str::from_utf8(got)
            .ok()
            .and_then(|g| g.strip_prefix(HELLO))
            .filter(|t| t.len() == 2)
            .and_then(|t| u8::from_str_radix(t, 16).ok());
        match tag {
            Some(t) => Some(t),
            None => {
                return Err(std::io::Error::other(
                    "the process at the handover socket is not a meridian-edge of a known version",
                ));
            }
        }
    };
    Ok(TakenOver {
        fds,
        stream,
        old_tag,
    })
}

/// Waits for the new process's [`READY`] (the old process's side): the
/// forwarding pairs it gives back (index of the socket in what was sent,
/// and this process's end) when it came; `None` when the new process went
/// away, answered something else, or `wait` passed.
pub fn wait_ready(stream: &UnixStream, wait: Duration) -> Option<Vec<(usize, OwnedFd)>> {
    stream.set_read_timeout(Some(wait)).ok()?;
    let mut text = Vec::with_capacity(64);
    let mut fds = Vec::new();
    // "ready\n" then "fwd …\n": two lines, at most 2 KiB.
    while text.iter().filter(|&&b| b == b'\n').count() < 2 && text.len() < 2048 {
        let mut buf = [0u8; 512];
        let n = recv_with_fds(stream, &mut buf, &mut fds).ok()?;
        if n == 0 {
            return None;
        }
        text.extend_from_slice(&buf[..n]);
    }
    let text = std::str::from_utf8(&text).ok()?;
    let rest = text.strip_prefix(std::str::from_utf8(READY).ok()?)?;
    let line = rest.lines().next()?;
    let idx: Vec<usize> = line
        .strip_prefix(FWD)?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    if idx.len() != fds.len() {
        return None;
    }
    Some(idx.into_iter().zip(fds).collect())
}

/// Says [`READY`] (the new process's side). To an edge of protocol 2
/// (`steered`), it also gives back the forwarding pairs.
pub fn say_ready(
    mut stream: &UnixStream,
    steered: bool,
    give_back: &[(usize, OwnedFd)],
) -> std::io::Result<()> {
    if !steered {
        return stream.write_all(READY);
    }
    let mut msg = String::from_utf8_lossy(READY).into_owned();
    msg.push_str(FWD);
    for (i, _) in give_back {
        msg.push_str(&format!(" {i}"));
    }
    msg.push('\n');
    let raw: Vec<RawFd> = give_back.iter().map(|(_, f)| f.as_raw_fd()).collect();
    let iov = [IoSlice::new(msg.as_bytes())];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
    let n = sendmsg::<()>(stream.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).map_err(io)?;
    if n != msg.len() {
        return Err(std::io::Error::other("short handover message"));
    }
    Ok(())
}

/// One `recvmsg` into `buf`; the descriptors that came with it (SCM_RIGHTS,
/// close-on-exec) are added to `fds`. Returns the bytes read.
fn recv_with_fds(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> std::io::Result<usize> {
    let mut cmsg_buf = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg_buf),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io)?;
    for c in msg.cmsgs().map_err(io)? {
        if let ControlMessageOwned::ScmRights(r) = c {
            fds.extend(r.into_iter().map(adopt));
        }
    }
    Ok(msg.bytes)
}

/// Owns a descriptor the kernel just installed in this process.
#[allow(unsafe_code)]
fn adopt(fd: RawFd) -> OwnedFd {
    // SAFETY: recvmsg's SCM_RIGHTS installed `fd` in this process for us;
    // nothing else knows it, so this is its only owner.
    unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
}
