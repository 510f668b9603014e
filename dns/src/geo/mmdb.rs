//! A small writer for the MaxMind DB format (version 2.0).
//!
//! The layout follows the MaxMind DB spec: a binary search tree (here always
//! an IPv6 tree with 32-bit records, IPv4 networks living under `::/96`), a
//! 16-byte zero separator, the data section, then the metadata marker
//! `\xAB\xCD\xEFMaxMind.com` followed by the metadata map.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;

/// A value in the MaxMind DB data section (the subset this writer needs).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Value {
    /// UTF-8 string (type 2).
    String(String),
    /// IEEE-754 double (type 3).
    Double(f64),
    /// Unsigned 16-bit integer (type 5).
    U16(u16),
    /// Unsigned 32-bit integer (type 6).
    U32(u32),
    /// Unsigned 64-bit integer (type 9).
    U64(u64),
    /// Map with string keys (type 7). Keys are emitted in sorted order.
    Map(BTreeMap<String, Value>),
    /// Array (type 11).
    Array(Vec<Value>),
    /// Boolean (type 14).
    Bool(bool),
}

/// Errors from building a database.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MmdbError {
    /// The tree or data section grew past what 32-bit records can address.
    #[error("database too large for 32-bit records")]
    TooLarge,
    /// A value could not be encoded (size out of range).
    #[error("value too large to encode: {0}")]
    ValueTooLarge(&'static str),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Child {
    Empty,
    Node(u32),
    Data(u32),
}

/// Builds a MaxMind DB in memory.
///
/// Networks are inserted with [`Writer::insert`]; when networks overlap, the
/// more specific one wins regardless of insertion order, and among equal
/// networks the last inserted wins.
#[derive(Debug)]
pub struct Writer {
    database_type: String,
    description: String,
    entries: Vec<(IpNet, usize)>,
    values: Vec<Vec<u8>>,
    dedup: HashMap<Vec<u8>, usize>,
    build_epoch: u64,
}

impl Writer {
    /// A writer for a database of the given type (e.g. `GeoLite2-City`).
    pub fn new(database_type: &str, description: &str) -> Self {
        Self {
            database_type: database_type.to_owned(),
            description: description.to_owned(),
            entries: Vec::new(),
            values: Vec::new(),
            dedup: HashMap::new(),
            build_epoch: 0,
        }
    }

    /// Set the build time recorded in the metadata (seconds since the epoch).
    pub fn set_build_epoch(&mut self, epoch: u64) {
        self.build_epoch = epoch;
    }

    /// Insert `net` -> `value`.
    pub fn insert(&mut self, net: IpNet, value: &Value) -> Result<(), MmdbError> {
        let mut buf = Vec::new();
        encode(value, &mut buf)?;
        let idx = match self.dedup.get(&buf) {
            Some(i) => *i,
            None => {
                let i = self.values.len();
                self.values.push(buf.clone());
                self.dedup.insert(buf, i);
                i
            }
        };
        self.entries.push((net.trunc(), idx));
        Ok(())
    }

