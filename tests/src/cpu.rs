//! CPU time of the part of the process under test.
//!
//! The load generator and the server share one process, so process CPU time would charge the
//! simulated agents' TLS and key generation to the server. [`TrackedRuntime`] runs the server on
//! a tokio runtime of its own and records the thread ID of each of its threads (workers and
//! blocking pool), so [`TrackedRuntime::cpu_time`] is the server's CPU time alone, read from the
//! scheduler's per-thread accounting (`/proc/self/task/<tid>/schedstat`, nanoseconds on CPU).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;

/// A multi-thread tokio runtime whose threads' CPU time can be read.
#[derive(Debug)]
pub struct TrackedRuntime {
    /// `None` once dropped (taken to shut it down in the background).
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    threads: Arc<Mutex<Vec<i32>>>,
}

impl TrackedRuntime {
    /// A runtime with `workers` worker threads. Blocking-pool threads are kept for an hour
    /// when idle, so their CPU time is not lost with them.
    pub fn new(name: &str, workers: usize) -> anyhow::Result<Self> {
        let threads = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&threads);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers.max(1))
            .thread_name(name)
            .thread_keep_alive(Duration::from_secs(3600))
            .on_thread_start(move || {
                if let Some(tid) = current_tid() {
                    record.lock().unwrap_or_else(PoisonError::into_inner).push(tid);
                }
            })
            .enable_all()
            .build()
            .context("building the server runtime")?;
        Ok(Self { handle: runtime.handle().clone(), runtime: Some(runtime), threads })
    }

    /// A handle to spawn on the runtime.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Runs `future` on this runtime and waits for it from another runtime.
    pub async fn run<F>(&self, future: F) -> anyhow::Result<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(future).await.context("task on the server runtime")
    }

    /// CPU time of every thread this runtime started that is still alive (the pool keeps them).
    pub fn cpu_time(&self) -> Duration {
        let threads = self.threads.lock().unwrap_or_else(PoisonError::into_inner).clone();
        threads.iter().filter_map(|tid| thread_cpu(*tid)).sum()
    }

    /// Shuts the runtime down without blocking the calling runtime.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for TrackedRuntime {
    /// Shuts down in the background: dropping a runtime from inside another (an error path of
    /// a mode, say) must not panic.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// CPU time of the calling thread so far (`/proc/thread-self/schedstat`, nanoseconds).
///
/// The kernel brings a thread's total up to date at scheduler events (ticks, switches), so a
/// running thread reading its own would miss up to a tick of its current slice; yielding first
/// is such an event (it costs about a microsecond).
pub fn current_thread_cpu() -> Option<Duration> {
    std::thread::yield_now();
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let nanos: u64 = stat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
}

/// The calling thread's ID (`/proc/thread-self` links to `<pid>/task/<tid>`).
fn current_tid() -> Option<i32> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// CPU time of thread `tid` of this process (`None` when it has exited).
fn thread_cpu(tid: i32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    let nanos: u64 = stat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
}

/// CPU time of every thread of process `pid` (user + system; 1/100 s resolution).
pub fn process_cpu(pid: u32) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name (which may contain spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    match (ticks(11), ticks(12)) {
        // The kernel reports in USER_HZ, 100 on every Linux architecture Tessera runs on.
        (Some(user), Some(system)) => Ok(Duration::from_millis((user + system) * 10)),
        _ => anyhow::bail!("{path}: no utime/stime fields"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracked_runtime_counts_its_own_threads() {
        let tracked = TrackedRuntime::new("cpu-test", 1).unwrap();
        let before = tracked.cpu_time();
        tracked.handle().block_on(async {
            tokio::task::spawn_blocking(|| {
                let start = std::time::Instant::now();
                let mut x = 0u64;
                while start.elapsed() < Duration::from_millis(100) {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            })
            .await
            .unwrap();
        });
        assert!(tracked.cpu_time() >= before + Duration::from_millis(10), "{:?}", tracked.cpu_time());
        tracked.shutdown();
    }

    #[test]
    fn current_thread_cpu_counts_this_threads_work_only() {
        let before = current_thread_cpu().unwrap();
        // Another thread's work is not this thread's.
        std::thread::spawn(|| {
            let start = std::time::Instant::now();
            while start.elapsed() < Duration::from_millis(100) {
                std::hint::black_box(0u64);
            }
        })
        .join()
        .unwrap();
        let idle = current_thread_cpu().unwrap() - before;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(100) {
            std::hint::black_box(0u64);
        }
        let busy = current_thread_cpu().unwrap() - before - idle;
        assert!(idle < Duration::from_millis(50), "{idle:?}");
        assert!(busy > idle, "{busy:?} {idle:?}");
    }

    #[test]
    fn process_cpu_of_this_process_grows() {
        let pid = std::process::id();
        let before = process_cpu(pid).unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(200) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(process_cpu(pid).unwrap() > before);
    }
}
