//! Symbol and version gating of a loaded NCCL, apart from any real library: which
//! symbols must be there, which are optional [`Capabilities`], and the oldest
//! [`NcclVersion`] supported. The loader (feature `nccl`) feeds it the library's real
//! symbol table; the tests feed it fake ones.

use std::path::Path;

use super::error::DeviceError;

/// An NCCL version as `ncclGetVersion` reports it, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NcclVersion {
    /// Major version (2 for every NCCL phalanx can load).
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Patch version.
    pub patch: u32,
}

impl NcclVersion {
    /// Decodes `ncclGetVersion`'s integer: `major*10000 + minor*100 + patch` since NCCL
    /// 2.9, `major*1000 + minor*100 + patch` before. `None` for a negative code.
    pub fn from_code(code: i32) -> Option<NcclVersion> {
        let code = u32::try_from(code).ok()?;
        let (major, rest) = if code >= 20900 { (code / 10000, code % 10000) } else { (code / 1000, code % 1000) };
        Some(NcclVersion { major, minor: rest / 100, patch: rest % 100 })
    }
}

impl std::fmt::Display for NcclVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The oldest NCCL phalanx loads: 2.28.0. The ABI types come from cudarc's NCCL 2.28
/// bindings (`ncclConfig_t` of version 2.28), so an older library would read a config
/// struct newer than it knows.
pub const MIN_VERSION: NcclVersion = NcclVersion { major: 2, minor: 28, patch: 0 };

/// Symbols phalanx calls on every NCCL: a library without one of them is refused before
/// any call into it. `ncclGetVersion` comes first: without it the library is not NCCL.
pub const REQUIRED: [&str; 14] = [
    "ncclGetVersion",
    "ncclGetErrorString",
    "ncclGetUniqueId",
    "ncclCommInitRank",
    "ncclCommDestroy",
    "ncclAllReduce",
    "ncclReduceScatter",
    "ncclAllGather",
    "ncclBroadcast",
    "ncclReduce",
    "ncclSend",
    "ncclRecv",
    "ncclGroupStart",
    "ncclGroupEnd",
];

/// What the loaded NCCL can do beyond [`REQUIRED`]: each flag is whether its symbol is
/// there, so the membership protocol picks abort/revoke, shrink or a fresh init.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// `ncclCommInitRankConfig`: non-blocking creation (else a blocking `ncclCommInitRank`).
    pub init_config: bool,
    /// `ncclCommAbort`: a hung communicator can be torn down.
    pub abort: bool,
    /// `ncclCommGetAsyncError`: the asynchronous error state can be read.
    pub async_error: bool,
    /// `ncclCommShrink`: survivors form the next communicator without a new unique id.
    pub shrink: bool,
    /// `ncclCommRevoke`: pending work is revoked (the communicator stays usable for a shrink).
    pub revoke: bool,
    /// `ncclCommGrow`: joiners are added to a running communicator.
    pub grow: bool,
}

impl Capabilities {
    /// The optional symbols, each with the flag it sets.
    pub const SYMBOLS: [&str; 6] = [
        "ncclCommInitRankConfig",
        "ncclCommAbort",
        "ncclCommGetAsyncError",
        "ncclCommShrink",
        "ncclCommRevoke",
        "ncclCommGrow",
    ];

    /// Every capability on: what the CPU stand-in offers by default.
    pub const ALL: Capabilities =
        Capabilities { init_config: true, abort: true, async_error: true, shrink: true, revoke: true, grow: true };

    /// The flags of the symbols `has` finds.
    pub fn probe(has: &dyn Fn(&str) -> bool) -> Capabilities {
        Capabilities {
            init_config: has("ncclCommInitRankConfig"),
            abort: has("ncclCommAbort"),
            async_error: has("ncclCommGetAsyncError"),
            shrink: has("ncclCommShrink"),
            revoke: has("ncclCommRevoke"),
            grow: has("ncclCommGrow"),
        }
    }
}

/// What the gating found in an acceptable library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gated {
    /// The version it reports.
    pub version: NcclVersion,
    /// Its optional capabilities.
    pub capabilities: Capabilities,
}

