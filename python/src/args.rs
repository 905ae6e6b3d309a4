//! Arguments shared by the classes: operator and strategy names, addresses, secrets.

use std::net::{SocketAddr, ToSocketAddrs};

use phalanx::state::SyncStrategy;
use phalanx::transport::quic::QuicConfig;
use phalanx::ReduceOp;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

pub(crate) fn parse_op(op: &str) -> PyResult<ReduceOp> {
    Ok(match op.to_ascii_lowercase().as_str() {
        "sum" => ReduceOp::Sum,
        "prod" | "product" => ReduceOp::Prod,
        "min" => ReduceOp::Min,
        "max" => ReduceOp::Max,
        "avg" | "mean" => ReduceOp::Avg,
        _ => {
            return Err(PyValueError::new_err(format!(
                "unknown op {op:?}: use \"sum\", \"prod\", \"min\", \"max\" or \"avg\""
            )))
        }
    })
}

pub(crate) fn parse_strategy(s: &str) -> PyResult<SyncStrategy> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "popular" | "enforce_popular" => SyncStrategy::EnforcePopular,
        "receive" | "receive_only" => SyncStrategy::ReceiveOnly,
        "send" | "send_only" => SyncStrategy::SendOnly,
        _ => {
            return Err(PyValueError::new_err(format!(
                "unknown strategy {s:?}: use \"popular\", \"receive\" or \"send\""
            )))
        }
    })
}

/// `"host:port"` to a socket address, preferring IPv4 (peers bind 127.0.0.1 by default).
pub(crate) fn resolve(addr: &str, what: &str) -> PyResult<SocketAddr> {
    let bad = |e: String| PyValueError::new_err(format!("{what} {addr:?} is not a HOST:PORT address: {e}"));
    let addrs: Vec<SocketAddr> = addr.to_socket_addrs().map_err(|e| bad(e.to_string()))?.collect();
    addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()).copied().ok_or_else(|| bad("it resolves to nothing".into()))
}

/// The QUIC settings for an optional secret given as `str` or `bytes`.
pub(crate) fn quic_config(secret: Option<&Bound<'_, PyAny>>) -> PyResult<QuicConfig> {
    let Some(secret) = secret else { return Ok(QuicConfig::default()) };
    let bytes: Vec<u8> = if let Ok(s) = secret.cast::<PyString>() {
        s.extract::<String>()?.into_bytes()
    } else if let Ok(b) = secret.cast::<PyBytes>() {
        b.as_bytes().to_vec()
    } else {
        return Err(PyTypeError::new_err("secret must be str, bytes or None"));
    };
    if bytes.is_empty() {
        return Err(PyValueError::new_err("secret must not be empty (use None for no secret)"));
    }
    Ok(QuicConfig::with_secret(bytes))
}
