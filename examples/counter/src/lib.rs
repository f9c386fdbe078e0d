//! `counter`: the smallest useful machine. `{"add": n}` → `{"value": v}` (the value after
//! adding); any query → `{"value": v}`.

use lockstep_guest::{Context, StateMachine};
use serde::{Deserialize, Serialize};

#[derive(Default, Serialize, Deserialize)]
pub struct Counter {
    value: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    Add(i64),
}

#[derive(Serialize)]
pub struct Value {
    value: i64,
}

impl StateMachine for Counter {
    type Command = Command;
    type Output = Value;
    type Query = ();
    type Answer = Value;

    fn apply(&mut self, _ctx: &mut Context, command: Command) -> Result<Value, String> {
        let Command::Add(n) = command;
        self.value = self.value.checked_add(n).ok_or("counter overflow")?;
        Ok(Value { value: self.value })
    }

    fn query(&self, _query: ()) -> Result<Value, String> {
        Ok(Value { value: self.value })
    }

    fn decode_query(_request: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

lockstep_guest::export!(Counter);
