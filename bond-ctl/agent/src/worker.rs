//! A thread that runs until its handle is dropped: the drop raises the
//! thread's stop flag and joins it. The playout, the feedback corrector and
//! the lab's link events each run on one.

use std::{
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

/// Locks what a worker shares with its owner. A panic on the other side
/// leaves the data as it was, which is still the best there is.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Worker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Runs `f` on a thread named `name`; `f` returns once the flag it is
    /// given is set.
    pub fn spawn(
        name: &str,
        f: impl FnOnce(&AtomicBool) + Send + 'static,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || f(&flag))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn dropping_the_worker_stops_and_joins_its_thread() {
        let laps = Arc::new(AtomicU32::new(0));
        let l = laps.clone();
        let w = Worker::spawn("test", move |stop| {
            while !stop.load(Ordering::Relaxed) {
                l.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        })
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        drop(w);
        let after = laps.load(Ordering::Relaxed);
        assert!(after > 0, "it ran");
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(
            laps.load(Ordering::Relaxed),
            after,
            "and stopped with the drop"
        );
    }
}
