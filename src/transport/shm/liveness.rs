//! Noticing that the peer of a shared-memory link is gone, without a timeout: its
//! process's pidfd becomes readable when it exits (SIGKILL included), and the network
//! link the shared memory was set up over, kept open beside it, closes when the peer
//! closes or its connection breaks. Either fails the link and wakes its waiters.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::link::Shared;
use crate::transport::Link;

/// A descriptor that becomes readable once process `pid` (of this PID namespace) has
/// exited.
pub(crate) fn pidfd(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid"))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; it
    // touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: `fd` is a descriptor the kernel just opened for us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Registers a pidfd with the runtime's reactor.
fn readable_on_exit(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns `fd`, which stays open and is neither replaced nor
    // closed while registered (it is closed when the AsyncFd drops, after deregistering).
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(io::Error::from)
}

/// Watches the peer of `shared`'s link (as a task of the current runtime) until this
/// end closes: fails the link when the peer process exits or `net` closes or carries
/// anything.
pub(crate) fn watch(shared: Arc<Shared>, net: Option<Arc<dyn Link>>, pidfd: Option<OwnedFd>) {
    let pidfd = pidfd.and_then(|fd| {
        readable_on_exit(fd).inspect_err(|e| tracing::debug!("cannot watch the peer's pidfd: {e}")).ok()
    });
    let mut closed_here = shared.closed_here_changes();
    tokio::spawn(async move {
        let exited = async {
            match &pidfd {
                Some(fd) => match fd.readable().await {
                    Ok(_) => "the peer process exited".to_string(),
                    Err(e) => {
                        tracing::debug!("watching the peer's pidfd: {e}");
                        std::future::pending().await
                    }
                },
                None => std::future::pending().await,
            }
        };
        let net_closed = async {
            match &net {
                Some(net) => match net.recv().await {
                    Ok(_) => "the peer sent a frame on the side channel of a shared-memory link".to_string(),
                    Err(e) => format!("side channel: {e}"),
                },
                None => std::future::pending().await,
            }
        };
        let why = tokio::select! {
            why = exited => why,
            why = net_closed => why,
            _ = closed_here.wait_for(|c| *c) => return,
        };
        if !*closed_here.borrow() {
            shared.fail(why);
        }
        if let Some(net) = &net {
            net.close();
        }
    });
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::transport::shm::link::heap_pair;
    use crate::transport::{mem, Frame, Header, LinkError};

    #[test]
    fn a_pidfd_of_a_live_process_is_not_readable_and_of_an_exited_one_is() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let fd = readable_on_exit(pidfd(std::process::id()).unwrap()).unwrap();
            assert!(tokio::time::timeout(Duration::from_millis(50), fd.readable()).await.is_err());
            let mut child = std::process::Command::new("true").spawn().unwrap();
            let fd = readable_on_exit(pidfd(child.id()).unwrap()).unwrap();
            let _exited = tokio::time::timeout(Duration::from_secs(10), fd.readable()).await.unwrap().unwrap();
            child.wait().unwrap();
        });
    }

    #[test]
    fn a_closed_side_channel_fails_the_link() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let (a, _b) = heap_pair(4096, 1 << 20);
            let (net_a, net_b) = mem::pair(1);
            watch(a.shared().clone(), Some(Arc::new(net_a)), None);
            drop(net_b);
            let r = tokio::time::timeout(Duration::from_secs(5), a.recv()).await.unwrap();
            assert!(matches!(r, Err(LinkError::Closed(ref why)) if why.contains("side channel")), "{r:?}");
        });
    }

    #[test]
    fn a_frame_on_the_side_channel_fails_the_link() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let (a, _b) = heap_pair(4096, 1 << 20);
            let (net_a, net_b) = mem::pair(1);
            watch(a.shared().clone(), Some(Arc::new(net_a)), None);
            net_b.send(Frame { header: Header::default(), payload: "x".into() }).await.unwrap();
            let r = tokio::time::timeout(Duration::from_secs(5), a.recv()).await.unwrap();
            assert!(r.is_err());
        });
    }
}
