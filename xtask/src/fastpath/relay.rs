//! The userspace baseline: a thread in `dut` that takes each datagram sent
//! to 10.0.1.1:9000 and sends its payload on to the sink (203.0.113.2:9000)
//! from a connected socket, one `recvfrom` and one `send` per packet, or
//! up to 64 packets per `recvmmsg`/`sendmmsg`, as a relay tuned for speed
//! would.

use std::{
    net::{SocketAddrV4, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow};
use nix::{
    sched::{CloneFlags, setns},
    unistd::gettid,
};

use super::{
    CONTENT_IP, LAN_IP, OUT_IP, RELAY_RCVBUF, RELAY_SPORT, USER_DPORT, cpu::pin_to,
    netns::netns_file,
};

/// The relay thread; stopped on drop.
pub(super) struct Relay {
    stop: Arc<AtomicBool>,
    /// The thread's id, for its run time.
    pub tid: i32,
    handle: Option<thread::JoinHandle<Result<()>>>,
}

impl Relay {
    pub fn start(ns: &str, cpu: usize, batched: bool) -> Result<Self> {
        let file = netns_file(ns)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let s = stop.clone();
        let ns_name = ns.to_string();
        let handle = thread::spawn(move || -> Result<()> {
            let setup = || -> Result<(UdpSocket, UdpSocket)> {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("entering namespace {ns_name}"))?;
                pin_to(cpu)?;
                let rx = UdpSocket::bind(SocketAddrV4::new(LAN_IP, USER_DPORT))
                    .context("binding the relay's receive socket")?;
                // A timeout, to notice `stop` when no traffic comes.
                rx.set_read_timeout(Some(Duration::from_millis(50)))?;
                // Room for the generator's bursts (a millisecond of traffic),
                // past net.core.rmem_max, as a relay tuned for speed would.
                let size: libc::c_int = RELAY_RCVBUF;
                // SAFETY: a valid socket, and a pointer to a c_int of the
                // length given.
                let rc = unsafe {
                    libc::setsockopt(
                        rx.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_RCVBUFFORCE,
                        (&raw const size).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error()).context("SO_RCVBUFFORCE");
                }
                let tx = UdpSocket::bind(SocketAddrV4::new(OUT_IP, RELAY_SPORT))
                    .context("binding the relay's send socket")?;
                tx.connect(SocketAddrV4::new(CONTENT_IP, USER_DPORT))?;
                Ok((rx, tx))
            };
            let (rx, tx) = match setup() {
                Ok(socks) => {
                    let _ = ready_tx.send(Ok(gettid().as_raw()));
                    socks
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(());
                }
            };
            if batched {
                relay_batched(&rx, &tx, &s)
            } else {
                relay_simple(&rx, &tx, &s)
            }
        });
        let mut relay = Self {
            stop,
            tid: 0,
            handle: Some(handle),
        };
        relay.tid = ready_rx
            .recv()
            .context("the relay thread ended before it was ready")??;
        Ok(relay)
    }

    /// Stops the thread; its error, if it failed.
    pub fn stop(mut self) -> Result<()> {
        self.stop_thread()
    }

    fn stop_thread(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take() {
            Some(h) => h.join().map_err(|_| anyhow!("the relay thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.stop_thread();
    }
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted
    )
}

fn relay_simple(rx: &UdpSocket, tx: &UdpSocket, stop: &AtomicBool) -> Result<()> {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        match rx.recv_from(&mut buf) {
            Ok((len, _from)) => {
                tx.send(&buf[..len]).context("relay send")?;
            }
            Err(e) if timed_out(&e) => {}
            Err(e) => return Err(e).context("relay recv_from"),
        }
    }
    Ok(())
}

fn relay_batched(rx: &UdpSocket, tx: &UdpSocket, stop: &AtomicBool) -> Result<()> {
    const B: usize = 64;
    let mut bufs = vec![[0u8; 2048]; B];
    // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
    let mut names: Vec<libc::sockaddr_in> = vec![unsafe { std::mem::zeroed() }; B];
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: mmsghdr is plain data; all-zero is a valid (empty) header.
    let mut hdrs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; B];
    while !stop.load(Ordering::Relaxed) {
        for i in 0..B {
            iovs[i].iov_len = bufs[i].len();
            hdrs[i].msg_hdr.msg_iov = &raw mut iovs[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
            hdrs[i].msg_hdr.msg_name = (&raw mut names[i]).cast();
            hdrs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
        }
        // SAFETY: `hdrs` holds B headers, each pointing at one live iovec
        // over a live 2048-byte buffer and at a live sockaddr_in; none of
        // them moves or is freed during the call.
        let got = unsafe {
            libc::recvmmsg(
                rx.as_raw_fd(),
                hdrs.as_mut_ptr(),
                B as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            if timed_out(&e) {
                continue;
            }
            return Err(e).context("relay recvmmsg");
        }
        let got = got as usize;
        for i in 0..got {
            iovs[i].iov_len = hdrs[i].msg_len as usize;
            // The send socket is connected: no destination per message.
            hdrs[i].msg_hdr.msg_name = std::ptr::null_mut();
            hdrs[i].msg_hdr.msg_namelen = 0;
        }
        let mut done = 0;
        while done < got {
            // SAFETY: as above, for the `got - done` headers from `done` on,
            // whose iovecs now cover the received bytes.
            let sent = unsafe {
                libc::sendmmsg(
                    tx.as_raw_fd(),
                    hdrs.as_mut_ptr().add(done),
                    (got - done) as u32,
                    0,
                )
            };
            if sent < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("relay sendmmsg");
            }
            done += sent as usize;
        }
    }
    Ok(())
}
