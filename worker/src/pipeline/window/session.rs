//! Session windows: per key, events closer than `gap` belong together.
//!
//! A session is `[first ts, last ts + gap)`. An event joins every open
//! session it is within `gap` of, so it can extend one backwards or bridge
//! two into one. An event is late if `watermark >= ts + gap` (its own
//! session would already be over) or if it falls before the end of the key's
//! last fired session (it would have belonged to, or before, a result already
//! emitted).

use std::collections::{BTreeMap, BTreeSet};

use foldhash::HashMap;
use serde::{Deserialize, Serialize};

use super::{
    Fired,
    aggregate::{Accumulator, Held, Inputs},
    key::WindowKey,
};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Session {
    last: i64,
    acc: Accumulator,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct KeySessions {
    /// start -> session; open sessions of one key never overlap.
    open: BTreeMap<i64, Session>,
    last_fired_end: Option<i64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SessionWindows {
    #[serde(with = "keys_serde")]
    keys: HashMap<WindowKey, KeySessions>,
    /// (end, start, key) of every open session: what fires next.
    index: BTreeSet<(i64, i64, WindowKey)>,
    /// (last fired end + gap, key): once the watermark passes it, the rule
    /// `watermark >= ts + gap` already makes every event before that end
    /// late, so a key with no open session can be forgotten (bounded state).
    #[serde(default)]
    retire: BTreeSet<(i64, WindowKey)>,
}

impl SessionWindows {
    pub fn is_late(&self, gap: i64, key: &WindowKey, ts: i64, watermark: Option<i64>) -> bool {
        watermark.is_some_and(|wm| wm >= ts + gap)
            || self.keys.get(key).and_then(|k| k.last_fired_end).is_some_and(|end| ts < end)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn add(&mut self, gap: i64, key: &WindowKey, inputs: &Inputs, ts: i64, seq: u64, held: &mut Held) {
        let ks = match self.keys.get_mut(key) {
            Some(ks) => ks,
            None => self.keys.entry(key.clone()).or_default(),
        };
        // Sessions within gap of ts: start < ts + gap and last > ts - gap.
        let joined: Vec<i64> =
            ks.open.range(..ts + gap).rev().take_while(|(_, s)| s.last > ts - gap).map(|(start, _)| *start).collect();
        let mut session = Session { last: ts, acc: Accumulator::default() };
        session.acc.add(inputs, ts, seq);
        let mut start = ts;
        for s in joined {
            if let Some(old) = ks.open.remove(&s) {
                self.index.remove(&(old.last + gap, s, key.clone()));
                held.remove(old.acc.first_offset);
                start = start.min(s);
                session.last = session.last.max(old.last);
                session.acc.merge(old.acc);
            }
        }
        held.insert(session.acc.first_offset);
        self.index.insert((session.last + gap, start, key.clone()));
        ks.open.insert(start, session);
    }

    pub fn fire(&mut self, gap: i64, watermark: i64, out: &mut Vec<Fired>) {
        while let Some(first) = self.index.first() {
            if first.0 > watermark {
                break;
            }
            if let Some((end, start, key)) = self.index.pop_first() {
                self.retire.insert((end + gap, key.clone()));
                self.emit(end, start, key, out);
            }
        }
        while let Some((due, _)) = self.retire.first() {
            if *due > watermark {
                break;
            }
            if let Some((due, key)) = self.retire.pop_first()
                && let Some(ks) = self.keys.get(&key)
                && ks.open.is_empty()
                && ks.last_fired_end.is_some_and(|e| e + gap <= due)
            {
                self.keys.remove(&key);
            }
        }
    }

    /// Keys with sessions or late-event memory.
    pub fn keys(&self) -> usize {
        self.keys.len()
    }

    pub fn flush(&mut self, out: &mut Vec<Fired>) {
        while let Some((end, start, key)) = self.index.pop_first() {
            self.emit(end, start, key, out);
        }
    }

    fn emit(&mut self, end: i64, start: i64, key: WindowKey, out: &mut Vec<Fired>) {
        if let Some(ks) = self.keys.get_mut(&key)
            && let Some(session) = ks.open.remove(&start)
        {
            ks.last_fired_end = Some(ks.last_fired_end.map_or(end, |e| e.max(end)));
            out.push(Fired { key, start: Some(start), end: Some(end), acc: session.acc });
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
}

mod keys_serde {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(m: &HashMap<WindowKey, KeySessions>, s: S) -> Result<S::Ok, S::Error> {
        m.iter().map(|(k, v)| (k, v.open.iter().collect::<Vec<_>>(), v.last_fired_end)).collect::<Vec<_>>().serialize(s)
    }

    type Stored = Vec<(WindowKey, Vec<(i64, Session)>, Option<i64>)>;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<HashMap<WindowKey, KeySessions>, D::Error> {
        let list: Stored = Vec::deserialize(d)?;
        Ok(list
            .into_iter()
            .map(|(k, open, last_fired_end)| (k, KeySessions { open: open.into_iter().collect(), last_fired_end }))
            .collect())
    }
}
