//! Retries for transient broker errors: exponential backoff with full jitter
//! (AWS's "full jitter": sleep a uniform random time in `[0, min(max,
//! initial * 2^attempt)]`), behind a circuit breaker that stops hammering a
//! broker that keeps failing.
//!
//! ```text
//!   Closed ──failures >= threshold──> Open ──cool-down passed──> HalfOpen
//!     ^                                 ^                          │ one trial call
//!     └──────────── success ────────────┼──────────────────────────┤
//!                                       └──────── failure ─────────┘
//! ```
//!
//! Both are plain state machines over `tokio::time::Instant`, so tests run
//! them on a paused clock.

use std::time::Duration;

use tokio::time::Instant;

/// Exponential backoff with full jitter.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9_7f4a_7c15, |d| d.as_nanos() as u64);
        Self::with_seed(initial, max, seed)
    }

    /// A deterministic sequence (tests).
    pub fn with_seed(initial: Duration, max: Duration, seed: u64) -> Self {
        Self { initial: initial.max(Duration::from_millis(1)), max: max.max(initial), attempt: 0, rng: seed | 1 }
    }

    /// From the spec's `deadLetter.backoff`.
    pub fn from_spec(b: &sluice_crds::Backoff) -> Self {
        Self::new(b.initial.as_std(), b.max.as_std())
    }

    /// The upper bound of the next delay: `min(max, initial * 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay, uniform in `[0, ceiling]`; then the ceiling doubles.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        // xorshift64*: plenty for spreading retries.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let nanos = ceiling.as_nanos().min(u64::MAX as u128) as u64;
        Duration::from_nanos(if nanos == 0 { 0 } else { r % (nanos + 1) })
    }

    /// Sleeps the next delay.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// After a success: start again from `initial`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    /// Calls are refused until the instant passes.
    Open {
        until: Instant,
    },
    /// One trial call is allowed; its outcome closes or reopens the breaker.
    HalfOpen,
}

/// Opens after `threshold` consecutive failures; stays open for `cool_down`.
#[derive(Clone, Debug)]
pub struct CircuitBreaker {
    threshold: u32,
    cool_down: Duration,
    failures: u32,
    state: BreakerState,
}

