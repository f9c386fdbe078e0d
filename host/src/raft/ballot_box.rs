//! The ballot box: which index a quorum holds durably.
//!
//! Each member's vote is the highest index it has durably (the leader's own durable write is its
//! vote). The commit rule that only entries of the current term are counted lives with the
//! caller, which knows the terms.

pub struct BallotBox {
    size: usize,
    votes: Vec<u64>,
}

impl BallotBox {
    pub fn new(members: usize) -> BallotBox {
        BallotBox {
            size: members,
            votes: Vec::with_capacity(members),
        }
    }

    /// Records one member's durable index.
    pub fn vote(&mut self, durable_index: u64) {
        self.votes.push(durable_index);
    }

    /// The highest index held by a majority of the members (missing votes count as 0).
    pub fn quorum_index(&mut self) -> u64 {
        self.votes.resize(self.size.max(self.votes.len()), 0);
        self.votes.sort_unstable_by(|a, b| b.cmp(a));
        self.votes[self.size / 2]
    }
}

#[cfg(test)]
mod tests {
    use super::BallotBox;

    #[test]
    fn majority_index() {
        let q = |size: usize, v: &[u64]| {
            let mut b = BallotBox::new(size);
            v.iter().for_each(|&x| b.vote(x));
            b.quorum_index()
        };
        assert_eq!(q(3, &[5, 3, 1]), 3);
        assert_eq!(q(3, &[5, 0, 0]), 0);
        assert_eq!(q(5, &[9, 9, 4, 2, 1]), 4);
        assert_eq!(q(5, &[9, 9]), 0);
        assert_eq!(q(1, &[7]), 7);
        assert_eq!(q(4, &[8, 6, 4, 2]), 4);
    }
}
