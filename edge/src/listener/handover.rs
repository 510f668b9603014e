//! Handing listening sockets to a new process over a unix socket, as
//! nginx's binary upgrade and Pingora's fd transfer do: the running edge
//! sends every listening socket (TCP, the QUIC UDP sockets, admin) with
//! SCM_RIGHTS; the new process serves on the same sockets (the same
//! kernel queues: nothing is re-bound, no connection is refused), says
//! "ready", and the old one stops accepting and drains.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// The greeting that carries the descriptors.
const HELLO: &[u8] = b"meridian-edge-handover-1";
/// What the new process answers once it serves.
pub const READY: &[u8] = b"ready\n";
/// The kernel's limit on descriptors in one message (SCM_MAX_FD).
const MAX_FDS: usize = 253;

fn io(e: nix::Error) -> std::io::Error {
    std::io::Error::from(e)
}

/// Sends `fds` over `stream` (the old process's side).
pub fn send_fds(stream: &UnixStream, fds: &[OwnedFd]) -> std::io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(std::io::Error::other(format!(
            "{} sockets to hand over; at most {MAX_FDS} fit in one message",
            fds.len()
        )));
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let iov = [IoSlice::new(HELLO)];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let n = sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).map_err(io)?;
    if n != HELLO.len() {
        return Err(std::io::Error::other("short handover message"));
    }
    Ok(())
}

/// Connects to the running edge at `path` and receives its sockets (the new
/// process's side). Returns them with the stream, on which to say [`READY`].
pub fn take_over(path: &Path, wait: Duration) -> std::io::Result<(Vec<OwnedFd>, UnixStream)> {
    let stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(wait))?;
    stream.set_write_timeout(Some(wait))?;
    let mut buf = [0u8; 64];
    let mut cmsg_buf = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (n, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_buf),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(io)? {
            if let ControlMessageOwned::ScmRights(r) = c {
                fds.extend(r.into_iter().map(adopt));
            }
        }
        (msg.bytes, fds)
    };
    if buf.get(..n) != Some(HELLO) {
        return Err(std::io::Error::other(
            "the process at the handover socket is not a meridian-edge of this version",
        ));
    }
    Ok((fds, stream))
}

/// Waits for the new process's [`READY`] (the old process's side): true
/// when it came, false when the new process went away or `wait` passed.
pub fn wait_ready(mut stream: &UnixStream, wait: Duration) -> bool {
    if stream.set_read_timeout(Some(wait)).is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    let mut got = 0;
    while got < READY.len() {
        match stream.read(&mut buf[got..]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got += n,
        }
    }
    &buf[..READY.len()] == READY
}

/// Says [`READY`] (the new process's side).
pub fn say_ready(mut stream: &UnixStream) -> std::io::Result<()> {
    stream.write_all(READY)
}

/// Owns a descriptor the kernel just installed in this process.
#[allow(unsafe_code)]
fn adopt(fd: RawFd) -> OwnedFd {
    // SAFETY: recvmsg's SCM_RIGHTS installed `fd` in this process for us;
    // nothing else knows it, so this is its only owner.
    unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
}
