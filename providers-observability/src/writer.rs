//! Log lines gathered in memory and written to stderr in batches by a thread of their own.
//!
//! Writing each line with its own `write(2)` was the largest single cost of a logged
//! request; handing each line to a writer thread through a channel was worse (a wake-up and
//! two context switches per line). Here a line is copied into a shared buffer under an
//! uncontended lock, and the writer thread wakes every [`PERIOD`] or when the buffer passes
//! [`WAKE_AT`]. Nothing is dropped: past [`SPILL_AT`] the logging thread writes the buffer
//! itself, as an unbuffered logger would. Order is kept: whoever writes takes the buffer while
//! holding the output lock.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long a line may wait in memory.
const PERIOD: Duration = Duration::from_millis(50);
/// Wake the writer early once this much is waiting.
const WAKE_AT: usize = 256 * 1024;
/// Beyond this the logging thread writes the buffer itself.
const SPILL_AT: usize = 8 * 1024 * 1024;

struct Shared {
    lines: Mutex<Vec<u8>>,
    /// Where batches go: stderr, or memory in this crate's tests.
    sink: Option<Mutex<Vec<u8>>>,
    wake: Condvar,
    /// Held while writing, so batches leave in the order they were taken; the buffer is the
    /// batch being written, swapped with `lines` so that neither grows again from nothing.
    out: Mutex<Vec<u8>>,
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn write_out(&self) {
        let mut batch = lock(&self.out);
        std::mem::swap(&mut *batch, &mut *lock(&self.lines));
        if batch.is_empty() {
            return;
        }
        match &self.sink {
            // Nowhere to report a failed write to stderr; the lines are gone either way.
            None => {
                let _ = std::io::stderr().lock().write_all(&batch);
            }
            Some(memory) => lock(memory).extend_from_slice(&batch),
        }
        batch.clear();
        // A burst that spilled does not keep its megabytes.
        batch.shrink_to(WAKE_AT);
    }
}

/// The `MakeWriter` of the log layer.
#[derive(Clone)]
pub(crate) struct Batched(Arc<Shared>);

/// Stops the writer thread when dropped, after it has written every line.
pub(crate) struct Flusher {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Flusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Flusher")
    }
}

/// A batched stderr writer and the guard of its thread.
pub(crate) fn stderr() -> (Batched, Flusher) {
    start(None)
}

/// A batched writer into memory ([`Batched::taken`]), for tests.
#[cfg(test)]
pub(crate) fn memory() -> (Batched, Flusher) {
    start(Some(Mutex::new(Vec::new())))
}

fn start(sink: Option<Mutex<Vec<u8>>>) -> (Batched, Flusher) {
    let shared = Arc::new(Shared {
        lines: Mutex::new(Vec::with_capacity(64 * 1024)),
        sink,
        wake: Condvar::new(),
        out: Mutex::new(Vec::with_capacity(64 * 1024)),
        stop: AtomicBool::new(false),
    });
    let worker = shared.clone();
    let thread = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || {
            while !worker.stop.load(Ordering::Acquire) {
                let lines = lock(&worker.lines);
                let (lines, _) = worker
                    .wake
                    .wait_timeout(lines, PERIOD)
                    .unwrap_or_else(|p| p.into_inner());
                drop(lines);
                worker.write_out();
            }
            worker.write_out();
        })
        .ok();
    (Batched(shared.clone()), Flusher { shared, thread })
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        match self.thread.take() {
            Some(thread) => {
                let _ = thread.join();
            }
            None => self.shared.write_out(),
        }
    }
}

impl Batched {
    /// Queues `bytes` (whole lines) to be written.
    pub(crate) fn push(&self, bytes: &[u8]) {
        let mut lines = lock(&self.0.lines);
        lines.extend_from_slice(bytes);
        let waiting = lines.len();
        drop(lines);
        if waiting >= SPILL_AT {
            self.0.write_out();
        } else if waiting >= WAKE_AT {
            self.0.wake.notify_one();
        }
    }

    /// What a memory writer has written so far.
    #[cfg(test)]
    pub(crate) fn taken(&self) -> Vec<u8> {
        self.0
            .sink
            .as_ref()
            .map(|m| lock(m).clone())
            .unwrap_or_default()
    }
}

/// One line on its way into the buffer.
pub(crate) struct Line<'a>(&'a Batched);

impl Write for Line<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.push(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Batched {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Line(self)
    }
}
