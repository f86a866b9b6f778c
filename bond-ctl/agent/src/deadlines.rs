//! A queue of deadlines, one per key, in time order: the server's
//! timers (missed announces, silent links) look only at what is due, never
//! at every terminal and link of every community it holds.

use std::{
    collections::{BTreeSet, HashMap},
    hash::Hash,
    time::Instant,
};

#[derive(Debug)]
pub struct Deadlines<K> {
    /// Each key's deadline, to find its place in `queue`.
    at: HashMap<K, Instant>,
    queue: BTreeSet<(Instant, K)>,
}

impl<K: Copy + Eq + Hash + Ord> Default for Deadlines<K> {
    fn default() -> Self {
        Self {
            at: HashMap::new(),
            queue: BTreeSet::new(),
        }
    }
}

impl<K: Copy + Eq + Hash + Ord> Deadlines<K> {
    /// Sets `key`'s deadline (None: it has none), in place of its last.
    pub fn set(&mut self, key: K, when: Option<Instant>) {
        let old = match when {
            Some(w) => self.at.insert(key, w),
            None => self.at.remove(&key),
        };
        if old == when {
            return;
        }
        if let Some(o) = old {
            self.queue.remove(&(o, key));
        }
        if let Some(w) = when {
            self.queue.insert((w, key));
        }
    }

    /// Takes the keys due by `now` out of the queue, soonest first.
    pub fn due(&mut self, now: Instant) -> Vec<K> {
        let mut keys = Vec::new();
        while let Some(&(w, k)) = self.queue.first()
            && w <= now
        {
            self.queue.pop_first();
            self.at.remove(&k);
            keys.push(k);
        }
        keys
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.at.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn keys_come_due_in_order_once_and_at_their_latest_deadline() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut d = Deadlines::default();
        d.set('a', Some(ms(30)));
        d.set('b', Some(ms(10)));
        d.set('c', Some(ms(20)));
        // Moved later, moved sooner, dropped.
        d.set('b', Some(ms(40)));
        d.set('a', Some(ms(5)));
        d.set('c', None);
        assert_eq!(d.len(), 2);
        assert_eq!(d.due(ms(4)), Vec::<char>::new());
        assert_eq!(d.due(ms(40)), vec!['a', 'b']);
        assert_eq!(d.due(ms(100)), Vec::<char>::new());
        assert_eq!(d.len(), 0);
        // Two keys at one instant both come due.
        d.set('x', Some(ms(50)));
        d.set('y', Some(ms(50)));
        assert_eq!(d.due(ms(50)), vec!['x', 'y']);
    }
}
