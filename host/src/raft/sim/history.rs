//! Histories of operations on registers, and the check that one is linearizable: Wing & Gong's
//! search with Lowe's memo of visited states. The simulator checks its clients' histories with
//! it, and the black-box tests the histories of HTTP clients of real nodes.

use std::collections::{HashMap, HashSet};

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
    // Writes are unique, so a written value someone saw names its write. An indeterminate write
    // nobody saw can be taken as never having happened: had it happened, whatever came after
    // it up to the next write would have seen it. One somebody saw did happen, before the
    // first of those who saw it answered: that is its answer. So every op left is determinate,
    // and dropping the unseen writes keeps the search from trying every subset of them.
    let mut seen_by: HashMap<u64, u64> = HashMap::new();
    for o in ops {
        let value = match o.kind {
            OpKind::Get => o.read,
            OpKind::Swap(_, prev) => prev,
            OpKind::Put(_) => None,
        };
        if let (Some(v), Some(ret)) = (value, o.ret) {
            let first = seen_by.entry(v).or_insert(ret);
            *first = (*first).min(ret);
        }
    }
    let mut ops: Vec<Op> = ops
        .iter()
        .filter_map(|o| {
            let ret = match (o.ret, o.kind.written()) {
                (Some(ret), _) => ret,
                (None, Some(v)) => *seen_by.get(&v)?,
                (None, None) => return None,
            };
            Some(Op {
                invoke: o.invoke,
                ret,
                kind: o.kind,
                read: o.read,
            })
        })
        .collect();
    ops.sort_by_key(|o| o.invoke);
    search(&ops)
}

/// A determinate op, as the search sees it.
struct Op {
    invoke: u64,
    ret: u64,
    kind: OpKind,
    read: Option<u64>,
}

/// Which ops are linearized: all before `low`, and `above` (sorted) past it. Ops are sorted by
/// invocation and none can go far ahead of the first one not yet placed (it must be placed
/// before anything invoked after it returned), so `above` stays short.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Placed {
    low: usize,
    above: Vec<usize>,
    value: Option<u64>,
}

impl Placed {
    fn has(&self, i: usize) -> bool {
        i < self.low || self.above.binary_search(&i).is_ok()
    }

    fn with(&self, i: usize, value: Option<u64>) -> Placed {
        let mut next = self.clone();
        next.value = value;
        if i == next.low {
            next.low += 1;
            while next.above.first() == Some(&next.low) {
                next.above.remove(0);
                next.low += 1;
            }
        } else if let Err(at) = next.above.binary_search(&i) {
            next.above.insert(at, i);
        }
        next
    }
}

/// Wing & Gong's depth-first search for an order, with Lowe's memo of the states tried.
fn search(ops: &[Op]) -> bool {
    let mut tried: HashSet<Placed> = HashSet::new();
    let mut stack = vec![Placed {
        low: 0,
        above: Vec::new(),
        value: None,
    }];
    while let Some(p) = stack.pop() {
        if p.low == ops.len() {
            return true;
        }
        if !tried.insert(p.clone()) {
            continue;
        }
        // Only ops sent before every unplaced op returned may go next; past the first op sent
        // after that, none can.
        let mut horizon = u64::MAX;
        let mut end = p.low;
        while end < ops.len() && ops[end].invoke <= horizon {
            if !p.has(end) {
                horizon = horizon.min(ops[end].ret);
            }
            end += 1;
        }
        // Pushed last to first, so that the earliest sent is tried first.
        for i in (p.low..end).rev() {
            if p.has(i) || ops[i].invoke > horizon {
                continue;
            }
            let next = match ops[i].kind {
                OpKind::Put(v) => Some(v),
                OpKind::Swap(v, prev) if prev == p.value => Some(v),
                OpKind::Get if ops[i].read == p.value => p.value,
                OpKind::Swap(..) | OpKind::Get => continue,
            };
            stack.push(p.with(i, next));
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

    /// A long history with overlapping calls (each takes effect at a point inside its window,
    /// windows up to six points wide): accepted, and one stale read in it refused, without the
    /// search growing with the history's length.
    #[test]
    fn long_histories_are_checked_in_one_pass() {
        let mut seed = 7u64;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let (mut ops, mut value) = (Vec::new(), None);
        for t in 0..60_000u64 {
            let point = 100 + 10 * t;
            let (invoke, ret) = (point - next(30), point + next(30));
            let o = if next(2) == 0 {
                let prev = value.replace(t);
                op(OpKind::Swap(t, prev), invoke, Some(ret), None)
            } else {
                op(OpKind::Get, invoke, Some(ret), value)
            };
            ops.push(o);
        }
        let refs: Vec<&HistOp> = ops.iter().collect();
        assert!(linearizable(&refs));
        // A read in the middle sees a value two writes old.
        let at = (30_000..)
            .find(|&i| ops[i].kind == OpKind::Get && ops[i - 1].kind != OpKind::Get)
            .expect("a read after a write");
        let stale = (0..at - 1)
            .rev()
            .find_map(|i| match ops[i].kind {
                OpKind::Swap(v, _) => Some(v),
                _ => None,
            })
            .expect("an earlier write");
        ops[at].read = Some(stale);
        ops[at].invoke = ops[at - 1].ret.expect("answered") + 1;
        ops[at].ret = Some(ops[at].invoke + 1);
        let refs: Vec<&HistOp> = ops.iter().collect();
        assert!(!linearizable(&refs));
    }
}
