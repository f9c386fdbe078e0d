//! What a log entry asks of the machine set.
//!
//! Layout: one tag byte, one name-length byte, the machine name, then the rest of the entry is
//! the task payload or the module's bytes. Payloads are sliced out of the entry, never copied.

use bytes::{BufMut, Bytes, BytesMut};

const TASK: u8 = 1;
const DEPLOY: u8 = 2;
const DELETE: u8 = 3;

/// Longest machine name, so a name always fits its one-byte length.
pub const MAX_NAME_LEN: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Apply `payload` through the machine's `on-apply`.
    Task { machine: String, payload: Bytes },
    /// Create the machine, or upgrade it, from a component's bytes.
    Deploy { machine: String, module: Bytes },
    /// Remove the machine and its state.
    Delete { machine: String },
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    #[error("empty entry")]
    Empty,
    #[error("unknown command tag {0}")]
    UnknownTag(u8),
    #[error("entry shorter than its machine name")]
    Truncated,
    #[error("invalid machine name: {0}")]
    BadName(String),
}

/// Machine names appear in URLs and logs: keep them to a safe, short alphabet.
pub fn validate_name(name: &str) -> Result<(), CommandError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        // A long name is not echoed back whole.
        let shown = if name.len() <= 2 * MAX_NAME_LEN {
            format!("{name:?}")
        } else {
            format!("a name of {} bytes", name.len())
        };
        Err(CommandError::BadName(format!(
            "{shown}: use 1 to {MAX_NAME_LEN} of [A-Za-z0-9._-], not starting with '.'"
        )))
    }
}

impl Command {
    /// Encodes a task without building a `Command` first: the hot path of every submission.
    pub fn encode_task(machine: &str, payload: &[u8]) -> Bytes {
        encode(TASK, machine, payload)
    }

    pub fn encode(&self) -> Bytes {
        match self {
            Command::Task { machine, payload } => encode(TASK, machine, payload),
            Command::Deploy { machine, module } => encode(DEPLOY, machine, module),
            Command::Delete { machine } => encode(DELETE, machine, &[]),
        }
    }

    pub fn decode(entry: &Bytes) -> Result<Command, CommandError> {
        let (tag, machine, header) = split(entry)?;
        let machine = machine.to_owned();
        let body = entry.slice(header..);
        match tag {
            TASK => Ok(Command::Task {
                machine,
                payload: body,
            }),
            DEPLOY => Ok(Command::Deploy {
                machine,
                module: body,
            }),
            DELETE => Ok(Command::Delete { machine }),
            t => Err(CommandError::UnknownTag(t)),
        }
    }

    /// The hot path of apply: if `entry` is a well-formed task, its machine's name and where
    /// its payload starts, read in place (no name copied, no `Bytes` cloned).
    pub fn task_header(entry: &[u8]) -> Option<(&str, usize)> {
        match split(entry) {
            Ok((TASK, machine, header)) => Some((machine, header)),
            _ => None,
        }
    }

    /// `task_header` for the next entry of a run of tasks: when the entry is a task for `known`
    /// (a name already validated), only its bytes are compared. Checking every entry's name
    /// again was 6 % of a state-machine thread's time on the batch endpoint.
    pub fn task_header_for(entry: &[u8], known: &str) -> Option<usize> {
        let header = 2 + known.len();
        let same = !known.is_empty()
            && entry.first() == Some(&TASK)
            && entry.get(1).map(|&len| len as usize) == Some(known.len())
            && entry.get(2..header) == Some(known.as_bytes());
        same.then_some(header)
    }
}

/// Tag, validated machine name, and the length of the header before the body.
fn split(entry: &[u8]) -> Result<(u8, &str, usize), CommandError> {
    let (&tag, rest) = entry.split_first().ok_or(CommandError::Empty)?;
    let (&len, rest) = rest.split_first().ok_or(CommandError::Truncated)?;
    let name = rest.get(..len as usize).ok_or(CommandError::Truncated)?;
    let machine =
        std::str::from_utf8(name).map_err(|_| CommandError::BadName("not utf-8".into()))?;
    validate_name(machine)?;
    Ok((tag, machine, 2 + name.len()))
}

fn encode(tag: u8, machine: &str, body: &[u8]) -> Bytes {
    // Callers validate names first; clamp anyway so the length byte can never lie.
    let name = &machine.as_bytes()[..machine.len().min(MAX_NAME_LEN)];
    let mut out = BytesMut::with_capacity(2 + name.len() + body.len());
    out.put_u8(tag);
    out.put_u8(name.len() as u8);
    out.put_slice(name);
    out.put_slice(body);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_reads_its_own_tasks_and_nothing_else() {
        let task = Command::Task {
            machine: "counter".into(),
            payload: Bytes::from_static(b"{}"),
        }
        .encode();
        assert_eq!(Command::task_header(&task), Some(("counter", 9)));
        assert_eq!(Command::task_header_for(&task, "counter"), Some(9));
        for (entry, known) in [
            (&task[..], "count"),
            (&task[..], "counters"),
            (&task[..], ""),
            (&task[..5], "counter"),
            (&[][..], "counter"),
        ] {
            assert_eq!(
                Command::task_header_for(entry, known),
                None,
                "{entry:?} {known}"
            );
        }
        let delete = Command::Delete {
            machine: "counter".into(),
        }
        .encode();
        assert_eq!(Command::task_header_for(&delete, "counter"), None);
    }

    #[test]
    fn roundtrips() {
        for c in [
            Command::Task {
                machine: "counter".into(),
                payload: Bytes::from_static(br#"{"add":1}"#),
            },
            Command::Deploy {
                machine: "kv-2".into(),
                module: Bytes::from_static(b"\0asm"),
            },
            Command::Delete {
                machine: "a.b_c".into(),
            },
        ] {
            assert_eq!(Command::decode(&c.encode()), Ok(c));
        }
    }

    #[test]
    fn task_header_agrees_with_decode() {
        let task = Command::encode_task("counter", br#"{"add":1}"#);
        let (machine, header) = Command::task_header(&task).expect("a task");
        assert_eq!(machine, "counter");
        assert_eq!(&task[header..], br#"{"add":1}"#);
        let deploy = Command::Deploy {
            machine: "counter".into(),
            module: Bytes::from_static(b"\0asm"),
        };
        assert_eq!(Command::task_header(&deploy.encode()), None);
        for garbage in [
            &b""[..],
            b"\x01",
            b"\x01\x09short",
            b"\x01\x01\xff",
            b"\x01\x01.",
        ] {
            assert_eq!(Command::task_header(garbage), None, "{garbage:?}");
            assert!(Command::decode(&Bytes::copy_from_slice(garbage)).is_err());
        }
    }

    #[test]
    fn refuses_garbage() {
        assert_eq!(Command::decode(&Bytes::new()), Err(CommandError::Empty));
        assert_eq!(
            Command::decode(&Bytes::from_static(&[1, 9, b'a'])),
            Err(CommandError::Truncated)
        );
        assert_eq!(
            Command::decode(&Bytes::from_static(&[9, 1, b'a'])),
            Err(CommandError::UnknownTag(9))
        );
        assert!(Command::decode(&Bytes::from_static(&[1, 2, b'.', b'/'])).is_err());
    }

    #[test]
    fn names() {
        assert!(validate_name("counter").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("../etc").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name(&"x".repeat(65)).is_err());
        let refused = validate_name(&"x".repeat(10_000)).expect_err("too long");
        assert!(
            refused.to_string().contains("a name of 10000 bytes"),
            "not echoed whole: {refused}"
        );
    }
}