    /// Serialise the database.
    pub fn build(&self) -> Result<Vec<u8>, MmdbError> {
        // Data section: each distinct value once.
        let mut data = Vec::new();
        let mut offsets = Vec::with_capacity(self.values.len());
        for v in &self.values {
            offsets.push(u32::try_from(data.len()).map_err(|_| MmdbError::TooLarge)?);
            data.extend_from_slice(v);
        }

        // Tree: insert less specific networks first so that more specific
        // ones split them.
        let mut order: Vec<usize> = (0..self.entries.len()).collect();
        order.sort_by_key(|&i| bits_of(&self.entries[i].0).1);
        let mut nodes: Vec<[Child; 2]> = vec![[Child::Empty, Child::Empty]];
        for i in order {
            let (net, value_idx) = &self.entries[i];
            let (bits, len) = bits_of(net);
            let leaf = Child::Data(offsets[*value_idx]);
            if len == 0 {
                // The whole address space: both halves of the root.
                push_down(&mut nodes, 0, leaf);
                continue;
            }
            let mut node = 0usize;
            for depth in 0..len {
                let bit = ((bits >> (127 - depth)) & 1) as usize;
                if depth + 1 == len {
                    match nodes[node][bit] {
                        Child::Node(n) => push_down(&mut nodes, n as usize, leaf),
                        _ => nodes[node][bit] = leaf,
                    }
                    break;
                }
                node = match nodes[node][bit] {
                    Child::Node(n) => n as usize,
                    other => {
                        // Empty or a less specific leaf: split it.
                        let n = nodes.len();
                        nodes.push([other, other]);
                        nodes[node][bit] =
                            Child::Node(u32::try_from(n).map_err(|_| MmdbError::TooLarge)?);
                        n
                    }
                };
            }
        }

        let node_count = u32::try_from(nodes.len()).map_err(|_| MmdbError::TooLarge)?;
        let record = |c: Child| -> Result<u32, MmdbError> {
            Ok(match c {
                Child::Empty => node_count,
                Child::Node(n) => n,
                Child::Data(off) => node_count
                    .checked_add(16)
                    .and_then(|v| v.checked_add(off))
                    .ok_or(MmdbError::TooLarge)?,
            })
        };
        let mut out = Vec::with_capacity(nodes.len() * 8 + 16 + data.len() + 256);
        for n in &nodes {
            out.extend_from_slice(&record(n[0])?.to_be_bytes());
            out.extend_from_slice(&record(n[1])?.to_be_bytes());
        }
        out.extend_from_slice(&[0u8; 16]);
        out.extend_from_slice(&data);
        out.extend_from_slice(b"\xAB\xCD\xEFMaxMind.com");

        let mut meta = BTreeMap::new();
        meta.insert("binary_format_major_version".into(), Value::U16(2));
        meta.insert("binary_format_minor_version".into(), Value::U16(0));
        meta.insert("build_epoch".into(), Value::U64(self.build_epoch));
        meta.insert(
            "database_type".into(),
            Value::String(self.database_type.clone()),
        );
        let mut desc = BTreeMap::new();
        desc.insert("en".into(), Value::String(self.description.clone()));
        meta.insert("description".into(), Value::Map(desc));
        meta.insert("ip_version".into(), Value::U16(6));
        meta.insert(
            "languages".into(),
            Value::Array(vec![Value::String("en".into())]),
        );
        meta.insert("node_count".into(), Value::U32(node_count));
        meta.insert("record_size".into(), Value::U16(32));
        encode(&Value::Map(meta), &mut out)?;
        Ok(out)
    }
}

/// Fill every empty record in the subtree under `node` with `leaf` (used when
/// a network covers already-inserted more specific ones, which keep their
/// own data).
fn push_down(nodes: &mut [[Child; 2]], node: usize, leaf: Child) {
    let mut stack = vec![node];
    while let Some(n) = stack.pop() {
        for slot in nodes[n].iter_mut() {
            match *slot {
                Child::Node(c) => stack.push(c as usize),
                Child::Empty => *slot = leaf,
                Child::Data(_) => {}
            }
        }
    }
}

/// The network as 128 bits (IPv4 under `::/96`) and its prefix length in
/// that space.
fn bits_of(net: &IpNet) -> (u128, usize) {
    match net {
        IpNet::V4(n) => (
            u128::from(u32::from(n.network())),
            96 + usize::from(n.prefix_len()),
        ),
        IpNet::V6(n) => (u128::from(n.network()), usize::from(n.prefix_len())),
    }
}

fn control(type_num: u8, size: usize, out: &mut Vec<u8>) -> Result<(), MmdbError> {
    let (first, extra): (u8, Vec<u8>) = if size < 29 {
        (size as u8, vec![])
    } else if size < 29 + 256 {
        (29, vec![(size - 29) as u8])
    } else if size < 285 + 65536 {
        let s = size - 285;
        (30, vec![(s >> 8) as u8, s as u8])
    } else if size < 65821 + (1 << 24) {
        let s = size - 65821;
        (31, vec![(s >> 16) as u8, (s >> 8) as u8, s as u8])
    } else {
        return Err(MmdbError::ValueTooLarge("size"));
    };
    if type_num <= 7 {
        out.push((type_num << 5) | first);
    } else {
        out.push(first);
        out.push(type_num - 7);
    }
    out.extend_from_slice(&extra);
    Ok(())
}

fn uint(type_num: u8, v: u64, max_bytes: usize, out: &mut Vec<u8>) -> Result<(), MmdbError> {
    let bytes = v.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    let payload = &bytes[skip..];
    if payload.len() > max_bytes {
        return Err(MmdbError::ValueTooLarge("integer"));
    }
    control(type_num, payload.len(), out)?;
    out.extend_from_slice(payload);
    Ok(())
}

