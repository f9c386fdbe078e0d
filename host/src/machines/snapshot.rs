//! The node's machines as one snapshot: for every deployed machine, in name order, its name,
//! version, module bytes and guest state (what its `snapshot` export returned). Self-contained,
//! so a replica that never saw a deploy (it was compacted away) gets the module with the state.
//!
//! Layout (integers little-endian): `LKMS`, format version (1 byte), applied index (u64),
//! machine count (u32), then per machine: name (u32 length + UTF-8), version (u64), module
//! (u64 length + bytes), state (u64 length + bytes).

const MAGIC: &[u8; 4] = b"LKMS";
const FORMAT: u8 = 1;

/// One machine as a snapshot holds it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Saved<'a> {
    pub name: &'a str,
    pub version: u64,
    pub module: &'a [u8],
    pub state: &'a [u8],
}

/// Builds a snapshot machine by machine.
pub(super) struct Writer(Vec<u8>);

impl Writer {
    pub fn new(applied_index: u64, machines: usize) -> Writer {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.push(FORMAT);
        out.extend_from_slice(&applied_index.to_le_bytes());
        out.extend_from_slice(&(machines as u32).to_le_bytes());
        Writer(out)
    }

    pub fn machine(&mut self, m: &Saved) {
        let out = &mut self.0;
        out.extend_from_slice(&(m.name.len() as u32).to_le_bytes());
        out.extend_from_slice(m.name.as_bytes());
        out.extend_from_slice(&m.version.to_le_bytes());
        for bytes in [m.module, m.state] {
            out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            out.extend_from_slice(bytes);
        }
    }

    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// The applied index and the machines of a snapshot; an error says what is wrong with it.
pub(super) fn decode(bytes: &[u8]) -> Result<(u64, Vec<Saved<'_>>), String> {
    let mut r = Reader(bytes);
    if r.take(4)? != MAGIC {
        return Err("not a snapshot of machines (bad magic)".into());
    }
    let format = r.take(1)?[0];
    if format != FORMAT {
        return Err(format!(
            "snapshot format {format}, this release reads {FORMAT}"
        ));
    }
    let applied = r.u64()?;
    let count = r.u32()?;
    let mut machines = Vec::new();
    for _ in 0..count {
        let len = r.u32()? as u64;
        let name = std::str::from_utf8(r.take(len)?).map_err(|_| "a machine name is not UTF-8")?;
        let version = r.u64()?;
        let len = r.u64()?;
        let module = r.take(len)?;
        let len = r.u64()?;
        let state = r.take(len)?;
        machines.push(Saved {
            name,
            version,
            module,
            state,
        });
    }
    if !r.0.is_empty() {
        return Err(format!("{} bytes after the last machine", r.0.len()));
    }
    Ok((applied, machines))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: impl TryInto<usize>) -> Result<&'a [u8], String> {
        let n = n.try_into().map_err(|_| "a length beyond memory")?;
        if n > self.0.len() {
            return Err("snapshot cut short".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4usize)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut w = [0u8; 8];
        w.copy_from_slice(self.take(8usize)?);
        Ok(u64::from_le_bytes(w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machines_round_trip_and_garbage_is_an_error() {
        let a = Saved {
            name: "a",
            version: 2,
            module: b"\0asm-a",
            state: b"{\"n\":1}",
        };
        let b = Saved {
            name: "counter",
            version: 1,
            module: b"\0asm-b",
            state: b"",
        };
        let mut w = Writer::new(42, 2);
        w.machine(&a);
        w.machine(&b);
        let bytes = w.finish();
        assert_eq!(decode(&bytes), Ok((42, vec![a, b])));
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(decode(&long).is_err());
        // A count or length far beyond the bytes is refused without allocating for it.
        let mut huge = Writer::new(1, u32::MAX as usize).finish();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge).is_err());
    }
}
