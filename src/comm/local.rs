//! In-process groups: an embedded master and `n` peers over the in-memory network, so
//! that local groups run the production protocol (one commit, one restore, one retry).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::peer::AsyncPeer;
use super::{Communicator, Config};
use crate::error::{Error, Result};
use crate::membership::client::ControlConfig;
use crate::membership::master::MasterConfig;
use crate::membership::peer::PeerConfig;
use crate::membership::server::MasterServer;
use crate::transport::endpoint::Endpoint;
use crate::transport::memnet::MemNetwork;

/// What a local group shares: its master, kept running while any rank is alive.
pub(crate) struct LocalGroup {
    _master: MasterServer,
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Timing of an in-process group. A rank that drops its communicator closes its
/// connections, which the master sees at once; heartbeats only guard against a rank
/// whose runtime stalls, so they can be slow and the timeouts generous.
const HEARTBEAT: Duration = Duration::from_millis(500);
const PEER_TIMEOUT: Duration = Duration::from_secs(20);

pub(crate) fn group(n: usize, config: Config) -> Result<Vec<Communicator>> {
    if n == 0 {
        return Err(Error::InvalidArgument("a group needs at least one rank".into()));
    }
    if n > u16::MAX as usize - 100 {
        return Err(Error::InvalidArgument(format!("a local group of {n} ranks is too large")));
    }
    let runtime = Arc::new(super::runtime("phalanx-local", 2)?);
    let net = MemNetwork::new(config.link_capacity);
    let master_config = MasterConfig { initial_peers: n, peer_timeout: PEER_TIMEOUT, ..MasterConfig::default() };
    let master = {
        let _guard = runtime.enter();
        MasterServer::spawn(net.endpoint(addr(1)), master_config)
    };
    let options = super::ConnectOptions {
        tuning: config.tuning,
        control: ControlConfig {
            heartbeat_interval: HEARTBEAT,
            join_timeout: None,
            master_timeout: PEER_TIMEOUT * 2,
            rejoin_within: None, // the master lives in this process: it is never lost alone
        },
        liveness: false, // an in-memory group: its addresses are only names
        ..super::ConnectOptions::default()
    };
    // A lost rank ends a local group: its ranks are threads of one program.
    let peer_config = PeerConfig { closed: true, ..PeerConfig::default() };
    let peers = runtime.block_on(async {
        let joins: Vec<_> = (0..n)
            .map(|rank| {
                let endpoint = net.endpoint(addr(100 + rank as u16)) as Arc<dyn Endpoint>;
                let options = super::ConnectOptions { peer_id: Some(rank as u64), ..options.clone() };
                tokio::spawn(AsyncPeer::connect_as(endpoint, addr(1), options, peer_config))
            })
            .collect();
        let mut peers = Vec::with_capacity(n);
        for join in joins {
            let peer = join.await.map_err(|e| Error::JoinFailed { reason: format!("rank task failed: {e}") })??;
            peers.push(peer);
        }
        Ok::<_, Error>(peers)
    })?;
    let shared = Arc::new(LocalGroup { _master: master });
    Ok(peers.into_iter().map(|peer| Communicator::new(runtime.clone(), peer, Some(shared.clone()))).collect())
}
