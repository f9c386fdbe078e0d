//! What an `apply` may know about the entry it applies: all of it identical on every replica.

/// The entry being applied: its position in the log, the leader's timestamp, and a random
/// source seeded from the entry.
pub struct Context {
    index: u64,
    term: u64,
    timestamp_ms: u64,
    /// Seeded on first use: most entries never draw.
    rng: Option<EntryRng>,
}

impl Context {
    pub(crate) fn new(index: u64, term: u64, timestamp_ms: u64) -> Self {
        Self {
            index,
            term,
            timestamp_ms,
            rng: None,
        }
    }

    /// The entry's log index (strictly increasing, gaps possible).
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The term in which the entry was proposed.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Milliseconds since the Unix epoch, chosen by the leader when it proposed the entry.
    pub fn timestamp_ms(&self) -> u64 {
        self.timestamp_ms
    }

    /// A pseudo-random stream seeded from the entry's index and term: the same on every replica,
    /// different for every entry. Not cryptographically secure.
    pub fn rng(&mut self) -> &mut EntryRng {
        let (index, term) = (self.index, self.term);
        self.rng
            .get_or_insert_with(|| EntryRng::for_entry(index, term))
    }
}

/// SplitMix64: tiny, fast, and good enough for simulations, sampling and ids.
#[derive(Clone, Debug)]
pub struct EntryRng {
    state: u64,
}

impl EntryRng {
    /// The stream [`Context::rng`] starts from for an entry.
    pub fn for_entry(index: u64, term: u64) -> Self {
        let mut seed = EntryRng {
            state: index ^ term.rotate_left(32) ^ 0x6c6f_636b_7374_6570,
        };
        // Discard one output so that neighbouring indexes do not start from neighbouring states.
        seed.next_u64();
        seed
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform value in `0..bound` (`bound` > 0), without modulo bias.
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0, "EntryRng::below(0)");
        let zone = u64::MAX - u64::MAX % bound;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % bound;
            }
        }
    }

    /// A uniform value in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Fills `buf` with random bytes.
    pub fn fill_bytes(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}
