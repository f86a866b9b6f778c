//! The workload limit a cache keeps while serving peers: so many uploads
//! at once (the next is refused, and the client tries another peer), and a
//! byte rate all uploads share (a token bucket the uploads wait on).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::msg::Load;

/// A token bucket in bytes: `take` spends, and says how long to wait
/// until the spending is covered.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// `rate` bytes/s, holding at most `burst` bytes of credit.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Spends `n` bytes at `now`; how long the sender waits first.
    pub fn take(&mut self, n: usize, now: Instant) -> Duration {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst) - n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

pub struct Workload {
    max_uploads: u32,
    limit_bps: u64,
    uploads: AtomicU32,
    sent: AtomicU64,
    refused: AtomicU64,
    bucket: Option<Mutex<Bucket>>,
}

/// One upload under way; the slot frees when it drops.
pub struct Slot(Arc<Workload>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.uploads.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Workload {
    /// `limit_bps` bytes/s for all uploads together, 0 for none.
    pub fn new(max_uploads: u32, limit_bps: u64) -> Arc<Self> {
        // A tenth of a second of credit: smooth, but not a packet at a time.
        let bucket = (limit_bps > 0).then(|| {
            let rate = limit_bps as f64;
            Mutex::new(Bucket::new(
                rate,
                (rate / 10.0).max(65536.0),
                Instant::now(),
            ))
        });
        Arc::new(Self {
            max_uploads,
            limit_bps,
            uploads: AtomicU32::new(0),
            sent: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            bucket,
        })
    }

    /// A slot for one more upload, or None at the limit (counted).
    pub fn start(self: &Arc<Self>) -> Option<Slot> {
        let taken = self
            .uploads
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_uploads).then_some(n + 1)
            });
        match taken {
            Ok(_) => Some(Slot(self.clone())),
            Err(_) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Waits until `n` more bytes may go out, and counts them.
    pub async fn pace(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
        let Some(b) = &self.bucket else { return };
        let wait = b.lock().expect("lock").take(n, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    pub fn load(&self) -> Load {
        Load {
            uploads: self.uploads.load(Ordering::Acquire),
            max_uploads: self.max_uploads,
            limit_bps: self.limit_bps,
            sent: self.sent.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_holds_the_rate_after_its_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000.0, 500.0, t0);
        assert_eq!(b.take(500, t0), Duration::ZERO);
        // 250 more bytes at once: a quarter second's debt.
        assert_eq!(b.take(250, t0), Duration::from_millis(250));
        // A second later the debt is paid and 750 more accrued, but credit
        // stops at the burst.
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(b.take(500, t1), Duration::ZERO);
        assert_eq!(b.take(100, t1), Duration::from_millis(100));
        // Over ten seconds of steady sending the bytes match the rate.
        let mut t = t1 + Duration::from_millis(100);
        let mut sent = 0;
        let end = t + Duration::from_secs(10);
        while t < end {
            t += b.take(1000, t);
            sent += 1000;
        }
        assert!((10_000..=11_000).contains(&sent), "{sent}");
    }

    #[test]
    fn uploads_past_the_limit_are_refused_and_counted() {
        let w = Workload::new(2, 0);
        let a = w.start().unwrap();
        let _b = w.start().unwrap();
        assert!(w.start().is_none());
        assert_eq!(w.load().uploads, 2);
        assert_eq!(w.load().refused, 1);
        drop(a);
        assert!(w.start().is_some());
    }
}
