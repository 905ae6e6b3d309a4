//! Joining and leaving a group, and what a communicator knows about it: connect
//! options, `phx_comm_connect*`, `phx_comm_leave`/`_free`, the getters,
//! `phx_comm_members` and `phx_comm_update_topology`.

use std::ffi::{c_char, c_int};
use std::time::Duration;

use phalanx::comm::ControlConfig;
use phalanx::comm::{ConnectOptions, DataTransport, RetryPolicy};
use phalanx::transport::shm::SharedMemory;
use phalanx::Communicator;

use crate::args::{c_str, free_handle, get_into, handle, handle_mut, out_ptr, secret, socket_addr, write_out};
use crate::status::{guard, invalid, Fail, PHX_ERR_BUFFER_TOO_SMALL, PHX_OK};

/// One peer's membership in a group. Created by `phx_comm_connect`, ended by
/// `phx_comm_leave` or `phx_comm_free`.
///
/// Not internally synchronised: it may be moved between threads, but calls on one
/// communicator must not overlap. Different communicators are independent.
pub struct phx_comm {
    pub(crate) inner: Communicator,
}

/// How to join a group (see `phx_comm_connect_with`). Fill it with
/// `phx_connect_options_init`, then change fields: zero and NULL fields mean defaults.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct phx_connect_options {
    /// `sizeof(phx_connect_options)`, set by `phx_connect_options_init`: lets later
    /// versions add fields without breaking callers built against this one.
    pub struct_size: usize,
    /// Where this peer accepts data links from the other peers, e.g. "0.0.0.0:0";
    /// NULL means "127.0.0.1:0" (loopback only, any port). Peers on other hosts need an
    /// address they can reach.
    pub bind_addr: *const c_char,
    /// The cluster secret (a NUL-terminated byte string, never empty); NULL means no
    /// secret, which accepts anyone and suits only tests and trusted networks.
    pub secret: *const c_char,
    /// Attempts of a collective that loses a peer, the first included: 0 or 1 returns
    /// `PHX_ERR_PEER_LOST`; more re-run it over the survivors once the master has
    /// published the new view.
    pub retry_attempts: u32,
    /// Heartbeat interval to the master in milliseconds; 0 means 150. Keep it well below
    /// the master's peer timeout.
    pub heartbeat_ms: u32,
    /// Give up joining (`PHX_ERR_JOIN_FAILED`) after this many milliseconds; 0 waits
    /// until admitted.
    pub join_timeout_ms: u32,
    /// With no message from the master for this many milliseconds the peer considers
    /// the master lost; 0 means 2000.
    pub master_timeout_ms: u32,
    /// Standby masters, tried in order after `master_addr` when it is lost (or cannot be
    /// reached at join): "HOST:PORT" entries separated by commas; NULL means none.
    pub standby_masters: *const c_char,
    /// When the master is lost, look this many milliseconds for a master to rejoin (the
    /// same address restarted, or a standby) before calls fail with `PHX_ERR_REMOVED`;
    /// 0 means 10000. Meanwhile calls fail with `PHX_ERR_ABORTED` (retryable).
    pub rejoin_ms: u32,
    /// What carries the data links to the other peers: `PHX_DATA_AUTO` (0, TCP+TLS),
    /// `PHX_DATA_QUIC`, `PHX_DATA_TCP` (TCP+TLS) or `PHX_DATA_TCP_PLAINTEXT` (no
    /// encryption: trusted networks only). The control connection is QUIC regardless.
    pub data_transport: c_int,
    /// Data links to peers on this host: `PHX_SHM_AUTO` (0, the default) moves them to
    /// shared memory when both ends allow it; `PHX_SHM_OFF` keeps them on the network.
    pub shared_memory: u32,
}

/// `phx_connect_options.data_transport`: TCP+TLS (QUIC when peers are reached through
/// an advertised address).
pub const PHX_DATA_AUTO: c_int = 0;
/// `phx_connect_options.data_transport`: QUIC, over the control connection's endpoint.
pub const PHX_DATA_QUIC: c_int = 1;
/// `phx_connect_options.data_transport`: TCP with TLS 1.3 and the cluster secret.
pub const PHX_DATA_TCP: c_int = 2;
/// `phx_connect_options.data_transport`: plaintext TCP, for trusted networks only (no
/// encryption, no integrity protection; the secret still keeps strangers out).
pub const PHX_DATA_TCP_PLAINTEXT: c_int = 3;

/// `phx_connect_options.shared_memory`: shared memory for peers on this host.
pub const PHX_SHM_AUTO: u32 = 0;
/// `phx_connect_options.shared_memory`: always the network.
pub const PHX_SHM_OFF: u32 = 1;

// ---------------------------------------------------------------------------------------
// Connecting.

