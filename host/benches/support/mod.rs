//! What every in-process benchmark shares: the host binary's allocator, the timing loop, the
//! machine line, and writing a results file newest first.

use std::future::Future;
use std::time::{Duration, Instant};

/// The `provider-host` binary's allocator, for the host and every reference alike.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Nanoseconds per iteration of `f`: batches of ~100 ms after a warm-up, median batch mean.
#[allow(dead_code, reason = "not every benchmark times a loop")]
pub fn measure<F, Fut>(rt: &tokio::runtime::Runtime, mut f: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    rt.block_on(async {
        let mut n = 1u64;
        loop {
            let start = Instant::now();
            for _ in 0..n {
                f().await;
            }
            if start.elapsed() > Duration::from_millis(100) {
                break;
            }
            n *= 2;
        }
        let mut means = Vec::new();
        for _ in 0..7 {
            let start = Instant::now();
            for _ in 0..n {
                f().await;
            }
            means.push(start.elapsed().as_nanos() as f64 / n as f64);
        }
        means.sort_by(f64::total_cmp);
        means[means.len() / 2]
    })
}

/// `(cores, CPU model, UTC timestamp)` for a results entry.
pub fn machine() -> (usize, String, String) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    (cores, cpu, stamp)
}

/// Writes `entry` at the top of `bench/<file>` under `header`, keeping earlier entries.
pub fn record(file: &str, header: &str, entry: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../bench")
        .join(file);
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let old = old
        .split_once("\n## ")
        .map(|(_, rest)| format!("## {rest}"))
        .unwrap_or_default();
    std::fs::write(&path, format!("{header}{entry}\n{old}")).expect("writing the results file");
}
