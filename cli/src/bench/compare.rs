//! `phalanx bench --compare mpi,gloo`: our own harnesses on Open MPI and on torch's
//! Gloo backend, run in the same bench run as phalanx (after each group size), with the
//! same collectives, sizes, iteration counts and timing (median over the iterations of
//! the slowest rank), and the ratios phalanx busbw / anchor busbw.
//!
//! The harnesses are benches/anchors/mpi_bench.c and gloo_bench.py, built into this
//! binary and written to a temporary directory; nothing is installed here:
//! benches/install-anchors.sh installs Open MPI (Debian's openmpi-bin, libopenmpi-dev)
//! and torch. Open MPI runs twice per group size, over shared memory (`btl self,vader`)
//! and over TCP on 127.0.0.1 (`btl self,tcp`), with `mpi_yield_when_idle` so that its
//! waiting ranks do not spin (on 2 cores a spinning rank starves the others).

use std::fmt;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::collectives::Coll;
use super::BenchArgs;

const MPI_SOURCE: &str = include_str!("../../../benches/anchors/mpi_bench.c");
const GLOO_SOURCE: &str = include_str!("../../../benches/anchors/gloo_bench.py");
/// The longest one harness run (one group size, every collective and size) may take.
const HARNESS_LIMIT: Duration = Duration::from_secs(1800);

/// An anchor `--compare` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Anchor {
    /// Open MPI's mpirun: the systems `mpi-shm` and `mpi-tcp`.
    Mpi,
    /// torch.distributed's Gloo backend: the system `gloo`.
    Gloo,
}

impl FromStr for Anchor {
    type Err = String;
    fn from_str(s: &str) -> Result<Anchor, String> {
        match s.trim() {
            "mpi" | "openmpi" => Ok(Anchor::Mpi),
            "gloo" | "torch" => Ok(Anchor::Gloo),
            other => Err(format!("unknown anchor {other:?}: mpi or gloo")),
        }
    }
}

/// Why an anchor cannot run.
#[derive(Debug)]
pub(crate) enum CompareError {
    /// A tool is missing: what, and how to install it.
    Missing { anchor: &'static str, missing: String, install: &'static str },
    /// A harness failed to build or run.
    Harness { system: String, message: String },
}

impl fmt::Display for CompareError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CompareError::Missing { anchor, missing, install } => {
                write!(f, "--compare {anchor}: {missing}; install it with {install} (phalanx bench installs nothing)")
            }
            CompareError::Harness { system, message } => write!(f, "--compare, {system} harness: {message}"),
        }
    }
}

impl From<CompareError> for String {
    fn from(e: CompareError) -> String {
        e.to_string()
    }
}

/// One anchor measurement: a collective, group size and size on one system.
#[derive(Clone, Debug)]
pub(crate) struct AnchorRow {
    pub(crate) system: &'static str,
    pub(crate) coll: Coll,
    pub(crate) n: usize,
    pub(crate) size: usize,
    pub(crate) bytes: usize,
    pub(crate) median: f64,
    pub(crate) checked: bool,
    /// Why the system has no such collective (Gloo has no scan).
    pub(crate) unsupported: Option<String>,
}

impl AnchorRow {
    pub(crate) fn busbw(&self) -> f64 {
        self.bytes as f64 / self.median / 1e9 * self.coll.bus_factor(self.n)
    }

    /// Parses one JSON line of a harness.
    fn parse(system: &'static str, v: &Value) -> Result<AnchorRow, String> {
        let coll: Coll = v["collective"].as_str().ok_or("a line without a collective")?.parse()?;
        let num = |k: &str| v[k].as_f64().ok_or_else(|| format!("a line without {k}: {v}"));
        Ok(AnchorRow {
            system,
            coll,
            n: num("n")? as usize,
            size: num("size")? as usize,
            bytes: v["bytes"].as_u64().unwrap_or(0) as usize,
            median: v["median_us"].as_f64().map_or(f64::NAN, |us| us / 1e6),
            checked: v["checked"].as_bool().unwrap_or(false),
            unsupported: v["unsupported"].as_str().map(String::from),
        })
    }
}

