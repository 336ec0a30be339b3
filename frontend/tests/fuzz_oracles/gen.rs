//! Generators for the deterministic harness (structure-aware random inputs).

use blockrep_frontend::proto::*;

use super::common::{BLOCK, EXPORT, MAX_OPTION_LEN, OTHER_EXPORT, VOLUME_SIZE};

/// SplitMix64: tiny, deterministic, good enough for test inputs.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// True with probability pct/100.
    pub fn pct(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(n);
        out
    }
    /// `min + below(spread)` random bytes.
    pub fn junk(&mut self, min: usize, spread: u64) -> Vec<u8> {
        let n = min + self.below(spread) as usize;
        self.bytes(n)
    }
}

fn put_header(out: &mut Vec<u8>, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) {
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&cmd.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// One transmission request, mostly well-formed. `in_volume` keeps offsets and lengths
/// mostly inside a `VOLUME_SIZE` volume (for the server harness).
pub fn request(rng: &mut Rng, out: &mut Vec<u8>, in_volume: bool) {
    let cmd: u16 = match rng.below(20) {
        0..=7 => CMD_WRITE,
        8..=11 => CMD_READ,
        12..=18 => rng.below(8) as u16,
        _ => rng.next_u64() as u16,
    };
    let flags: u16 = match rng.below(10) {
        0..=5 => 0,
        6..=8 => 1 << rng.below(5),
        _ => rng.next_u64() as u16,
    };
    let cookie = rng.next_u64();
    let (offset, len) = if in_volume && rng.pct(85) {
        let off = match rng.below(4) {
            0 => 0,
            1 => rng.below(VOLUME_SIZE / BLOCK) * BLOCK,
            _ => rng.below(VOLUME_SIZE),
        };
        let max = (VOLUME_SIZE - off).min(if cmd == CMD_WRITE { 8192 } else { 65536 });
        let len = match rng.below(6) {
            0 => 0,
            1 => max,
            2 => BLOCK.min(max),
            _ => rng.below(max + 1),
        };
        (off, len as u32)
    } else if in_volume && rng.pct(70) {
        // Just past the end, or wrapping around.
        let off = match rng.below(3) {
            0 => VOLUME_SIZE - rng.below(BLOCK),
            1 => VOLUME_SIZE + rng.below(2),
            _ => u64::MAX - rng.below(BLOCK),
        };
        (off, rng.below(2 * BLOCK) as u32 + 1)
    } else {
        let len = match rng.below(10) {
            0..=5 => rng.below(600) as u32,
            6 => MAX_PAYLOAD,
            7 => MAX_PAYLOAD + 1 + rng.below(16) as u32,
            8 => u32::MAX - rng.below(4) as u32,
            _ => rng.next_u64() as u32,
        };
        (rng.next_u64() >> rng.below(64), len)
    };
    put_header(out, flags, cmd, cookie, offset, len);
    if cmd == CMD_WRITE {
        // Whole payload when it is small; a prefix otherwise (the stream then ends
        // mid-payload, which is the interesting case for a huge length anyway).
        let n = if len <= 8192 {
            len as usize
        } else {
            rng.below(4096) as usize
        };
        out.extend(rng.bytes(n));
    }
}

/// Mutates a stream a little: flip a byte, cut it short, or splice in garbage.
pub fn mutate(rng: &mut Rng, out: &mut Vec<u8>) {
    if out.is_empty() {
        return;
    }
    match rng.below(3) {
        0 => {
            let i = rng.below(out.len() as u64) as usize;
            out[i] ^= 1 << rng.below(8);
        }
        1 => {
            let n = rng.below(out.len() as u64) as usize;
            out.truncate(n);
        }
        _ => {
            let i = rng.below(out.len() as u64) as usize;
            let junk = rng.junk(1, 8);
            out.splice(i..i, junk);
        }
    }
}

/// A decoder case: (stream, split sizes).
pub fn decoder_case(rng: &mut Rng) -> (Vec<u8>, Vec<usize>) {
    let mut stream = Vec::new();
    match rng.below(20) {
        // Pure garbage.
        0 => stream = rng.junk(0, 200),
        _ => {
            for _ in 0..rng.below(8) {
                request(rng, &mut stream, false);
            }
            if rng.pct(25) {
                mutate(rng, &mut stream);
            }
        }
    }
    let splits = (0..rng.below(6))
        .map(|_| match rng.below(10) {
            0 => 0,
            1..=6 => rng.below(32) as usize + 1,
            _ => rng.below(1024) as usize + 1,
        })
        .collect();
    (stream, splits)
}

fn option(out: &mut Vec<u8>, opt: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn name(rng: &mut Rng) -> Vec<u8> {
    match rng.below(6) {
        0 => Vec::new(),
        1 | 2 => EXPORT.as_bytes().to_vec(),
        3 => OTHER_EXPORT.as_bytes().to_vec(),
        4 => b"nope".to_vec(),
        _ => rng.junk(0, 20),
    }
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// A whole client byte stream: flags, options, and after a GO, transmission requests.
pub fn handshake_case(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    let flags: u32 = match rng.below(20) {
        0..=13 => FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES,
        14..=16 => FLAG_C_FIXED_NEWSTYLE,
        17 => 0,
        _ => rng.next_u64() as u32,
    };
    out.extend_from_slice(&flags.to_be_bytes());
    let mut went = false;
    for _ in 0..rng.below(7) {
        let mut data = Vec::new();
        let opt = match rng.below(24) {
            0..=3 => {
                string(&mut data, &name(rng));
                let n = rng.below(5);
                data.extend_from_slice(&(n as u16).to_be_bytes());
                for _ in 0..n {
                    let t = if rng.pct(80) {
                        rng.below(4)
                    } else {
                        rng.next_u64()
                    };
                    data.extend_from_slice(&(t as u16).to_be_bytes());
                }
                if rng.pct(70) {
                    went = true;
                    OPT_GO
                } else {
                    OPT_INFO
                }
            }
            4..=6 => OPT_STRUCTURED_REPLY,
            7..=10 => {
                string(&mut data, &name(rng));
                let queries: Vec<Vec<u8>> = (0..rng.below(4))
                    .map(|_| match rng.below(5) {
                        0 | 1 => b"base:allocation".to_vec(),
                        2 => b"base:".to_vec(),
                        3 => b"qemu:dirty-bitmap:x".to_vec(),
                        _ => rng.junk(0, 12),
                    })
                    .collect();
                data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
                for q in &queries {
                    string(&mut data, q);
                }
                if rng.pct(60) {
                    OPT_SET_META_CONTEXT
                } else {
                    OPT_LIST_META_CONTEXT
                }
            }
            11 | 12 => OPT_LIST,
            13 => OPT_ABORT,
            14 => OPT_STARTTLS,
            15 => {
                data = name(rng);
                went = true;
                OPT_EXPORT_NAME
            }
            16..=18 => [4, 11, 12, 0, 0xffff_ffff][rng.below(5) as usize],
            _ => rng.next_u64() as u32,
        };
        if rng.pct(5) {
            // Data the option does not expect.
            data.extend(rng.junk(1, 6));
        }
        option(&mut out, opt, &data);
        if rng.pct(3) {
            // A length the server must refuse without allocating it.
            let at = out.len() - data.len() - 4;
            let huge = (MAX_OPTION_LEN as u32 + 1).max(rng.next_u64() as u32);
            out[at..at + 4].copy_from_slice(&huge.to_be_bytes());
        }
        if went {
            break;
        }
    }
    if went {
        for _ in 0..rng.below(10) {
            request(rng, &mut out, true);
        }
        if rng.pct(30) {
            put_header(&mut out, 0, CMD_DISC, rng.next_u64(), 0, 0);
        }
    }
    if rng.pct(10) {
        mutate(rng, &mut out);
    }
    out
}
