//! Histories of operations on registers, and the check that one is linearizable: Wing & Gong's
//! search with Lowe's memo of visited states. The simulator checks its clients' histories with
//! it, and the black-box tests the histories of HTTP clients of real nodes.

use std::collections::HashSet;

/// What an operation did to its key's register. Every write writes a value of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Wrote the value.
    Put(u64),
    /// Wrote the value, and answered with the one it replaced (`None`: the register was empty).
    Swap(u64, Option<u64>),
    /// Read the register (`HistOp::read`).
    Get,
}

#[derive(Clone, Debug)]
pub struct HistOp {
    pub key: u64,
    pub kind: OpKind,
    /// When the caller sent it and when the answer came (any clock all callers share).
    pub invoke: u64,
    /// `None`: indeterminate (it may or may not have taken effect, at any point after `invoke`).
    pub ret: Option<u64>,
    /// What a `Get` read.
    pub read: Option<u64>,
}

impl OpKind {
    fn written(self) -> Option<u64> {
        match self {
            OpKind::Put(v) | OpKind::Swap(v, _) => Some(v),
            OpKind::Get => None,
        }
    }
}

/// Whether the operations on one register can be put in one order that respects real time
/// (an op answered before another was sent comes first) in which every read sees the latest
/// write and every swap replaced it.
pub fn linearizable(ops: &[&HistOp]) -> bool {
    // An indeterminate write nobody saw can be taken as never having happened: had it
    // happened, whatever came after it up to the next write would have seen it. Dropping such
    // writes keeps the search from trying every subset of them.
    let seen: HashSet<u64> = ops
        .iter()
        .filter_map(|o| match o.kind {
            OpKind::Get => o.read,
            OpKind::Swap(_, prev) => prev,
            OpKind::Put(_) => None,
        })
        .collect();
    let ops: Vec<&HistOp> = ops
        .iter()
        .copied()
        .filter(|o| o.ret.is_some() || o.kind.written().is_some_and(|v| seen.contains(&v)))
        .collect();
    let n = ops.len();
    let words = n.div_ceil(64).max(1);
    let is_done = |done: &[u64], i: usize| done[i / 64] & (1 << (i % 64)) != 0;
    let mut visited: HashSet<(Vec<u64>, Option<u64>)> = HashSet::new();
    let mut stack: Vec<(Vec<u64>, Option<u64>)> = vec![(vec![0; words], None)];
    while let Some((done, value)) = stack.pop() {
        if (0..n).all(|i| ops[i].ret.is_none() || is_done(&done, i)) {
            return true;
        }
        if !visited.insert((done.clone(), value)) {
            continue;
        }
        // Only ops sent before every pending determinate op returned may go next.
        let horizon = (0..n)
            .filter(|&i| !is_done(&done, i))
            .filter_map(|i| ops[i].ret)
            .min()
            .unwrap_or(u64::MAX);
        for i in 0..n {
            if is_done(&done, i) || ops[i].invoke > horizon {
                continue;
            }
            let next = match ops[i].kind {
                OpKind::Put(v) => Some(v),
                OpKind::Swap(v, prev) if prev == value => Some(v),
                OpKind::Get if ops[i].read == value => value,
                OpKind::Swap(..) | OpKind::Get => continue,
            };
            let mut d = done.clone();
            d[i / 64] |= 1 << (i % 64);
            stack.push((d, next));
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: OpKind, invoke: u64, ret: Option<u64>, read: Option<u64>) -> HistOp {
        HistOp {
            key: 0,
            kind,
            invoke,
            ret,
            read,
        }
    }

    #[test]
    fn checker_accepts_and_rejects() {
        let w1 = op(OpKind::Put(1), 0, Some(2), None);
        let r1 = op(OpKind::Get, 3, Some(4), Some(1));
        let r0 = op(OpKind::Get, 3, Some(4), None);
        assert!(linearizable(&[&w1, &r1]));
        assert!(
            !linearizable(&[&w1, &r0]),
            "stale read after a completed write"
        );
        // An indeterminate write may or may not have happened.
        let wi = op(OpKind::Put(2), 0, None, None);
        let r2 = op(OpKind::Get, 5, Some(6), Some(2));
        assert!(linearizable(&[&wi, &r0]));
        assert!(linearizable(&[&wi, &r2]));
        // Once seen, a value cannot disappear.
        let r_after = op(OpKind::Get, 7, Some(8), None);
        assert!(!linearizable(&[&wi, &r2, &r_after]));
        // Concurrent ops may take either order.
        let wa = op(OpKind::Put(3), 0, Some(10), None);
        let ra = op(OpKind::Get, 1, Some(2), None);
        let rb = op(OpKind::Get, 3, Some(4), Some(3));
        assert!(linearizable(&[&wa, &ra, &rb]));
        // A value nobody wrote.
        assert!(!linearizable(&[&w1, &op(OpKind::Get, 3, Some(4), Some(9))]));
    }

    #[test]
    fn swaps_must_replace_the_latest_value() {
        let s1 = op(OpKind::Swap(1, None), 0, Some(1), None);
        let s2 = op(OpKind::Swap(2, Some(1)), 2, Some(3), None);
        assert!(linearizable(&[&s1, &s2]));
        // Applied twice, or another write lost in between: the second swap saw a stale value.
        let w3 = op(OpKind::Put(3), 2, Some(3), None);
        let s4 = op(OpKind::Swap(4, Some(1)), 4, Some(5), None);
        assert!(!linearizable(&[&s1, &w3, &s4]));
        // Concurrent swaps order themselves by what they saw, not by when they were sent.
        let a = op(OpKind::Swap(5, Some(6)), 0, Some(10), None);
        let b = op(OpKind::Swap(6, None), 1, Some(10), None);
        assert!(linearizable(&[&a, &b]));
        // A swap whose previous value nobody wrote.
        assert!(!linearizable(&[&op(
            OpKind::Swap(7, Some(8)),
            0,
            Some(1),
            None
        )]));
    }

    #[test]
    fn unseen_indeterminate_writes_cost_nothing() {
        // 200 writes lost in the air, then a sequence of ordinary ones: without dropping the
        // lost ones the search would consider every subset of them.
        let mut ops: Vec<HistOp> = (0..200)
            .map(|v| op(OpKind::Put(1_000 + v), v, None, None))
            .collect();
        for v in 0..100u64 {
            let t = 1_000 + 4 * v;
            ops.push(op(OpKind::Put(v), t, Some(t + 1), None));
            ops.push(op(OpKind::Get, t + 2, Some(t + 3), Some(v)));
        }
        let refs: Vec<&HistOp> = ops.iter().collect();
        assert!(linearizable(&refs));
        // One of them seen after the last write: it must then have happened after that write.
        ops.push(op(OpKind::Get, 2_000, Some(2_001), Some(1_007)));
        let refs: Vec<&HistOp> = ops.iter().collect();
        assert!(linearizable(&refs));
        ops.push(op(OpKind::Get, 2_002, Some(2_003), Some(99)));
        let refs: Vec<&HistOp> = ops.iter().collect();
        assert!(
            !linearizable(&refs),
            "a value came back after it was overwritten"
        );
    }
}
