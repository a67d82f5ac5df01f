//! The state cache: the recurrent state after a conversation so far, keyed by a hash of its
//! tokens. The API is stateless (a client resends the whole conversation each turn), so a
//! follow-up whose tokens start with a cached sequence prefills only the rest.
//!
//! A Mamba state does not grow with the conversation (`n_layer * d_inner * (d_state +
//! d_conv - 1)` floats), so an entry costs that plus its tokens. Entries are evicted least
//! recently used first once the total passes the budget (`--state-cache-mb`).

use std::collections::HashMap;

use reference::State;

/// FNV-1a over the tokens' little-endian bytes, one prefix length at a time.
fn extend_hash(h: u64, token: u32) -> u64 {
    let mut h = h;
    for b in token.to_le_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The hash the cache keys a token sequence by.
pub fn prefix_hash(tokens: &[u32]) -> u64 {
    tokens.iter().fold(FNV_OFFSET, |h, &t| extend_hash(h, t))
}

struct Entry {
    /// The whole sequence (checked on a hit, so a hash collision is a miss, never a wrong
    /// state).
    tokens: Vec<u32>,
    state: State<f32>,
    last_used: u64,
    bytes: usize,
}

/// An LRU map from token sequences to the state after them.
pub struct StateCache {
    budget: usize,
    used: usize,
    clock: u64,
    map: HashMap<u64, Entry>,
}

impl StateCache {
    /// A cache holding at most `budget_bytes` of states and tokens (0 = off).
    pub fn new(budget_bytes: usize) -> StateCache {
        StateCache {
            budget: budget_bytes,
            used: 0,
            clock: 0,
            map: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.used
    }

    /// The longest cached proper prefix of `tokens` (shorter than `tokens`, so at least one
    /// token is left to prefill): its length and a copy of its state.
    pub fn lookup(&mut self, tokens: &[u32]) -> Option<(usize, State<f32>)> {
        if self.map.is_empty() || tokens.len() < 2 {
            return None;
        }
        let mut hashes = Vec::with_capacity(tokens.len());
        let mut h = FNV_OFFSET;
        for &t in &tokens[..tokens.len() - 1] {
            h = extend_hash(h, t);
            hashes.push(h);
        }
        self.clock += 1;
        for (n, h) in hashes.iter().enumerate().rev() {
            let len = n + 1;
            if let Some(e) = self.map.get_mut(h) {
                if e.tokens[..] == tokens[..len] {
                    e.last_used = self.clock;
                    return Some((len, e.state.clone()));
                }
            }
        }
        None
    }

    /// Keeps `state` as the state after `tokens`, evicting the least recently used entries
    /// beyond the budget. An entry larger than the whole budget is not kept.
    pub fn insert(&mut self, tokens: Vec<u32>, state: State<f32>) {
        let bytes = 4 * (tokens.len() + state.conv.data.len() + state.ssm.data.len());
        if bytes > self.budget {
            return;
        }
        self.clock += 1;
        let key = prefix_hash(&tokens);
        let entry = Entry {
            tokens,
            state,
            last_used: self.clock,
            bytes,
        };
        if let Some(old) = self.map.insert(key, entry) {
            self.used -= old.bytes;
        }
        self.used += bytes;
        while self.used > self.budget {
            let oldest = self
                .map
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| *k);
            match oldest.and_then(|k| self.map.remove(&k)) {
                Some(e) => self.used -= e.bytes,
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reference::MambaConfig;

    fn state(fill: f32) -> State<f32> {
        let cfg = MambaConfig::load(&fixtures::tiny_checkpoint().join("config.json")).unwrap();
        let mut s = State::zeros(&cfg, 1);
        s.ssm.data.iter_mut().for_each(|v| *v = fill);
        s
    }

    fn bytes_of(s: &State<f32>, tokens: usize) -> usize {
        4 * (tokens + s.conv.data.len() + s.ssm.data.len())
    }

    #[test]
    fn the_longest_proper_prefix_wins_and_a_collision_check_guards_it() {
        let mut c = StateCache::new(1 << 30);
        c.insert(vec![5, 6], state(1.0));
        c.insert(vec![5, 6, 7, 8], state(2.0));
        let (n, s) = c.lookup(&[5, 6, 7, 8, 9]).unwrap();
        assert_eq!((n, s.ssm.data[0]), (4, 2.0));
        // The whole sequence is not a proper prefix: the shorter entry serves.
        let (n, s) = c.lookup(&[5, 6, 7, 8]).unwrap();
        assert_eq!((n, s.ssm.data[0]), (2, 1.0));
        assert!(c.lookup(&[6, 5, 7]).is_none());
        assert!(c.lookup(&[5]).is_none());
    }

    #[test]
    fn the_least_recently_used_goes_first_past_the_budget() {
        let one = bytes_of(&state(0.0), 2);
        let mut c = StateCache::new(2 * one + one / 2);
        c.insert(vec![1, 1], state(1.0));
        c.insert(vec![2, 2], state(2.0));
        // Touch [1, 1]: [2, 2] is now the oldest.
        assert!(c.lookup(&[1, 1, 3]).is_some());
        c.insert(vec![3, 3], state(3.0));
        assert_eq!(c.len(), 2);
        assert!(c.bytes() <= 2 * one + one / 2);
        assert!(c.lookup(&[2, 2, 3]).is_none(), "the LRU entry stayed");
        assert!(c.lookup(&[1, 1, 3]).is_some());
        assert!(c.lookup(&[3, 3, 3]).is_some());
        // A budget of 0 keeps nothing.
        let mut off = StateCache::new(0);
        off.insert(vec![1, 2], state(1.0));
        assert!(off.is_empty());
    }
}