/// Fills `*options` with the defaults (loopback bind address, no secret, no retries,
/// default timeouts) and sets its `struct_size`. Thread-safe.
///
/// # Safety
/// `options` is NULL or valid for a write of a `phx_connect_options`.
#[no_mangle]
pub unsafe extern "C" fn phx_connect_options_init(options: *mut phx_connect_options) -> c_int {
    guard(|| {
        let options = out_ptr(options, "options")?;
        let defaults = phx_connect_options {
            struct_size: std::mem::size_of::<phx_connect_options>(),
            bind_addr: std::ptr::null(),
            secret: std::ptr::null(),
            retry_attempts: 0,
            heartbeat_ms: 0,
            join_timeout_ms: 0,
            master_timeout_ms: 0,
            standby_masters: std::ptr::null(),
            rejoin_ms: 0,
            data_transport: PHX_DATA_AUTO,
            shared_memory: PHX_SHM_AUTO,
        };
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(options, defaults) };
        Ok(())
    })
}

/// Joins the group whose master is at `master_addr` ("host:port") and stores the new
/// communicator in `*out`. Blocks until admitted: the first peer at once, later ones
/// when the members next call `phx_comm_update_topology` (or until
/// `options->join_timeout_ms`).
///
/// Ownership: the caller owns `*out` (end it with `phx_comm_leave` or `phx_comm_free`);
/// `options` and its strings are only read during the call. Thread-safe.
///
/// # Safety
/// `master_addr` is a NUL-terminated string; `options` is NULL or points to a
/// `phx_connect_options` initialised by `phx_connect_options_init` whose non-NULL
/// strings are NUL-terminated; `out` is NULL or valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_connect_with(
    master_addr: *const c_char,
    options: *const phx_connect_options,
    out: *mut *mut phx_comm,
) -> c_int {
    guard(|| {
        let out = out_ptr(out, "out")?;
        // SAFETY: NULL or a readable struct (the caller's contract); it is Copy, read once.
        let o = *unsafe { handle(options, "options") }?;
        if o.struct_size != std::mem::size_of::<phx_connect_options>() {
            return Err(invalid(format!(
                "options.struct_size is {}, this library's phx_connect_options has {} bytes \
                 (call phx_connect_options_init)",
                o.struct_size,
                std::mem::size_of::<phx_connect_options>()
            )));
        }
        // SAFETY: a NUL-terminated string or NULL (the caller's contract).
        let master = socket_addr(unsafe { c_str(master_addr, "master_addr") }?, "master_addr")?;
        let mut opts = ConnectOptions::default();
        if !o.bind_addr.is_null() {
            // SAFETY: non-NULL and NUL-terminated (the caller's contract).
            opts.bind = socket_addr(unsafe { c_str(o.bind_addr, "options.bind_addr") }?, "options.bind_addr")?;
        }
        // SAFETY: a NUL-terminated string or NULL (the caller's contract).
        opts.quic = unsafe { secret(o.secret) }?;
        opts.data_transport = match o.data_transport {
            PHX_DATA_AUTO => DataTransport::Auto,
            PHX_DATA_QUIC => DataTransport::Quic,
            PHX_DATA_TCP => DataTransport::Tcp,
            PHX_DATA_TCP_PLAINTEXT => DataTransport::TcpPlaintext,
            other => return Err(invalid(format!("options.data_transport {other} is not a PHX_DATA_* value"))),
        };
        if o.retry_attempts > 1 {
            opts.retry = RetryPolicy::OnPeerLost { max_attempts: o.retry_attempts };
        }
        let defaults = ControlConfig::default();
        let ms = |v: u32, default: Duration| if v == 0 { default } else { Duration::from_millis(v.into()) };
        opts.control = ControlConfig {
            heartbeat_interval: ms(o.heartbeat_ms, defaults.heartbeat_interval),
            join_timeout: (o.join_timeout_ms > 0).then(|| Duration::from_millis(o.join_timeout_ms.into())),
            master_timeout: ms(o.master_timeout_ms, defaults.master_timeout),
            rejoin_within: match o.rejoin_ms {
                0 => defaults.rejoin_within,
                v => Some(Duration::from_millis(v.into())),
            },
        };
        opts.shared_memory = match o.shared_memory {
            PHX_SHM_AUTO => SharedMemory::Auto,
            PHX_SHM_OFF => SharedMemory::Off,
            other => return Err(invalid(format!("options.shared_memory is {other}, not PHX_SHM_AUTO or PHX_SHM_OFF"))),
        };
        if !o.standby_masters.is_null() {
            // SAFETY: non-NULL and NUL-terminated (the caller's contract).
            let list = unsafe { c_str(o.standby_masters, "options.standby_masters") }?;
            for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                opts.standby_masters.push(socket_addr(entry, "options.standby_masters")?);
            }
        }
        let comm = Communicator::connect(master, opts)?;
        let handle = Box::into_raw(Box::new(phx_comm { inner: comm }));
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, handle) };
        Ok(())
    })
}