impl CircuitBreaker {
    pub fn new(threshold: u32, cool_down: Duration) -> Self {
        Self { threshold: threshold.max(1), cool_down, failures: 0, state: BreakerState::Closed }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether a call may go out now; an open breaker whose cool-down has
    /// passed lets one trial through (half-open).
    pub fn allow(&mut self) -> bool {
        match self.state {
            BreakerState::Closed | BreakerState::HalfOpen => true,
            BreakerState::Open { until } if Instant::now() >= until => {
                self.state = BreakerState::HalfOpen;
                true
            }
            BreakerState::Open { .. } => false,
        }
    }

    /// How long until a call may go out.
    pub fn wait_time(&self) -> Duration {
        match self.state {
            BreakerState::Open { until } => until.saturating_duration_since(Instant::now()),
            _ => Duration::ZERO,
        }
    }

    pub fn record_success(&mut self) {
        if self.state != BreakerState::Closed {
            tracing::info!("circuit breaker closed: the broker answers again");
        }
        self.failures = 0;
        self.state = BreakerState::Closed;
    }

    pub fn record_failure(&mut self) {
        self.failures = self.failures.saturating_add(1);
        let reopen = self.state == BreakerState::HalfOpen;
        if reopen || (self.state == BreakerState::Closed && self.failures >= self.threshold) {
            tracing::warn!(failures = self.failures, cool_down = ?self.cool_down,
                "circuit breaker open: no calls until the cool-down passes");
            self.state = BreakerState::Open { until: Instant::now() + self.cool_down };
        }
    }

    pub fn is_closed(&self) -> bool {
        self.state == BreakerState::Closed
    }
}

/// Runs `call` until it succeeds or `attempts` calls failed, sleeping a
/// jittered backoff between them and waiting out an open breaker (which
/// does not count as an attempt). Returns the last error.
pub async fn retry<T, E, F, Fut>(
    attempts: u32,
    backoff: &mut Backoff,
    breaker: &mut CircuitBreaker,
    mut call: F,
) -> Result<T, E>
where
    F: FnMut(u32) -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut attempt = 0;
    loop {
        while !breaker.allow() {
            tokio::time::sleep(breaker.wait_time().max(Duration::from_millis(1))).await;
        }
        attempt += 1;
        match call(attempt).await {
            Ok(v) => {
                breaker.record_success();
                backoff.reset();
                return Ok(v);
            }
            Err(e) => {
                breaker.record_failure();
                if attempt >= attempts.max(1) {
                    return Err(e);
                }
                let delay = backoff.next_delay();
                tracing::warn!(attempt, error = %e, ?delay, "transient error; retrying after a backoff");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };

    use super::*;

    #[test]
    fn delays_stay_under_a_doubling_ceiling_capped_at_max() {
        let mut b = Backoff::with_seed(Duration::from_millis(100), Duration::from_secs(2), 42);
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            let c = b.ceiling();
            let d = b.next_delay();
            assert!(d <= c, "{d:?} > {c:?}");
            ceilings.push(c.as_millis());
        }
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut b = Backoff::with_seed(Duration::from_secs(10), Duration::from_secs(10), 7);
        let delays: std::collections::BTreeSet<u128> = (0..50).map(|_| b.next_delay().as_millis()).collect();
        assert!(delays.len() > 40, "full jitter gives distinct delays: {delays:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_opens_after_threshold_and_half_opens_after_cool_down() {
        let mut cb = CircuitBreaker::new(3, Duration::from_secs(5));
        for _ in 0..2 {
            assert!(cb.allow());
            cb.record_failure();
        }
        assert!(cb.is_closed());
        cb.record_failure();
        assert!(matches!(cb.state(), BreakerState::Open { .. }));
        assert!(!cb.allow());
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(!cb.allow());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(cb.allow());
        assert_eq!(cb.state(), BreakerState::HalfOpen);
        cb.record_failure();
        assert!(matches!(cb.state(), BreakerState::Open { .. }), "a failed trial reopens");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(cb.allow());
        cb.record_success();
        assert!(cb.is_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn retry_backs_off_waits_out_the_breaker_and_succeeds() {
        let calls = Arc::new(AtomicU32::new(0));
        let mut backoff = Backoff::with_seed(Duration::from_millis(100), Duration::from_secs(1), 3);
        let mut breaker = CircuitBreaker::new(2, Duration::from_secs(30));
        let start = Instant::now();
        let c = calls.clone();
        let r: Result<u32, String> = retry(10, &mut backoff, &mut breaker, |attempt| {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                if attempt < 4 { Err(format!("down {attempt}")) } else { Ok(attempt) }
            }
        })
        .await;
        assert_eq!(r, Ok(4));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert!(breaker.is_closed());
        // Two failures opened the breaker for 30 s (virtual time).
        assert!(start.elapsed() >= Duration::from_secs(30), "{:?}", start.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn retry_gives_up_after_the_attempts() {
        let mut backoff = Backoff::with_seed(Duration::from_millis(10), Duration::from_millis(50), 1);
        let mut breaker = CircuitBreaker::new(100, Duration::from_secs(1));
        let r: Result<(), String> =
            retry(3, &mut backoff, &mut breaker, |a| async move { Err(format!("fail {a}")) }).await;
        assert_eq!(r, Err("fail 3".to_string()));
        assert_eq!(backoff.attempts(), 2, "two sleeps between three attempts");
    }
}

/// A sink that retries transient errors (broker errors, I/O) for ever with
/// jittered backoff behind a circuit breaker, and reports the sink's health:
/// `healthy` turns false at the first failure (so `/readyz` says not ready
/// while the broker is unreachable) and true again after the next success.
/// While it retries, the sink stage does not take more work: backpressure up
/// to the source, never a message given up because a broker was down.
///
/// Records the broker refused for what they are (`SinkError::Rejected`: too
/// large, invalid) are a different matter: they would stall every message
/// behind them for ever. Those alone are sent again, at most `max_retries`
/// times (`deadLetter.maxRetries`), then returned as `Rejected` for the
/// runtime to dead-letter. Permanent errors (configuration) return at once.
pub struct RetryingSink {
    inner: Box<dyn crate::sink::Sink>,
    backoff: Backoff,
    breaker: CircuitBreaker,
    healthy: std::sync::Arc<std::sync::atomic::AtomicBool>,
    max_retries: u32,
}

/// Consecutive failures that open the breaker, and how long it stays open.
pub const BREAKER_THRESHOLD: u32 = 5;
pub const BREAKER_COOL_DOWN: Duration = Duration::from_secs(5);

impl RetryingSink {
    pub fn new(
        inner: Box<dyn crate::sink::Sink>,
        backoff: Backoff,
        healthy: std::sync::Arc<std::sync::atomic::AtomicBool>,
        max_retries: u32,
    ) -> Self {
        Self {
            inner,
            backoff,
            breaker: CircuitBreaker::new(BREAKER_THRESHOLD, BREAKER_COOL_DOWN),
            healthy,
            max_retries,
        }
    }

    fn transient(e: &crate::sink::SinkError) -> bool {
        matches!(e, crate::sink::SinkError::Broker { .. } | crate::sink::SinkError::Io { .. })
    }

    fn reachable(&mut self) {
        use std::sync::atomic::Ordering;
        self.breaker.record_success();
        if !self.healthy.swap(true, Ordering::Relaxed) {
            tracing::info!(sink = self.inner.kind(), "sink reachable again; ready");
        }
    }

    async fn write_retrying(&mut self, batch: &[crate::message::Message]) -> Result<(), crate::sink::SinkError> {
        use crate::sink::{Rejection, SinkError};
        let Some((kind, target, mut refused)) = self.write_until_answered(batch).await? else {
            return Ok(());
        };
        let mut attempts = 1;
        while attempts <= self.max_retries && !refused.is_empty() {
            attempts += 1;
            let delay = self.backoff.next_delay();
            tracing::warn!(sink = kind, records = refused.len(), attempt = attempts, error = %refused[0].error, ?delay,
                "the sink refused records; sending those again, one by one, after a backoff");
            tokio::time::sleep(delay).await;
            // One by one: a record refused only for sharing a broker batch
            // with a bad one goes through on its own.
            let mut still = Vec::new();
            for r in refused {
                if let Some((_, _, again)) = self.write_until_answered(std::slice::from_ref(&batch[r.index])).await? {
                    let error = again.into_iter().next().map_or(r.error, |a| a.error);
                    still.push(Rejection { index: r.index, error });
                }
            }
            refused = still;
        }
        self.backoff.reset();
        if refused.is_empty() { Ok(()) } else { Err(SinkError::Rejected { kind, target, rejected: refused, attempts }) }
    }

    /// Writes until the sink answers: `None` when all was delivered, the
    /// refused records otherwise. Transient errors are retried for ever;
    /// permanent ones return.
    async fn write_until_answered(
        &mut self,
        batch: &[crate::message::Message],
    ) -> Result<Option<(&'static str, String, Vec<crate::sink::Rejection>)>, crate::sink::SinkError> {
        use std::sync::atomic::Ordering;

        use crate::sink::SinkError;
        loop {
            while !self.breaker.allow() {
                tokio::time::sleep(self.breaker.wait_time().max(Duration::from_millis(1))).await;
            }
            match self.inner.write(batch).await {
                Ok(()) => {
                    self.reachable();
                    self.backoff.reset();
                    return Ok(None);
                }
                // The broker answered: it is reachable.
                Err(SinkError::Rejected { kind, target, rejected, .. }) => {
                    self.reachable();
                    return Ok(Some((kind, target, rejected)));
                }
                Err(e) if Self::transient(&e) => {
                    self.breaker.record_failure();
                    self.healthy.store(false, Ordering::Relaxed);
                    let delay = self.backoff.next_delay();
                    tracing::warn!(sink = self.inner.kind(), attempt = self.backoff.attempts(), error = %e, ?delay,
                        messages = batch.len(), "sink write failed; not ready, retrying the batch after a backoff");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl crate::sink::Sink for RetryingSink {
    fn write<'a>(
        &'a mut self,
        batch: &'a [crate::message::Message],
    ) -> futures::future::BoxFuture<'a, Result<(), crate::sink::SinkError>> {
        Box::pin(self.write_retrying(batch))
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}

#[cfg(test)]
mod sink_tests {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    };

    use futures::future::BoxFuture;

    use super::*;
    use crate::{
        message::Message,
        sink::{Sink, SinkError},
    };

    /// Fails `failures` times with a broker error, then delivers.
    struct FlakySink {
        failures: u32,
        calls: Arc<AtomicU32>,
        healthy_seen: Arc<AtomicBool>,
        healthy: Arc<AtomicBool>,
    }

    impl Sink for FlakySink {
        fn write<'a>(&'a mut self, _batch: &'a [Message]) -> BoxFuture<'a, Result<(), SinkError>> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst);
                if n > 0 && self.healthy.load(Ordering::SeqCst) {
                    self.healthy_seen.store(true, Ordering::SeqCst);
                }
                if n < self.failures {
                    Err(SinkError::Broker { kind: "test", target: "t".into(), detail: "down".into() })
                } else {
                    Ok(())
                }
            })
        }
        fn kind(&self) -> &'static str {
            "flaky"
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_retry_until_delivered_and_readiness_follows() {
        let healthy = Arc::new(AtomicBool::new(true));
        let calls = Arc::new(AtomicU32::new(0));
        let healthy_seen = Arc::new(AtomicBool::new(false));
        let flaky = FlakySink {
            failures: 8,
            calls: calls.clone(),
            healthy_seen: healthy_seen.clone(),
            healthy: healthy.clone(),
        };
        let mut sink = RetryingSink::new(
            Box::new(flaky),
            Backoff::with_seed(Duration::from_millis(10), Duration::from_millis(100), 9),
            healthy.clone(),
            3,
        );
        let start = Instant::now();
        sink.write(&[Message::new(0, 1, b"{}".to_vec())]).await.expect("delivered in the end");
        assert_eq!(calls.load(Ordering::SeqCst), 9);
        assert!(!healthy_seen.load(Ordering::SeqCst), "not ready while failing");
        assert!(healthy.load(Ordering::SeqCst), "ready again after the success");
        // 8 failures opened the breaker (threshold 5): at least one cool-down passed.
        assert!(start.elapsed() >= BREAKER_COOL_DOWN, "{:?}", start.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_return_at_once() {
        struct Broken;
        impl Sink for Broken {
            fn write<'a>(&'a mut self, _b: &'a [Message]) -> BoxFuture<'a, Result<(), SinkError>> {
                Box::pin(async { Err(SinkError::Config { field: "spec.sink", detail: "bad".into() }) })
            }
            fn kind(&self) -> &'static str {
                "broken"
            }
        }
        let healthy = Arc::new(AtomicBool::new(true));
        let mut sink = RetryingSink::new(
            Box::new(Broken),
            Backoff::new(Duration::from_millis(1), Duration::from_millis(1)),
            healthy,
            3,
        );
        assert!(sink.write(&[]).await.is_err());
    }

    /// Refuses every message whose payload is longer than `limit`, and
    /// records what it was asked to write.
    struct PickySink {
        limit: usize,
        writes: Arc<std::sync::Mutex<Vec<Vec<i64>>>>,
        /// Broker errors to give before the first answer.
        outages: u32,
    }

    impl Sink for PickySink {
        fn write<'a>(&'a mut self, batch: &'a [Message]) -> BoxFuture<'a, Result<(), SinkError>> {
            Box::pin(async move {
                if self.outages > 0 {
                    self.outages -= 1;
                    return Err(SinkError::Broker { kind: "test", target: "t".into(), detail: "down".into() });
                }
                self.writes.lock().unwrap().push(batch.iter().map(|m| m.offset).collect());
                let rejected: Vec<crate::sink::Rejection> = batch
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| m.payload.to_bytes().len() > self.limit)
                    .map(|(index, m)| crate::sink::Rejection { index, error: format!("offset {} too large", m.offset) })
                    .collect();
                if rejected.is_empty() {
                    Ok(())
                } else {
                    Err(SinkError::Rejected { kind: "picky", target: "t".into(), rejected, attempts: 1 })
                }
            })
        }
        fn kind(&self) -> &'static str {
            "picky"
        }
    }

    fn batch_with_big(offsets: &[i64], big: &[i64]) -> Vec<Message> {
        offsets
            .iter()
            .map(|&o| {
                let payload = if big.contains(&o) { vec![b'x'; 100] } else { b"{}".to_vec() };
                Message::new(0, o, payload)
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn refused_records_alone_are_sent_again_max_retries_times_then_returned() {
        let writes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let healthy = Arc::new(AtomicBool::new(true));
        let mut sink = RetryingSink::new(
            Box::new(PickySink { limit: 10, writes: writes.clone(), outages: 0 }),
            Backoff::with_seed(Duration::from_millis(10), Duration::from_millis(100), 5),
            healthy.clone(),
            2,
        );
        let batch = batch_with_big(&[10, 11, 12, 13, 14], &[11, 14]);
        match sink.write(&batch).await {
            Err(SinkError::Rejected { rejected, attempts, .. }) => {
                // Indices into the batch the runtime wrote, not into the retried subset.
                assert_eq!(rejected.iter().map(|r| r.index).collect::<Vec<_>>(), vec![1, 4]);
                assert_eq!(rejected[0].error, "offset 11 too large");
                assert_eq!(attempts, 3, "the first attempt and maxRetries = 2 more");
            }
            other => panic!("expected the refused records back, got {other:?}"),
        }
        assert_eq!(*writes.lock().unwrap(), vec![vec![10, 11, 12, 13, 14], vec![11], vec![14], vec![11], vec![14]]);
        assert!(healthy.load(Ordering::SeqCst), "a broker that answers is reachable: still ready");
    }

    #[tokio::test(start_paused = true)]
    async fn zero_retries_returns_refusals_at_once_and_outages_still_retry_for_ever() {
        let writes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let healthy = Arc::new(AtomicBool::new(true));
        let mut sink = RetryingSink::new(
            Box::new(PickySink { limit: 10, writes: writes.clone(), outages: 12 }),
            Backoff::with_seed(Duration::from_millis(10), Duration::from_millis(100), 5),
            healthy.clone(),
            0,
        );
        let batch = batch_with_big(&[1, 2, 3], &[2]);
        let err = sink.write(&batch).await.expect_err("offset 2 is refused");
        assert!(
            matches!(&err, SinkError::Rejected { rejected, attempts: 1, .. } if rejected.len() == 1 && rejected[0].index == 1)
        );
        assert!(err.to_string().contains("refused 1 record(s) after 1 attempt(s): offset 2 too large"), "{err}");
        // Twelve outages (more than maxRetries) were waited out, not counted as refusals.
        assert_eq!(writes.lock().unwrap().len(), 1);
        let ok = batch_with_big(&[4, 5], &[]);
        sink.write(&ok).await.expect("small records are delivered");
    }
}
