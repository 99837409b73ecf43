//! Open tumbling and sliding windows of one partition.
//!
//! Windows are grouped by (end, start) in a BTreeMap so that firing pops the
//! front while `end <= watermark`; within one window, keys live in a hash map
//! (100k keys stay O(1) per event) and are sorted only when the window fires.

use std::collections::BTreeMap;

use foldhash::HashMap;
use serde::{Deserialize, Serialize};

use super::{
    Fired,
    aggregate::{Accumulator, Held, Inputs},
    key::WindowKey,
};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AlignedWindows {
    /// (end, start) -> key -> aggregates.
    #[serde(with = "windows_serde")]
    windows: BTreeMap<(i64, i64), HashMap<WindowKey, Accumulator>>,
}

impl AlignedWindows {
    /// Add an event to window (start, end) unless that window already fired.
    #[allow(clippy::too_many_arguments)] // the event's parts, passed apart to avoid building a struct per window
    pub fn add(&mut self, start: i64, end: i64, key: &WindowKey, inputs: &Inputs, ts: i64, seq: u64, held: &mut Held) {
        let keys = self.windows.entry((end, start)).or_default();
        match keys.get_mut(key) {
            Some(acc) => acc.add(inputs, ts, seq),
            None => {
                let mut acc = Accumulator::default();
                acc.add(inputs, ts, seq);
                held.insert(acc.first_offset);
                keys.insert(key.clone(), acc);
            }
        }
    }

    /// Emit every window whose end is at or below the watermark, in (end, start, key) order.
    pub fn fire(&mut self, watermark: i64, out: &mut Vec<Fired>) {
        while let Some(entry) = self.windows.first_entry() {
            if entry.key().0 > watermark {
                break;
            }
            let ((end, start), keys) = entry.remove_entry();
            emit(start, end, keys, out);
        }
    }

    pub fn flush(&mut self, out: &mut Vec<Fired>) {
        for ((end, start), keys) in std::mem::take(&mut self.windows) {
            emit(start, end, keys, out);
        }
    }

    /// Open (window, key) pairs: the state-size metric.
    pub fn len(&self) -> usize {
        self.windows.values().map(HashMap::len).sum()
    }
}

fn emit(start: i64, end: i64, keys: HashMap<WindowKey, Accumulator>, out: &mut Vec<Fired>) {
    let mut keys: Vec<(WindowKey, Accumulator)> = keys.into_iter().collect();
    keys.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    out.extend(keys.into_iter().map(|(key, acc)| Fired { key, start: Some(start), end: Some(end), acc }));
}

/// JSON maps need string keys: store the windows as a list.
mod windows_serde {
    use super::*;
    use serde::{Deserializer, Serializer};

    type Windows = BTreeMap<(i64, i64), HashMap<WindowKey, Accumulator>>;
    type Stored<K, A> = Vec<(i64, i64, Vec<(K, A)>)>;

    pub fn serialize<S: Serializer>(w: &Windows, s: S) -> Result<S::Ok, S::Error> {
        let list: Stored<&WindowKey, &Accumulator> =
            w.iter().map(|((end, start), keys)| (*end, *start, keys.iter().collect())).collect();
        list.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Windows, D::Error> {
        let list: Stored<WindowKey, Accumulator> = Vec::deserialize(d)?;
        Ok(list.into_iter().map(|(end, start, keys)| ((end, start), keys.into_iter().collect())).collect())
    }
}
