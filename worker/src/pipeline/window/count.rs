//! Count windows: per key, in arrival order, emitted at the Nth event; never
//! late, no start or end.

use foldhash::HashMap;
use serde::{Deserialize, Serialize};

use super::{
    Fired,
    aggregate::{Accumulator, Held, Inputs},
    key::WindowKey,
};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CountWindows {
    #[serde(with = "keys_serde")]
    keys: HashMap<WindowKey, Accumulator>,
}

impl CountWindows {
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        n: u64,
        key: &WindowKey,
        inputs: &Inputs,
        ts: i64,
        seq: u64,
        held: &mut Held,
        out: &mut Vec<Fired>,
    ) {
        let acc = match self.keys.get_mut(key) {
            Some(acc) => acc,
            None => self.keys.entry(key.clone()).or_default(),
        };
        let new = acc.count == 0;
        acc.add(inputs, ts, seq);
        if new {
            held.insert(acc.first_offset);
        }
        if acc.count >= n
            && let Some(acc) = self.keys.remove(key)
        {
            out.push(Fired { key: key.clone(), start: None, end: None, acc });
        }
    }

    /// Partial windows at the end of the input, in key order.
    pub fn flush(&mut self, out: &mut Vec<Fired>) {
        let mut keys: Vec<(WindowKey, Accumulator)> = std::mem::take(&mut self.keys).into_iter().collect();
        keys.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out.extend(keys.into_iter().map(|(key, acc)| Fired { key, start: None, end: None, acc }));
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }
}

mod keys_serde {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(m: &HashMap<WindowKey, Accumulator>, s: S) -> Result<S::Ok, S::Error> {
        m.iter().collect::<Vec<_>>().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<HashMap<WindowKey, Accumulator>, D::Error> {
        let list: Vec<(WindowKey, Accumulator)> = Vec::deserialize(d)?;
        Ok(list.into_iter().collect())
    }
}
