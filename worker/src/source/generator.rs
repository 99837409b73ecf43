//! The generator source: synthetic JSON messages for demos, tests and
//! benchmarks, reproducible under a seed.
//!
//! Each message picks a key `k<n>` (n below `keys`); the key decides the
//! partition, so one key always lands in one partition as with a keyed
//! Kafka topic. `rate` paces the output (0: as fast as possible); `burst`
//! adds `messages` every `every` on top, to make lag rise; `count` ends it.

use std::{sync::Arc, time::Duration};

use futures::future::BoxFuture;
use serde_json::{Map, Value};
use sluice_crds::{GeneratorSource, generator::FieldGenerator};
use tokio::time::Instant;

use super::{Acker, MemoryAcker, Source, SourceError, SourceEvent};
use crate::message::{Message, Payload, now_ms};

/// splitmix64: tiny, fast, and the same sequence on every platform.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64 }
    }

    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Debug, thiserror::Error)]
#[error("generator template field {field}: {source}")]
pub struct TemplateError {
    field: String,
    source: sluice_crds::generator::FieldGeneratorError,
}

/// Builds messages; separate from pacing so benches can use it directly.
#[derive(Clone, Debug)]
pub struct MessageFactory {
    fields: Vec<(String, FieldGenerator)>,
    keys: u64,
    partitions: i32,
    rng: Rng,
    seq: Vec<i64>,
}

