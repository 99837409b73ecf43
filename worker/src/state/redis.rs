//! Redis state: pipelined writes, TTLs, keys namespaced by processor and
//! partition (see `StateKeys`). Connection loss is a transient error; the
//! `ConnectionManager` reconnects on the next call.

use std::time::Duration;

use futures::future::BoxFuture;
use redis::{AsyncCommands, aio::ConnectionManager};

use super::{StateError, StateStore};

#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
}

impl RedisStore {
    /// Connect to `url` (`redis://host:port[/db]`, no password).
    pub async fn connect(url: &str) -> Result<Self, StateError> {
        Self::with_client(redis::Client::open(url)?).await
    }

    /// Connect with a client built elsewhere (the worker's, which adds the
    /// password from `spec.state.redis.passwordSecretRef`).
    pub async fn with_client(client: redis::Client) -> Result<Self, StateError> {
        let conn = ConnectionManager::new(client).await?;
        Ok(Self { conn })
    }
}

fn ttl_ms(ttl: Option<Duration>) -> Option<u64> {
    ttl.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1))
}

impl StateStore for RedisStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, StateError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            Ok(c.get::<_, Option<Vec<u8>>>(key).await?)
        })
    }

    fn put_many<'a>(
        &'a self,
        entries: Vec<(String, Vec<u8>)>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<(), StateError>> {
        Box::pin(async move {
            if entries.is_empty() {
                return Ok(());
            }
            let mut pipe = redis::pipe();
            for (k, v) in &entries {
                match ttl_ms(ttl) {
                    Some(ms) => pipe.pset_ex(k, v.as_slice(), ms).ignore(),
                    None => pipe.set(k, v.as_slice()).ignore(),
                };
            }
            let mut c = self.conn.clone();
            pipe.query_async::<()>(&mut c).await?;
            Ok(())
        })
    }

    fn merge<'a>(&'a self, key: &'a str, delta: i64, ttl: Option<Duration>) -> BoxFuture<'a, Result<i64, StateError>> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.atomic().incr(key, delta);
            if let Some(ms) = ttl_ms(ttl) {
                pipe.pexpire(key, i64::try_from(ms).unwrap_or(i64::MAX)).ignore();
            }
            let mut c = self.conn.clone();
            let (value,): (i64,) = pipe.query_async(&mut c).await.map_err(|e| {
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) {
                    StateError::NotAnInteger { key: key.to_string() }
                } else {
                    StateError::Redis(e)
                }
            })?;
            Ok(value)
        })
    }

    fn expire<'a>(&'a self, key: &'a str, ttl: Duration) -> BoxFuture<'a, Result<bool, StateError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            let ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
            Ok(c.pexpire::<_, bool>(key, ms).await?)
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StateError>> {
        Box::pin(async move {
            let mut c = self.conn.clone();
            c.del::<_, ()>(key).await?;
            Ok(())
        })
    }
}
