//! The native pool's threads: plain OS threads, not the async runtime's blocking pool, so a
//! plugin call that never returns holds one thread and nothing else — the runtime still
//! shuts down (tokio waits for its own blocking tasks, forever if one hangs).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// Threads waiting for a job.
    idle: usize,
    /// Threads alive (idle, busy or stuck in a plugin).
    alive: usize,
}

/// Threads started on demand, reused, never more than the callers' permits allow (the
/// native engine bounds concurrency with semaphores before it submits).
#[derive(Clone, Default)]
pub struct Threads {
    inner: Arc<(Mutex<Queue>, Condvar)>,
}

impl Threads {
    /// Runs `job` on a pool thread: an idle one, or a new one when none is idle.
    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        let (lock, ready) = &*self.inner;
        let mut q = lock.lock().unwrap_or_else(|p| p.into_inner());
        q.jobs.push_back(Box::new(job));
        // Enough waiting threads for every queued job: wake one. (A woken thread leaves
        // `idle` itself, so jobs queued before it wakes count against the same threads.)
        if q.idle >= q.jobs.len() {
            ready.notify_one();
            return;
        }
        q.alive += 1;
        drop(q);
        let inner = self.inner.clone();
        let started = std::thread::Builder::new()
            .name("native-plugin".into())
            .spawn(move || work(&inner));
        if let Err(e) = started {
            let mut q = lock.lock().unwrap_or_else(|p| p.into_inner());
            q.alive -= 1;
            tracing::error!(error = %e, "could not start a native plugin thread");
            // The job stays queued; the next idle thread takes it.
        }
    }

    /// Threads alive.
    pub fn alive(&self) -> usize {
        self.inner.0.lock().unwrap_or_else(|p| p.into_inner()).alive
    }
}

fn work(inner: &(Mutex<Queue>, Condvar)) {
    let (lock, ready) = inner;
    loop {
        let job = {
            let mut q = lock.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(job) = q.jobs.pop_front() {
                    break job;
                }
                q.idle += 1;
                q = ready.wait(q).unwrap_or_else(|p| p.into_inner());
                q.idle -= 1;
            }
        };
        // The job catches its own panics (the plugin's glue, and the engine around it).
        job();
    }
}

impl std::fmt::Debug for Threads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Threads({} alive)", self.alive())
    }
}