/// Checks a library's symbols and version, in this order: without `ncclGetVersion` it
/// is not NCCL; `version` is called only once that symbol is known to be there; a
/// version below [`MIN_VERSION`] is refused; then every other [`REQUIRED`] symbol must
/// be there; the optional ones become [`Capabilities`].
///
/// `has` answers whether a symbol is exported; `version` calls `ncclGetVersion` and
/// returns its raw code.
pub fn check(
    path: &Path,
    has: &dyn Fn(&str) -> bool,
    version: impl FnOnce() -> Result<i32, DeviceError>,
) -> Result<Gated, DeviceError> {
    if !has("ncclGetVersion") {
        let missing = REQUIRED.iter().copied().filter(|s| !has(s)).collect();
        return Err(DeviceError::NotNccl { path: path.to_path_buf(), missing });
    }
    let code = version()?;
    let found = NcclVersion::from_code(code).ok_or_else(|| DeviceError::Call {
        call: "ncclGetVersion",
        code: 0,
        message: format!("reported the version code {code}, which is not a version"),
    })?;
    if found < MIN_VERSION {
        return Err(DeviceError::TooOld { path: path.to_path_buf(), found, minimum: MIN_VERSION });
    }
    let missing: Vec<&'static str> = REQUIRED.iter().copied().filter(|s| !has(s)).collect();
    if !missing.is_empty() {
        return Err(DeviceError::MissingSymbols { path: path.to_path_buf(), version: found, missing });
    }
    Ok(Gated { version: found, capabilities: Capabilities::probe(has) })
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::path::PathBuf;

    use super::*;

    /// A fake symbol table: the symbols it exports.
    fn table(symbols: &[&str]) -> impl Fn(&str) -> bool {
        let owned: Vec<String> = symbols.iter().map(|s| s.to_string()).collect();
        move |name| owned.iter().any(|s| s == name)
    }

    fn full_nccl(extra: &[&str]) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = REQUIRED.to_vec();
        for e in extra {
            let e: &'static str = Capabilities::SYMBOLS.iter().find(|s| *s == e).expect("optional symbol");
            v.push(e);
        }
        v
    }

    #[test]
    fn versions_decode_both_encodings() {
        assert_eq!(NcclVersion::from_code(22803), Some(NcclVersion { major: 2, minor: 28, patch: 3 }));
        assert_eq!(NcclVersion::from_code(22809).map(|v| v.to_string()), Some("2.28.9".into()));
        assert_eq!(NcclVersion::from_code(2804), Some(NcclVersion { major: 2, minor: 8, patch: 4 }));
        assert_eq!(NcclVersion::from_code(-1), None);
        assert!(NcclVersion::from_code(22700) < Some(MIN_VERSION));
        assert!(NcclVersion::from_code(23000) > Some(MIN_VERSION));
    }

    #[test]
    fn a_library_without_nccl_symbols_is_not_nccl_and_is_never_called() {
        let called = Cell::new(false);
        let path = PathBuf::from("/lib/x86_64-linux-gnu/libm.so.6");
        let e = check(&path, &table(&["cos", "sin"]), || {
            called.set(true);
            Ok(22803)
        })
        .unwrap_err();
        assert!(!called.get(), "ncclGetVersion must not be called when it is absent");
        let DeviceError::NotNccl { path: p, missing } = &e else { panic!("{e:?}") };
        assert_eq!(p, &path);
        assert_eq!(missing.len(), REQUIRED.len());
        let msg = e.to_string();
        assert!(msg.contains("libm.so.6") && msg.contains("is not an NCCL library"), "{msg}");
        assert!(msg.contains("PHALANX_NCCL_LIBRARY"), "says what to do: {msg}");
    }

    #[test]
    fn an_old_nccl_is_refused_with_the_version_found() {
        let path = PathBuf::from("/opt/nccl/libnccl.so.2");
        let e = check(&path, &table(&full_nccl(&[])), || Ok(22703)).unwrap_err();
        assert_eq!(
            e,
            DeviceError::TooOld {
                path: path.clone(),
                found: NcclVersion { major: 2, minor: 27, patch: 3 },
                minimum: MIN_VERSION
            }
        );
        let msg = e.to_string();
        assert!(msg.contains("2.27.3") && msg.contains("2.28.0") && msg.contains("/opt/nccl/libnccl.so.2"), "{msg}");
    }

    #[test]
    fn a_missing_required_symbol_is_named_with_the_version() {
        let mut symbols = full_nccl(&[]);
        symbols.retain(|s| *s != "ncclReduceScatter" && *s != "ncclSend");
        let e = check(Path::new("libnccl.so.2"), &table(&symbols), || Ok(22803)).unwrap_err();
        let DeviceError::MissingSymbols { version, missing, .. } = &e else { panic!("{e:?}") };
        assert_eq!(version.to_string(), "2.28.3");
        assert_eq!(missing, &vec!["ncclReduceScatter", "ncclSend"]);
    }

    #[test]
    fn a_bad_version_code_is_a_typed_error() {
        let e = check(Path::new("libnccl.so.2"), &table(&full_nccl(&[])), || Ok(-5)).unwrap_err();
        assert!(matches!(e, DeviceError::Call { call: "ncclGetVersion", .. }), "{e:?}");
    }

    #[test]
    fn optional_symbols_become_capabilities() {
        // The system NCCL of the lent GPU machine: 2.28.3 without revoke and grow.
        let system = full_nccl(&["ncclCommShrink", "ncclCommInitRankConfig", "ncclCommAbort", "ncclCommGetAsyncError"]);
        let g = check(Path::new("libnccl.so.2"), &table(&system), || Ok(22803)).unwrap();
        assert_eq!(g.version, NcclVersion { major: 2, minor: 28, patch: 3 });
        assert_eq!(
            g.capabilities,
            Capabilities {
                init_config: true,
                abort: true,
                async_error: true,
                shrink: true,
                revoke: false,
                grow: false
            }
        );
        // The bare minimum: every optional flag off.
        let g = check(Path::new("libnccl.so.2"), &table(&full_nccl(&[])), || Ok(22809)).unwrap();
        assert_eq!(g.capabilities, Capabilities::default());
        let all = full_nccl(&Capabilities::SYMBOLS);
        assert_eq!(check(Path::new("x"), &table(&all), || Ok(22900)).unwrap().capabilities, Capabilities::ALL);
    }
}
