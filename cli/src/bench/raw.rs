//! Step 1 of the bench, raw QUIC: one link between two `bench-peer` processes, one way
//! and both ways, the baseline the all-reduce figures are compared with.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use phalanx::transport::quic::{QuicConfig, QuicEndpoint, QuicLink};
use phalanx::transport::{Frame, Header, Link};
use serde_json::json;

use super::pool::Peers;
use super::{gbps, load_average, localhost, sched_secs, BenchArgs, PeerArgs};
use crate::emit;

/// Sends `payload` repeatedly until `stop`, then an empty end frame.
pub(super) async fn raw_send(link: Arc<QuicLink>, payload: Bytes, stop: Instant) -> Result<(), String> {
    let mut index = 0;
    while Instant::now() < stop {
        let header = Header { epoch: 1, seq: 1, call: 0, index };
        link.send(Frame { header, payload: payload.clone() }).await.map_err(|e| e.to_string())?;
        index += 1;
    }
    let header = Header { epoch: 1, seq: 1, call: 0, index: u64::MAX };
    link.send(Frame { header, payload: Bytes::new() }).await.map_err(|e| e.to_string())
}

/// Receives until the end frame; GB/s of the bytes that arrived after `counting`.
pub(super) async fn raw_recv(link: Arc<QuicLink>, counting: Instant) -> Result<f64, String> {
    let (mut first, mut last, mut bytes) = (None::<Instant>, None::<Instant>, 0usize);
    loop {
        let frame = link.recv().await.map_err(|e| e.to_string())?;
        if frame.header.index == u64::MAX {
            break;
        }
        let now = Instant::now();
        if now < counting {
            continue;
        }
        // The first counted frame marks the start: its bytes arrived before it.
        if first.is_none() {
            first = Some(now);
        } else {
            bytes += frame.payload.len();
            last = Some(now);
        }
    }
    match (first, last) {
        (Some(f), Some(l)) if l > f => Ok(gbps(bytes as f64, (l - f).as_secs_f64())),
        _ => Err("too few frames to measure; raise --raw-secs".into()),
    }
}

/// One end of the raw measurement (in a `bench-peer` process): the listener receives,
/// the connector sends, and with `both` each does both. Reports the GB/s it received
/// (if it did) and the CPU time of this process while it measured.
pub(super) async fn raw_end(args: &PeerArgs, config: QuicConfig) -> Result<(), String> {
    let ep = QuicEndpoint::bind(localhost(), config).map_err(|e| e.to_string())?;
    let link = match args.raw_connect {
        Some(addr) => ep.connect(addr, Bytes::new()).await.map_err(|e| e.to_string())?,
        None => {
            let addr = ep.local_addr().map_err(|e| e.to_string())?;
            emit(json!({ "event": "listening", "addr": addr.to_string() }));
            ep.accept().await.map_err(|e| e.to_string())?.0
        }
    };
    let link = Arc::new(link);
    let (sends, receives) = (args.raw_connect.is_some() || args.raw_both, args.raw_connect.is_none() || args.raw_both);
    let start = Instant::now();
    let (counting, stop) = (start + Duration::from_millis(500), start + Duration::from_secs_f64(0.5 + args.raw_secs));
    let payload = Bytes::from(vec![0xa5u8; args.raw_frame_kib << 10]);
    let sending = sends.then(|| tokio::spawn(raw_send(link.clone(), payload, stop)));
    let receiving = receives.then(|| tokio::spawn(raw_recv(link.clone(), counting)));
    tokio::time::sleep_until(counting.into()).await;
    let before = sched_secs();
    tokio::time::sleep_until(stop.into()).await;
    let after = sched_secs();
    if let Some(s) = sending {
        join(s.await)?;
    }
    let gbps = match receiving {
        Some(r) => Some(join(r.await)?),
        None => None,
    };
    emit(json!({
        "event": "raw", "gbps": gbps, "cpu_secs": after.0 - before.0, "runq_secs": after.1 - before.1,
        "secs": args.raw_secs,
    }));
    // Let the peer read its end frame before the link closes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    link.close();
    Ok(())
}

pub(super) fn join<T>(r: Result<Result<T, String>, tokio::task::JoinError>) -> Result<T, String> {
    r.map_err(|e| e.to_string()).and_then(|r| r)
}

/// One raw measurement: GB/s received by the listener, by the connector (`both`
/// only), the CPU cores both processes used meanwhile, and how many of their threads
/// waited for a CPU on average.
pub(super) fn raw_pair(args: &BenchArgs, secret: &str, both: bool) -> Result<(f64, Option<f64>, f64, f64), String> {
    let mut common = vec![
        format!("--raw-secs={}", args.raw_secs),
        format!("--raw-frame-kib={}", args.raw_frame_kib),
        // The baseline is one connection, whatever --connections-per-link says.
        "--connections-per-link=1".to_string(),
    ];
    common.extend(args.quic.to_args().into_iter().filter(|a| !a.starts_with("--connections-per-link")));
    if both {
        common.push("--raw-both".into());
    }
    let mut listener = Peers::spawn(1, &common, secret)?;
    let (_, v) = listener.next(Duration::from_secs(30))?;
    let addr = v["addr"].as_str().ok_or("the raw listener sent no address")?.to_string();
    common.push(format!("--raw-connect={addr}"));
    let mut connector = Peers::spawn(1, &common, secret)?;
    let timeout = Duration::from_secs_f64(args.raw_secs + 30.0);
    let (_, a) = listener.next(timeout)?;
    let (_, b) = connector.next(timeout)?;
    let sum = |k: &str| (a[k].as_f64().unwrap_or(0.0) + b[k].as_f64().unwrap_or(0.0)) / args.raw_secs;
    let received = a["gbps"].as_f64().ok_or("the raw listener measured nothing")?;
    Ok((received, b["gbps"].as_f64(), sum("cpu_secs"), sum("runq_secs")))
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Raw {
    pub(super) one_way: f64,
    pub(super) one_way_cores: f64,
    pub(super) one_way_runq: f64,
    /// Per direction, both directions at once: (a→b, b→a).
    pub(super) both: (f64, f64),
    pub(super) both_cores: f64,
    pub(super) both_runq: f64,
}

impl Raw {
    pub(super) fn both_mean(&self) -> f64 {
        (self.both.0 + self.both.1) / 2.0
    }
}

pub(super) fn measure_raw(args: &BenchArgs, secret: &str) -> Result<Raw, String> {
    let (one_way, _, one_way_cores, one_way_runq) = raw_pair(args, secret, false)?;
    let (ab, ba, both_cores, both_runq) = raw_pair(args, secret, true)?;
    let raw = Raw { one_way, one_way_cores, one_way_runq, both: (ab, ba.unwrap_or(0.0)), both_cores, both_runq };
    println!(
        "raw QUIC, one connection, {} KiB frames: one way {:.3} GB/s ({:.2} cores, {:.2} waiting); \
         both ways at once {:.3} + {:.3} GB/s ({:.2} cores, {:.2} waiting)  (load {})",
        args.raw_frame_kib,
        raw.one_way,
        raw.one_way_cores,
        raw.one_way_runq,
        raw.both.0,
        raw.both.1,
        raw.both_cores,
        raw.both_runq,
        load_average()
    );
    Ok(raw)
}