/// The anchors, ready to run: the built MPI harness and the Python with torch.
pub(crate) struct Anchors {
    dir: TempDir,
    mpi: Option<(PathBuf, String)>,
    python: Option<(PathBuf, String)>,
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `name` in a directory of `PATH`, if there.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// The first line a command prints, if it runs and succeeds.
fn first_line(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().trim().to_string();
    if out.status.success() {
        Ok(text)
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(err.lines().last().unwrap_or("failed").trim().to_string())
    }
}

/// The default Python: target/anchors-venv (which benches/install-anchors.sh fills)
/// under the working directory or beside this executable's target directory, else
/// `python3` on PATH.
fn default_python() -> PathBuf {
    let venv = Path::new("anchors-venv").join("bin").join("python");
    let beside_exe = std::env::current_exe().ok().and_then(|e| Some(e.parent()?.parent()?.join(&venv)));
    [Some(Path::new("target").join(&venv)), beside_exe]
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("python3"))
}

impl Anchors {
    /// Finds the tools every anchor of `--compare` needs and builds the MPI harness,
    /// before anything is measured; a missing tool is a [`CompareError::Missing`].
    pub(crate) fn prepare(args: &BenchArgs) -> Result<Anchors, CompareError> {
        let dir = std::env::temp_dir().join(format!("phalanx-bench-anchors-{}", std::process::id()));
        let harness = |message: String| CompareError::Harness { system: "setup".into(), message };
        std::fs::create_dir_all(&dir).map_err(|e| harness(format!("creating {}: {e}", dir.display())))?;
        let mut anchors = Anchors { dir: TempDir(dir), mpi: None, python: None };
        if args.compare.contains(&Anchor::Mpi) {
            let tools: Vec<_> = ["mpicc", "mpirun"].into_iter().map(|t| (t, on_path(t))).collect();
            let missing: Vec<&str> = tools.iter().filter(|(_, p)| p.is_none()).map(|(t, _)| *t).collect();
            if !missing.is_empty() {
                return Err(CompareError::Missing {
                    anchor: "mpi",
                    missing: format!("Open MPI's {} not found on PATH", missing.join(" and ")),
                    install: "benches/install-anchors.sh mpi (apt-get install openmpi-bin libopenmpi-dev)",
                });
            }
            let version = first_line(Command::new("mpirun").arg("--version")).unwrap_or_default();
            let source = anchors.dir.0.join("mpi_bench.c");
            let exe = anchors.dir.0.join("mpi_bench");
            std::fs::write(&source, MPI_SOURCE).map_err(|e| harness(format!("writing {}: {e}", source.display())))?;
            first_line(Command::new("mpicc").arg("-O2").arg("-o").arg(&exe).arg(&source))
                .map_err(|e| CompareError::Harness { system: "mpi".into(), message: format!("mpicc: {e}") })?;
            anchors.mpi = Some((exe, version));
        }
        if args.compare.contains(&Anchor::Gloo) {
            let python = args.python.clone().unwrap_or_else(default_python);
            let probe = "import torch, torch.distributed as d; assert d.is_gloo_available(); print(torch.__version__)";
            let version =
                first_line(Command::new(&python).arg("-c").arg(probe)).map_err(|e| CompareError::Missing {
                    anchor: "gloo",
                    missing: format!("{} cannot run torch with the Gloo backend ({e})", python.display()),
                    install: "benches/install-anchors.sh gloo (pip install torch into target/anchors-venv), \
                          or name a Python that has torch with --python",
                })?;
            let script = anchors.dir.0.join("gloo_bench.py");
            std::fs::write(&script, GLOO_SOURCE).map_err(|e| harness(format!("writing {}: {e}", script.display())))?;
            anchors.python = Some((python, format!("torch {version}")));
        }
        Ok(anchors)
    }