/// `phx_comm_connect_with` with default options but the secret (NULL: none) and the
/// attempts of a collective that loses a peer (`retry_attempts` <= 1: no retry).
///
/// # Safety
/// `master_addr` and a non-NULL `secret_or_null` are NUL-terminated strings; `out` is
/// NULL or valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_connect(
    master_addr: *const c_char,
    secret_or_null: *const c_char,
    retry_attempts: c_int,
    out: *mut *mut phx_comm,
) -> c_int {
    let mut options = std::mem::MaybeUninit::<phx_connect_options>::uninit();
    // SAFETY: a valid, writable struct.
    let status = unsafe { phx_connect_options_init(options.as_mut_ptr()) };
    if status != PHX_OK {
        return status;
    }
    // SAFETY: initialised by `phx_connect_options_init`, which returned PHX_OK.
    let mut options = unsafe { options.assume_init() };
    options.secret = secret_or_null;
    options.retry_attempts = retry_attempts.max(0) as u32;
    // SAFETY: the caller's contract covers the strings and `out`; `options` is local.
    unsafe { phx_comm_connect_with(master_addr, &options, out) }
}

/// Leaves the group gracefully (the others see a new view without this peer at once)
/// and frees `comm`. NULL is a no-op. Blocks for at most a moment while the master is
/// told. Must not run concurrently with other calls on `comm`.
///
/// # Safety
/// `comm` is NULL or a live handle from `phx_comm_connect*`, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_leave(comm: *mut phx_comm) -> c_int {
    guard(|| {
        if !comm.is_null() {
            // SAFETY: a live handle made by `Box::into_raw`, given back for good.
            let comm = unsafe { Box::from_raw(comm) };
            comm.inner.leave();
        }
        Ok(())
    })
}

/// Frees `comm` without telling the master: the others see this peer as lost after the
/// master's peer timeout (prefer `phx_comm_leave`). NULL is a no-op. Started
/// all-reduces (`phx_pending`) stay valid and end with an error. Must not run
/// concurrently with other calls on `comm`.
///
/// # Safety
/// `comm` is NULL or a live handle from `phx_comm_connect*`, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_free(comm: *mut phx_comm) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { free_handle(comm) }
}

// ---------------------------------------------------------------------------------------
// Group information.

/// Writes one property of `comm` to `out`.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `out` is NULL or valid
/// for a write.
unsafe fn comm_get<T>(comm: *const phx_comm, out: *mut T, get: impl FnOnce(&Communicator) -> T) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { get_into(comm, "comm", out, |c: &phx_comm| get(&c.inner)) }
}

/// This peer's rank in the current view, `0..size`, in `*out`. Ranks change when the
/// view changes (after `phx_comm_update_topology` or a lost peer).
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `out` is NULL or valid
/// for a write.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_rank(comm: *const phx_comm, out: *mut usize) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { comm_get(comm, out, Communicator::rank) }
}

/// The number of members of the current view in `*out`.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `out` is NULL or valid
/// for a write.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_size(comm: *const phx_comm, out: *mut usize) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { comm_get(comm, out, Communicator::size) }
}

/// The epoch of the current view in `*out`; it grows with every view change.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `out` is NULL or valid
/// for a write.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_epoch(comm: *const phx_comm, out: *mut u64) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { comm_get(comm, out, Communicator::epoch) }
}

/// This peer's id (unique in the group, stable across views) in `*out`.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `out` is NULL or valid
/// for a write.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_peer_id(comm: *const phx_comm, out: *mut u64) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { comm_get(comm, out, Communicator::peer_id) }
}

/// How many peers wait to join in `*out`: when it is not 0, the members should call
/// `phx_comm_update_topology` to admit them.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `out` is NULL or valid
/// for a write.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_peers_pending(comm: *const phx_comm, out: *mut usize) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { comm_get(comm, out, Communicator::peers_pending) }
}

/// The ids of the current view's members, in rank order: writes them to `ids` (room for
/// `capacity`) and their number to `*count`. With too little room, only `*count` is
/// written and the status is `PHX_ERR_BUFFER_TOO_SMALL`. `ids` may be NULL when
/// `capacity` is 0 (to ask for the count).
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `ids` is NULL or valid
/// for writes of `capacity` `uint64_t`; `count` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_members(
    comm: *const phx_comm,
    ids: *mut u64,
    capacity: usize,
    count: *mut usize,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle (the caller's contract).
        let comm = &unsafe { handle(comm, "comm") }?.inner;
        let count = out_ptr(count, "count")?;
        let members = comm.members();
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(count, members.len()) };
        if members.len() > capacity {
            return Err(Fail {
                code: PHX_ERR_BUFFER_TOO_SMALL,
                message: format!("{} members, room for {capacity}", members.len()),
            });
        }
        if !members.is_empty() {
            let ids = out_ptr(ids, "ids")?;
            // SAFETY: non-NULL and valid for `capacity >= members.len()` writes (the
            // caller's contract); a fresh Vec never overlaps the caller's buffer.
            unsafe { std::ptr::copy_nonoverlapping(members.as_ptr(), ids, members.len()) };
        }
        Ok(())
    })
}

/// Synchronises with the other members and admits any waiting joiners. Every member
/// must call it; it returns when the master has settled the next view. A newly admitted
/// peer's first call returns at once, so a training loop can call it at the top of every
/// step. Blocks. Must not run concurrently with other calls on `comm`.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_update_topology(comm: *mut phx_comm) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        comm.update_topology()?;
        Ok(())
    })
}
