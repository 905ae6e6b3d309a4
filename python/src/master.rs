//! `phalanx.Master`: a master run on threads of this process.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use phalanx::membership::master::MasterConfig;
use phalanx::Master as CoreMaster;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::args::{quic_config, resolve};
use crate::errors::to_py;

/// A master: holds the group's view, admits joiners, removes lost peers and decides
/// every collective's outcome. Runs on threads of its own until closed (or collected).
///
/// Args:
///     listen: "HOST:PORT" to listen on (UDP, QUIC). Port 0 picks a free port; see `addr`.
///     secret: the cluster secret (str or bytes) that peers must prove; None accepts
///         everyone (tests and trusted networks only).
///     peer_timeout_ms: a peer silent for this long is removed (peers heartbeat every
///         150 ms by default).
///     max_pending: at most this many joiners wait for admission; more are refused.
///     standby: form no group of its own; take over the group of peers that lost their
///         master (start standbys, and a master restarted in place of a lost one, so).
///     fence: step down when most of the group goes silent at once, so that a master
///         cut off from the majority never decides beside a standby.
///     initial_peers: the first view forms once this many peers have joined, ranked by
///         peer id (so peers that join with ids 0..n get ranks 0..n).
#[pyclass(frozen, module = "phalanx")]
pub(crate) struct Master {
    inner: Mutex<Option<CoreMaster>>,
    addr: SocketAddr,
}

#[pymethods]
impl Master {
    #[new]
    #[pyo3(signature = (listen = "127.0.0.1:0", secret = None, peer_timeout_ms = 750, max_pending = 256, *, standby = false, fence = false, initial_peers = 1))]
    #[allow(clippy::too_many_arguments)] // Python keyword arguments, one per setting
    fn new(
        py: Python<'_>,
        listen: &str,
        secret: Option<&Bound<'_, PyAny>>,
        peer_timeout_ms: u64,
        max_pending: usize,
        standby: bool,
        fence: bool,
        initial_peers: usize,
    ) -> PyResult<Self> {
        let listen = resolve(listen, "listen")?;
        let quic = quic_config(secret)?;
        if peer_timeout_ms == 0 {
            return Err(PyValueError::new_err("peer_timeout_ms must be positive"));
        }
        if initial_peers == 0 {
            return Err(PyValueError::new_err("initial_peers must be at least 1"));
        }
        let config = MasterConfig {
            peer_timeout: Duration::from_millis(peer_timeout_ms),
            max_pending,
            standby,
            fence,
            initial_peers,
            ..MasterConfig::default()
        };
        let master = py.detach(move || CoreMaster::start(listen, quic, config)).map_err(|e| to_py(py, e))?;
        let addr = master.addr();
        Ok(Master { inner: Mutex::new(Some(master)), addr })
    }

    /// The address peers connect to, as "HOST:PORT" (with the port chosen when listening
    /// on port 0). A master listening on 0.0.0.0 reports 0.0.0.0: give peers a routable
    /// address of this host instead.
    #[getter]
    fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Stops the master. Its peers look for a master to rejoin (this address restarted,
    /// or a standby; see `Communicator.connect(rejoin_ms=...)`), and raise RemovedError
    /// if none takes over in time. Idempotent.
    fn close(&self, py: Python<'_>) {
        let master = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
        py.detach(move || drop(master));
    }

    /// Whether the master is running (not closed).
    #[getter]
    fn running(&self) -> bool {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.close(py);
        false
    }

    fn __repr__(&self) -> String {
        format!(
            "phalanx.Master(addr={:?}, running={})",
            self.addr.to_string(),
            if self.running() { "True" } else { "False" }
        )
    }
}
