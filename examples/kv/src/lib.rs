//! `kv`: a string key-value store with compare-and-swap.
//!
//! Commands: `{"put": {"key", "value"}}` → `{"prev"}`, `{"delete": {"key"}}` → `{"prev"}`,
//! `{"cas": {"key", "from": s|null, "to"}}` → `{"ok", "value"}` (the value after).
//! Queries: `{"get": {"key"}}` → `{"value"}`, `{"scan": {"prefix"}}` → `{"items": [[k, v]]}`.

use std::collections::BTreeMap;

use lockstep_guest::{Context, StateMachine};
use serde::{Deserialize, Serialize};

/// A `BTreeMap`: scans come out sorted, and snapshots are byte-identical on every replica.
#[derive(Default, Serialize, Deserialize)]
pub struct Kv {
    items: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    Put {
        key: String,
        value: String,
    },
    Delete {
        key: String,
    },
    Cas {
        key: String,
        from: Option<String>,
        to: String,
    },
}

#[derive(Serialize)]
#[serde(untagged)]
pub enum Output {
    Prev { prev: Option<String> },
    Cas { ok: bool, value: Option<String> },
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Query {
    Get { key: String },
    Scan { prefix: String },
}

#[derive(Serialize)]
#[serde(untagged)]
pub enum Answer {
    Value { value: Option<String> },
    Items { items: Vec<(String, String)> },
}

impl StateMachine for Kv {
    type Command = Command;
    type Output = Output;
    type Query = Query;
    type Answer = Answer;

    fn apply(&mut self, _ctx: &mut Context, command: Command) -> Result<Output, String> {
        Ok(match command {
            Command::Put { key, value } => Output::Prev {
                prev: self.items.insert(key, value),
            },
            Command::Delete { key } => Output::Prev {
                prev: self.items.remove(&key),
            },
            Command::Cas { key, from, to } => {
                if self.items.get(&key) == from.as_ref() {
                    self.items.insert(key, to.clone());
                    Output::Cas {
                        ok: true,
                        value: Some(to),
                    }
                } else {
                    Output::Cas {
                        ok: false,
                        value: self.items.get(&key).cloned(),
                    }
                }
            }
        })
    }

    fn query(&self, query: Query) -> Result<Answer, String> {
        Ok(match query {
            Query::Get { key } => Answer::Value {
                value: self.items.get(&key).cloned(),
            },
            Query::Scan { prefix } => Answer::Items {
                items: self
                    .items
                    .range(prefix.clone()..)
                    .take_while(|(k, _)| k.starts_with(&prefix))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            },
        })
    }
}

lockstep_guest::export!(Kv);