/// Encode one value in the data-section format.
pub fn encode(value: &Value, out: &mut Vec<u8>) -> Result<(), MmdbError> {
    match value {
        Value::String(s) => {
            control(2, s.len(), out)?;
            out.extend_from_slice(s.as_bytes());
        }
        Value::Double(d) => {
            control(3, 8, out)?;
            out.extend_from_slice(&d.to_be_bytes());
        }
        Value::U16(v) => uint(5, u64::from(*v), 2, out)?,
        Value::U32(v) => uint(6, u64::from(*v), 4, out)?,
        Value::U64(v) => uint(9, *v, 8, out)?,
        Value::Map(m) => {
            control(7, m.len(), out)?;
            for (k, v) in m {
                control(2, k.len(), out)?;
                out.extend_from_slice(k.as_bytes());
                encode(v, out)?;
            }
        }
        Value::Array(a) => {
            control(11, a.len(), out)?;
            for v in a {
                encode(v, out)?;
            }
        }
        Value::Bool(b) => control(14, usize::from(*b), out)?,
    }
    Ok(())
}

/// Convenience: does `ip` fall in `net`, treating IPv4-mapped IPv6 as IPv4.
pub fn contains(net: &IpNet, ip: IpAddr) -> bool {
    net.contains(&super::normalize(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_sizes() {
        let mut out = Vec::new();
        control(2, 3, &mut out).expect("encode");
        assert_eq!(out, vec![0x43]);
        out.clear();
        control(2, 100, &mut out).expect("encode");
        assert_eq!(out, vec![0x5d, 71]);
        out.clear();
        control(11, 2, &mut out).expect("encode");
        assert_eq!(out, vec![0x02, 4]);
        out.clear();
        control(2, 300, &mut out).expect("encode");
        assert_eq!(out, vec![0x5e, 0, 15]);
    }

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Rec {
        s: String,
        n: u32,
        d: f64,
    }

    #[test]
    fn maxminddb_reads_what_we_write() {
        let mut w = Writer::new("Test", "test db");
        let mut m = BTreeMap::new();
        m.insert("s".into(), Value::String("x".repeat(40)));
        m.insert("n".into(), Value::U32(70_000));
        m.insert("d".into(), Value::Double(-1.5));
        m.insert("b".into(), Value::Bool(true));
        m.insert(
            "arr".into(),
            Value::Array(vec![Value::U16(1), Value::U64(1 << 40)]),
        );
        w.insert("10.0.0.0/8".parse().expect("net"), &Value::Map(m.clone()))
            .expect("insert");
        m.insert("n".into(), Value::U32(1));
        w.insert("10.1.0.0/16".parse().expect("net"), &Value::Map(m.clone()))
            .expect("insert");
        w.insert("2001:db8::/32".parse().expect("net"), &Value::Map(m))
            .expect("insert");
        let bytes = w.build().expect("build");
        let r = maxminddb::Reader::from_source(bytes).expect("reader");
        r.verify().expect("verify");
        let look = |ip: &str| {
            let res = r.lookup(ip.parse().expect("ip")).expect("lookup");
            let net = res.network().expect("network");
            (res.decode::<Rec>().expect("decode"), net.prefix())
        };
        let (rec, p) = look("10.2.3.4");
        assert_eq!(rec.expect("found").n, 70_000);
        // The tree leaf, not the inserted /8: 10.1/16 split it, so the data
        // is found at depth 15 (10.2.0.0/15), as in MaxMind's own databases.
        assert_eq!(p, 15);
        let (rec, p) = look("10.1.3.4");
        assert_eq!(rec.expect("found").n, 1);
        assert_eq!(p, 16);
        let (rec, _) = look("11.0.0.1");
        assert!(rec.is_none());
        let (rec, p) = look("2001:db8:1::1");
        assert_eq!(rec.expect("found").d, -1.5);
        assert_eq!(p, 32);
    }

    #[test]
    fn less_specific_after_more_specific_does_not_clobber() {
        let mut w = Writer::new("Test", "t");
        let v = |n: u32| {
            let mut m = BTreeMap::new();
            m.insert("n".into(), Value::U32(n));
            m.insert("s".into(), Value::String(String::new()));
            m.insert("d".into(), Value::Double(0.0));
            Value::Map(m)
        };
        // Same prefix length ordering is stable; /16 inserted before /8.
        w.insert("10.1.0.0/16".parse().expect("net"), &v(1))
            .expect("insert");
        w.insert("10.0.0.0/8".parse().expect("net"), &v(2))
            .expect("insert");
        w.insert("0.0.0.0/0".parse().expect("net"), &v(3))
            .expect("insert");
        let r = maxminddb::Reader::from_source(w.build().expect("build")).expect("reader");
        let n = |ip: &str| {
            r.lookup(ip.parse().expect("ip"))
                .expect("lookup")
                .decode::<Rec>()
                .expect("decode")
                .map(|x| x.n)
        };
        assert_eq!(n("10.1.2.3"), Some(1));
        assert_eq!(n("10.9.2.3"), Some(2));
        assert_eq!(n("192.0.2.1"), Some(3));
    }
}
