//! An in-process transport (tests and the pipeline bench): messages go straight to the target
//! node's inbox, no encoding. Links can be cut to simulate partitions.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use super::{Message, Node, NodeId, Transport};
use crate::state_machine::StateMachine;

type Inbox = Arc<dyn Fn(NodeId, Message) + Send + Sync>;

#[derive(Default)]
pub struct LocalNetwork {
    inboxes: RwLock<HashMap<NodeId, Inbox>>,
    /// Cut one-way links (from, to).
    cut: RwLock<HashSet<(NodeId, NodeId)>>,
}

impl LocalNetwork {
    pub fn new() -> Arc<LocalNetwork> {
        Arc::new(LocalNetwork::default())
    }

    /// The transport node `from` sends through.
    pub fn transport(self: &Arc<Self>, from: NodeId) -> Arc<dyn Transport> {
        Arc::new(LocalTransport {
            from,
            net: self.clone(),
        })
    }

    pub fn register<SM: StateMachine>(&self, id: NodeId, node: Node<SM>) {
        if let Ok(mut m) = self.inboxes.write() {
            m.insert(id, Arc::new(move |from, msg| node.receive(from, msg)));
        }
    }

    pub fn unregister(&self, id: NodeId) {
        if let Ok(mut m) = self.inboxes.write() {
            m.remove(&id);
        }
    }

    /// Cuts (or restores) both directions between `id` and everybody else.
    pub fn isolate(&self, id: NodeId, members: &[NodeId], isolated: bool) {
        if let Ok(mut cut) = self.cut.write() {
            for &m in members {
                for link in [(id, m), (m, id)] {
                    if isolated {
                        cut.insert(link);
                    } else {
                        cut.remove(&link);
                    }
                }
            }
        }
    }

    fn deliver(&self, from: NodeId, to: NodeId, msg: Message) {
        if self
            .cut
            .read()
            .map(|c| !c.is_empty() && c.contains(&(from, to)))
            .unwrap_or(true)
        {
            return;
        }
        let inbox = self.inboxes.read().ok().and_then(|m| m.get(&to).cloned());
        if let Some(inbox) = inbox {
            inbox(from, msg);
        }
    }
}

struct LocalTransport {
    from: NodeId,
    net: Arc<LocalNetwork>,
}

impl Transport for LocalTransport {
    fn send(&self, to: NodeId, msg: Message) {
        self.net.deliver(self.from, to, msg);
    }
}