impl MessageFactory {
    pub fn new(spec: &GeneratorSource) -> Result<Self, TemplateError> {
        let fields = spec
            .template
            .iter()
            .map(|(f, g)| {
                g.parse::<FieldGenerator>()
                    .map(|g| (f.clone(), g))
                    .map_err(|source| TemplateError { field: f.clone(), source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let partitions = spec.partitions.max(1);
        Ok(Self {
            fields,
            keys: u64::try_from(spec.keys.max(1)).unwrap_or(1),
            partitions,
            rng: Rng::new(spec.seed.and_then(|s| u64::try_from(s).ok()).unwrap_or_else(|| now_ms() as u64)),
            seq: vec![0; usize::try_from(partitions).unwrap_or(1)],
        })
    }

    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// The next message, as bytes (a real source hands the pipeline bytes too).
    pub fn next_message(&mut self, now: i64) -> Message {
        let k = self.rng.below(self.keys);
        let key = format!("k{k}");
        let partition = i32::try_from(k % u64::try_from(self.partitions).unwrap_or(1)).unwrap_or(0);
        let slot = usize::try_from(partition).unwrap_or(0);
        let offset = self.seq[slot];
        self.seq[slot] += 1;
        let mut obj = Map::new();
        for (field, g) in &self.fields {
            let v = match g {
                FieldGenerator::Seq => Value::from(offset),
                FieldGenerator::Key => Value::String(key.clone()),
                FieldGenerator::Uuid => {
                    let (a, b) = (self.rng.next_u64(), self.rng.next_u64());
                    let b = (b & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
                    let a = (a & 0xffff_ffff_ffff_0fff) | 0x4000;
                    Value::String(format!(
                        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                        a >> 32,
                        (a >> 16) & 0xffff,
                        a & 0xffff,
                        b >> 48,
                        b & 0xffff_ffff_ffff
                    ))
                }
                FieldGenerator::Now => Value::from(now),
                FieldGenerator::Int { lo, hi } => {
                    let span = u64::try_from(i128::from(*hi) - i128::from(*lo) + 1).unwrap_or(u64::MAX);
                    Value::from(lo.wrapping_add(self.rng.below(span) as i64))
                }
                FieldGenerator::Float { lo, hi } => {
                    serde_json::Number::from_f64(lo + (hi - lo) * self.rng.unit()).map_or(Value::Null, Value::Number)
                }
                FieldGenerator::Choice(options) => {
                    let i = self.rng.below(options.len() as u64) as usize;
                    Value::String(options[i].clone())
                }
                FieldGenerator::Const(c) => Value::String(c.clone()),
            };
            obj.insert(field.clone(), v);
        }
        let bytes = serde_json::to_vec(&Value::Object(obj)).unwrap_or_default();
        Message {
            key: Some(key.into_bytes()),
            payload: Payload::from_bytes(bytes),
            headers: Vec::new(),
            partition,
            offset,
            timestamp: now,
        }
    }
}

/// The generator as a `Source`.
pub struct Generator {
    factory: MessageFactory,
    rate: u64,
    burst: Option<(Duration, u64)>,
    remaining: Option<u64>,
    produced: u64,
    started: Option<Instant>,
    announced: bool,
    acker: Arc<MemoryAcker>,
}

impl Generator {
    pub fn new(spec: &GeneratorSource) -> Result<Self, TemplateError> {
        Ok(Self {
            factory: MessageFactory::new(spec)?,
            rate: u64::try_from(spec.rate).unwrap_or(0),
            burst: spec
                .burst
                .as_ref()
                .map(|b| (b.every.as_std().max(Duration::from_millis(1)), u64::try_from(b.messages).unwrap_or(0))),
            remaining: spec.count.and_then(|c| u64::try_from(c).ok()),
            produced: 0,
            started: None,
            announced: false,
            acker: Arc::new(MemoryAcker::default()),
        })
    }

    /// Messages due by `elapsed` under rate and bursts.
    fn due(&self, elapsed: Duration) -> u64 {
        let steady = (elapsed.as_secs_f64() * self.rate as f64) as u64;
        let bursts = self.burst.map_or(0, |(every, n)| (elapsed.as_millis() / every.as_millis().max(1)) as u64 * n);
        steady + bursts
    }

    async fn batch(&mut self, max: usize) -> SourceEvent {
        let limit = match self.remaining {
            Some(0) => return SourceEvent::End,
            Some(r) => (max as u64).min(r),
            None => max as u64,
        };
        let n = if self.rate == 0 {
            limit
        } else {
            let started = *self.started.get_or_insert_with(Instant::now);
            loop {
                let ready = self.due(started.elapsed()).saturating_sub(self.produced);
                if ready > 0 {
                    break ready.min(limit);
                }
                // Sleep until more is due: the next steady message or the next
                // burst, whichever comes first (at least 1 ms).
                let elapsed = started.elapsed();
                let steady = ((elapsed.as_secs_f64() * self.rate as f64).floor() + 1.0) / self.rate as f64;
                let mut next = Duration::from_secs_f64(steady);
                if let Some((every, _)) = self.burst {
                    let k = elapsed.as_millis() / every.as_millis().max(1) + 1;
                    next = next.min(every.saturating_mul(u32::try_from(k).unwrap_or(u32::MAX)));
                }
                let wait = next.saturating_sub(elapsed).max(Duration::from_millis(1));
                tokio::time::sleep(wait).await;
            }
        };
        let now = now_ms();
        let batch: Vec<Message> = (0..n).map(|_| self.factory.next_message(now)).collect();
        self.produced += n;
        if let Some(r) = &mut self.remaining {
            *r -= n;
        }
        SourceEvent::Batch(batch)
    }
}

impl Source for Generator {
    fn next(&mut self, max: usize) -> BoxFuture<'_, Result<SourceEvent, SourceError>> {
        Box::pin(async move {
            if !self.announced {
                self.announced = true;
                return Ok(SourceEvent::Assigned((0..self.factory.partitions()).collect()));
            }
            Ok(self.batch(max.max(1)).await)
        })
    }

    fn acker(&self) -> Arc<dyn Acker> {
        self.acker.clone()
    }

    fn kind(&self) -> &'static str {
        "generator"
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn spec(v: Value) -> GeneratorSource {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn same_seed_same_messages() {
        let s = spec(json!({"seed": 7, "keys": 10, "partitions": 3,
            "template": {"id": "uuid", "k": "key", "n": "int(1,6)", "c": "choice(a|b)", "s": "seq", "f": "float(0,1)", "x": "const(hi)"}}));
        let mut a = MessageFactory::new(&s).unwrap();
        let mut b = MessageFactory::new(&s).unwrap();
        for _ in 0..100 {
            let (ma, mb) = (a.next_message(5), b.next_message(5));
            assert_eq!(ma.payload.to_bytes(), mb.payload.to_bytes());
            let v = ma.payload.json().unwrap();
            assert!((1..=6).contains(&v["n"].as_i64().unwrap()));
            assert_eq!(v["k"].as_str().unwrap().as_bytes(), ma.key.as_deref().unwrap());
            assert_eq!(v["s"].as_i64().unwrap(), ma.offset, "seq is the offset within the partition");
            assert_eq!(v["x"], "hi");
            assert_eq!(v["id"].as_str().unwrap().len(), 36);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bursts_come_on_top_of_the_rate() {
        let s = spec(json!({"rate": 10, "burst": {"every": "1s", "messages": 100}, "template": {"s": "seq"}}));
        let mut g = Generator::new(&s).unwrap();
        g.next(1000).await.unwrap();
        let start = Instant::now();
        let mut total = 0;
        while start.elapsed() < Duration::from_millis(2500) {
            if let SourceEvent::Batch(b) = g.next(1000).await.unwrap() {
                total += b.len();
            }
        }
        // 25 steady + 2 bursts of 100 by 2.5 s (one more message may be due at the edge).
        assert!((225..=227).contains(&total), "{total}");
    }

    #[tokio::test(start_paused = true)]
    async fn rate_paces_and_count_ends() {
        let s = spec(json!({"rate": 100, "count": 250, "template": {"s": "seq"}}));
        let mut g = Generator::new(&s).unwrap();
        assert!(matches!(g.next(1000).await.unwrap(), SourceEvent::Assigned(p) if p == vec![0]));
        let start = Instant::now();
        let mut total = 0;
        loop {
            match g.next(1000).await.unwrap() {
                SourceEvent::Batch(b) => total += b.len(),
                SourceEvent::End => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(total, 250);
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(2400) && took <= Duration::from_millis(2600), "{took:?}");
    }
}