    /// The systems and their versions, for the report.
    pub(crate) fn versions(&self) -> Vec<(&'static str, String)> {
        let mut v = Vec::new();
        if let Some((_, version)) = &self.mpi {
            v.push(("mpi", version.clone()));
        }
        if let Some((_, version)) = &self.python {
            v.push(("gloo", version.clone()));
        }
        v
    }

    /// Runs every anchor for a group of `n`: the same collectives, sizes and iterations.
    pub(crate) fn run(&self, args: &BenchArgs, n: usize) -> Result<Vec<AnchorRow>, CompareError> {
        let sizes = args.sizes.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        let common = [
            "--sizes".to_string(),
            sizes,
            "--iters".into(),
            args.iters.to_string(),
            "--warmup".into(),
            args.warmup.to_string(),
            "--collectives".into(),
            args.collectives.arg(),
        ];
        let mut rows = Vec::new();
        if let Some((exe, _)) = &self.mpi {
            for (system, btl) in [("mpi-shm", "self,vader"), ("mpi-tcp", "self,tcp")] {
                let mut cmd = Command::new("mpirun");
                cmd.args(["-np", &n.to_string(), "--oversubscribe", "--allow-run-as-root", "--bind-to", "none"])
                    .args(["--mca", "mpi_yield_when_idle", "1", "--mca", "pml", "ob1", "--mca", "btl", btl])
                    .args(["--mca", "btl_tcp_if_include", "lo", "--mca", "oob_tcp_if_include", "lo"])
                    .arg(exe)
                    .args(&common)
                    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
                    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
                rows.extend(run_harness(system, cmd, n)?);
            }
        }
        if let Some((python, _)) = &self.python {
            let mut cmd = Command::new(python);
            cmd.arg(self.dir.0.join("gloo_bench.py")).args(["--n", &n.to_string()]).args(&common);
            rows.extend(run_harness("gloo", cmd, n)?);
        }
        Ok(rows)
    }
}

/// Runs one harness (in a process group of its own, killed whole on a timeout) and
/// parses its JSON lines; a wrong result is reported in the row, not as an error.
fn run_harness(system: &'static str, mut cmd: Command, n: usize) -> Result<Vec<AnchorRow>, CompareError> {
    let fail = |message: String| CompareError::Harness { system: system.into(), message };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .map_err(|e| fail(format!("starting it: {e}")))?;
    let stdout = child.stdout.take().ok_or_else(|| fail("no stdout".into()))?;
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + HARNESS_LIMIT;
    let mut rows = Vec::new();
    let outcome = loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => match serde_json::from_str::<Value>(&line) {
                Ok(v) => match AnchorRow::parse(system, &v) {
                    Ok(row) => {
                        print_progress(&row);
                        rows.push(row);
                    }
                    Err(e) => break Err(e),
                },
                Err(_) => eprintln!("  {system}: {line}"),
            },
            Err(mpsc::RecvTimeoutError::Disconnected) => break Ok(()),
            Err(mpsc::RecvTimeoutError::Timeout) => break Err(format!("no end in {} s", HARNESS_LIMIT.as_secs())),
        }
    };
    if outcome.is_err() {
        // The harness and the ranks it started: its process group.
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).status();
    }
    let status = child.wait().map_err(|e| fail(e.to_string()))?;
    outcome.map_err(fail)?;
    if !status.success() {
        return Err(fail(format!("exited with {status} (n = {n})")));
    }
    Ok(rows)
}

fn print_progress(row: &AnchorRow) {
    match &row.unsupported {
        Some(why) => println!("  {} {} n={}: not measured ({why})", row.system, row.coll, row.n),
        None => println!(
            "  {} {} n={} {} B: {:.1} us, busbw {:.3} GB/s{}  (load {})",
            row.system,
            row.coll,
            row.n,
            row.bytes,
            row.median * 1e6,
            row.busbw(),
            if row.checked { "" } else { "  RESULT WRONG" },
            super::load_average()
        ),
    }
}
