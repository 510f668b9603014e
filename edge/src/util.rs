//! Small utilities shared by several layers, with no dependencies of their own.

/// 64-bit FNV-1a with a final avalanche; stable across processes and
/// versions, so every POP hashes a URL to the same origin.
pub fn hash64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64 finaliser.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// A boxed error of any kind, as bodies and causes carry them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
