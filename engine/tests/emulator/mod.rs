//! The CUDA kernels on the CPU: tools/cuda_emu's host emulator (shim.h runs each CUDA thread of a
//! block as a host thread, with barriers, shuffles, shared memory and mma.sync) compiled by g++
//! around the real `.cu` sources. This module builds those programs once per test binary and runs
//! them. A machine without g++ skips, unless `SMELT_REQUIRE_EMULATOR=1` (CI) makes that a failure.
//! Included with `mod emulator;` by the tests that need it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// The flags every emulator program is built with: alignment checked (a vector access through a
/// misaligned pointer aborts, as it faults on a GPU), no FMA contraction (the CPU reference
/// rounds products and sums apart).
pub const STRICT: &[&str] = &["-fsanitize=alignment", "-fno-sanitize-recover=all", "-ffp-contract=off"];

fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/cuda_emu")
}

fn work_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda_emu");
    std::fs::create_dir_all(&d).expect("create the emulator's build folder");
    d
}

fn compiler_present() -> bool {
    Command::new("g++").arg("--version").output().map(|o| o.status.success()).unwrap_or(false)
}

/// `None` (with a skip line) where there is no g++ and CI did not ask for the emulator.
fn available() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    let present = *PRESENT.get_or_init(compiler_present);
    if !present {
        assert!(
            std::env::var("SMELT_REQUIRE_EMULATOR").as_deref() != Ok("1"),
            "SMELT_REQUIRE_EMULATOR=1 but g++ is not on PATH: the CUDA kernels cannot run under the host emulator"
        );
        println!("skipping: no g++ on PATH for the CUDA host emulator (tools/cuda_emu)");
    }
    present
}

/// `tools/cuda_emu/<source>` built with `flags` (once per test binary), or None to skip.
pub fn program(source: &str, flags: &[&str]) -> Option<PathBuf> {
    if !available() {
        return None;
    }
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let key = format!("{source} {}", flags.join(" "));
    let built = BUILT.get_or_init(|| Mutex::new(HashMap::new()));
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.get(&key) {
        return Some(p.clone());
    }
    let exe = work_dir().join(format!("{}-{}", source.trim_end_matches(".cpp"), built.len()));
    let out = Command::new("g++")
        .args(["-std=c++20", "-O2", "-pthread", "-w"])
        .args(flags)
        .arg(source_dir().join(source))
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("run g++");
    assert!(
        out.status.success(),
        "g++ could not build tools/cuda_emu/{source} {flags:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    built.insert(key, exe.clone());
    Some(exe)
}

/// Runs a harness with `args` and asserts that every case passed (exit status 0: the harnesses
/// exit with their failure count), printing its report either way.
pub fn run_harness(source: &str, flags: &[&str], args: &[&str]) {
    let Some(exe) = program(source, flags) else { return };
    let out = Command::new(&exe).args(args).output().expect("run the harness");
    let report = String::from_utf8_lossy(&out.stdout);
    println!("{report}");
    assert!(
        out.status.success(),
        "tools/cuda_emu/{source} {args:?} failed ({}):\n{}\n{}",
        out.status,
        report.lines().filter(|l| l.contains("FAIL")).collect::<Vec<_>>().join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One buffer argument of a kernel: its raw little-endian bytes, or a null pointer.
pub enum Arg {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    F64(Vec<f64>),
    Null,
}

/// A buffer after the kernel ran.
pub struct Out(Vec<u8>);

impl Out {
    pub fn f32(&self) -> Vec<f32> {
        self.0.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    }
    pub fn bf16(&self) -> Vec<u16> {
        self.0.chunks_exact(2).map(|b| u16::from_le_bytes(b.try_into().unwrap())).collect()
    }
    pub fn f64(&self) -> Vec<f64> {
        self.0.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect()
    }
}

/// Where a kernel runs: at most `grid` blocks of 256 threads, each buffer `shifts[i]` elements
/// past a 64-byte aligned address (missing entries: aligned).
#[derive(Clone, Copy)]
pub struct Launch<'a> {
    pub grid: u32,
    pub shifts: &'a [usize],
}

/// Runs `kernel` of tools/cuda_emu/kernel_runner.cpp on `args` with `scalars` and returns every
/// buffer after it (None for a null pointer), or None to skip. Panics, naming the kernel, if it
/// wrote outside a buffer or the emulator failed.
pub fn run_kernel(kernel: &str, at: Launch, args: Vec<Arg>, scalars: &[String]) -> Option<Vec<Option<Out>>> {
    let exe = program("kernel_runner.cpp", STRICT)?;
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let dir = work_dir().join(format!("run-{}-{}-{kernel}", std::process::id(), RUNS.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir).expect("create a run folder");
    for (i, a) in args.iter().enumerate() {
        let bytes: Vec<u8> = match a {
            Arg::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Arg::Bf16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Arg::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Arg::Null => continue,
        };
        std::fs::write(dir.join(format!("{i}.bin")), bytes).expect("write a buffer");
    }
    let shifts: Vec<String> = at.shifts.iter().map(|s| s.to_string()).collect();
    let out = Command::new(&exe)
        .arg(&dir)
        .arg(kernel)
        .arg(at.grid.to_string())
        .arg(if shifts.is_empty() { "0".to_string() } else { shifts.join(",") })
        .args(scalars)
        .output()
        .expect("run kernel_runner");
    assert!(
        out.status.success(),
        "{kernel} under the emulator ({:?}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let outs = args
        .iter()
        .enumerate()
        .map(|(i, a)| match a {
            Arg::Null => None,
            _ => Some(Out(std::fs::read(dir.join(format!("{i}.out"))).expect("read a buffer back"))),
        })
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    Some(outs)
}

/// The scalar arguments as the runner reads them (`#[macro_use] mod emulator;`).
#[allow(unused_macros)]
macro_rules! scalars {
    ($($x:expr),* $(,)?) => { &[$($x.to_string()),*] };
}

/// bf16 bits of `x` rounded to nearest, ties to even, worked out from the two neighbouring bf16
/// values and their distances in f64 (independent of the kernels' bit trick). A value beyond the
/// largest finite bf16 by half a unit or more rounds to infinity; NaN stays a quiet NaN.
pub fn bf16_nearest(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    let toward_zero = (bits >> 16) as u16;
    let away = toward_zero + 1; // one unit further from zero (same sign bit)
    // the value of a bf16 pattern, the pattern past the largest finite one as if exponents went on
    let value = |h: u16| -> f64 {
        if h & 0x7fff == 0x7f80 {
            let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
            sign * 2f64.powi(128)
        } else {
            f32::from_bits((h as u32) << 16) as f64
        }
    };
    if x.is_infinite() || value(toward_zero) == x as f64 {
        return toward_zero;
    }
    let (d0, d1) = ((x as f64 - value(toward_zero)).abs(), (value(away) - x as f64).abs());
    if d0 < d1 || (d0 == d1 && toward_zero % 2 == 0) {
        toward_zero
    } else {
        away
    }
}

pub fn widen(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// The largest |got - want| over `1 + |want|`, and where.
pub fn worst(got: &[f32], want: &[f32]) -> (f64, usize) {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let mut w = (0.0, 0);
    for (i, (&g, &x)) in got.iter().zip(want).enumerate() {
        let e = (g as f64 - x as f64).abs() / (1.0 + (x as f64).abs());
        if !(e <= w.0) {
            w = (e, i);
        }
    }
    w
}
