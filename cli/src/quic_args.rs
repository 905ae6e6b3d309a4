//! The QUIC link options that `phalanx worker`, `phalanx bench` and its `bench-peer`
//! processes share: connections per link, congestion controller, window sizing.

use phalanx::transport::quic::{Congestion, QuicConfig};

/// QUIC settings of the data links (see `QuicConfig`).
#[derive(clap::Args, Clone, Debug)]
pub struct QuicArgs {
    /// QUIC connections per data link: a number from 1 to 64, or `auto` to choose from the
    /// round trip measured at setup and the controller (1 on loopback and a LAN; on a WAN
    /// 1 per 2 Gbit/s of --window-rate-mbit with BBR, up to 4 with cubic or newreno).
    #[arg(long, default_value = "auto", value_parser = parse_connections)]
    pub connections_per_link: Connections,
    /// Congestion controller of the QUIC connections: bbr, cubic or newreno.
    #[arg(long, default_value_t = Congestion::Bbr)]
    pub congestion: Congestion,
    /// The rate in Mbit/s each link's windows are sized for, with the round trip
    /// measured at setup (`QuicConfig::window_rate_bps`); 0 gives every connection the
    /// ceiling (`--window-mib`) as it is.
    #[arg(long, default_value_t = 1000)]
    pub window_rate_mbit: u64,
    /// Ceiling of each connection's stream, receive and send windows, in MiB.
    #[arg(long, default_value_t = 32)]
    pub window_mib: u64,
}

/// `--connections-per-link`: a count, or automatic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connections(pub Option<usize>);

impl std::fmt::Display for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(n) => write!(f, "{n}"),
            None => f.write_str("auto"),
        }
    }
}

fn parse_connections(s: &str) -> Result<Connections, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(Connections(None));
    }
    match s.parse::<usize>() {
        Ok(n) if (1..=phalanx::transport::quic::MAX_STRIPES).contains(&n) => Ok(Connections(Some(n))),
        _ => Err(format!("{s:?} is not `auto` or a count from 1 to {}", phalanx::transport::quic::MAX_STRIPES)),
    }
}

impl QuicArgs {
    /// `base` (secret and timeouts) with these link settings.
    pub fn apply(&self, base: QuicConfig) -> Result<QuicConfig, String> {
        if self.window_mib == 0 {
            return Err("--window-mib must be positive".into());
        }
        let window = self.window_mib.checked_mul(1 << 20).ok_or("--window-mib is too large")?;
        Ok(QuicConfig {
            connections_per_link: self.connections_per_link.0,
            congestion: self.congestion,
            window_rate_bps: (self.window_rate_mbit > 0).then(|| self.window_rate_mbit.saturating_mul(1_000_000)),
            stream_receive_window: window,
            receive_window: window,
            send_window: window,
            ..base
        })
    }

    /// The same options as arguments, for a child process.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            format!("--connections-per-link={}", self.connections_per_link),
            format!("--congestion={}", self.congestion),
            format!("--window-rate-mbit={}", self.window_rate_mbit),
            format!("--window-mib={}", self.window_mib),
        ]
    }

    /// In words, for a report.
    pub fn describe(&self) -> String {
        let windows = match self.window_rate_mbit {
            0 => format!("fixed {} MiB windows", self.window_mib),
            r => format!("windows sized for {r} Mbit/s x RTT (up to {} MiB)", self.window_mib),
        };
        format!("{} connection(s) per link, {}, {windows}", self.connections_per_link, self.congestion)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        quic: QuicArgs,
    }

    #[test]
    fn defaults_are_the_library_defaults_and_round_trip_through_arguments() {
        let args = Cli::parse_from(["x"]).quic;
        let lib = QuicConfig::default();
        let cfg = args.apply(QuicConfig::default()).unwrap();
        assert_eq!(cfg.connections_per_link, lib.connections_per_link);
        assert_eq!(cfg.congestion, lib.congestion);
        assert_eq!(cfg.window_rate_bps, lib.window_rate_bps);
        assert_eq!((cfg.receive_window, cfg.send_window), (lib.receive_window, lib.send_window));
        let again = Cli::parse_from(std::iter::once("x".to_string()).chain(args.to_args())).quic;
        assert_eq!(again.to_args(), args.to_args());
    }

    #[test]
    fn explicit_settings_are_parsed() {
        let args = Cli::parse_from([
            "x",
            "--connections-per-link=3",
            "--congestion=cubic",
            "--window-rate-mbit=0",
            "--window-mib=8",
        ])
        .quic;
        let cfg = args.apply(QuicConfig::default()).unwrap();
        assert_eq!(cfg.connections_per_link, Some(3));
        assert_eq!(cfg.congestion, Congestion::Cubic);
        assert_eq!(cfg.window_rate_bps, None);
        assert_eq!(cfg.stream_receive_window, 8 << 20);
        assert!(Cli::try_parse_from(["x", "--connections-per-link=0"]).is_err());
        assert!(Cli::try_parse_from(["x", "--congestion=vegas"]).is_err());
    }
}
