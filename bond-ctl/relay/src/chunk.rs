//! A file cut into chunks for distribution: the manifest that names every
//! chunk by its BLAKE3 hash (and is itself named by its hash, the root),
//! and the seal each chunk travels in: zstd, then XChaCha20-Poly1305 under
//! a key derived from the community key.
//!
//! A terminal fetches the manifest first and checks it against the root
//! in its transport request; then each chunk is opened (authenticated,
//! decompressed within the chunk size) and checked against its hash
//! before it is stored or relayed. A relay cannot pass on a chunk that
//! does not match without being caught at the next hop.

use std::io::Read;

use bond_proto::CommunityKey;

use chacha20poly1305::{
    XChaCha20Poly1305, XNonce,
    aead::{Aead, KeyInit, Payload},
};

/// Manifest encoding version ("BDM" + 1).
const MAGIC: &[u8; 4] = b"BDM1";
/// Largest chunk accepted: 16 MiB.
pub const MAX_CHUNK: u32 = 16 << 20;
/// Default chunk size: 256 KiB (small enough that relays start early,
/// large enough that per-chunk costs vanish).
pub const DEFAULT_CHUNK: u32 = 256 << 10;
/// Longest file name in a manifest.
pub const MAX_NAME: usize = 255;
/// The compression and encryption every chunk travels in, as transport
/// requests name them.
pub const COMPRESSION: &str = "zstd";
pub const ENCRYPTION: &str = "xchacha20poly1305";

pub type Hash = [u8; 32];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("manifest: {0}")]
    Manifest(&'static str),
    #[error("manifest does not match the root hash")]
    WrongRoot,
    #[error("chunk {0}: failed authentication (wrong key, or changed on the way)")]
    Unauthentic(u32),
    #[error("chunk {0}: does not decompress to at most the chunk size")]
    BadCompression(u32),
    #[error("chunk {0}: hash mismatch")]
    HashMismatch(u32),
    #[error("chunk {0}: out of range")]
    NoSuchChunk(u32),
}

/// What a file is, chunk by chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub name: String,
    pub size: u64,
    pub chunk_size: u32,
    pub chunks: Vec<Hash>,
}

impl Manifest {
    /// Reads `r` to its end, hashing `chunk_size` pieces.
    pub fn build(name: &str, mut r: impl Read, chunk_size: u32) -> std::io::Result<Self> {
        assert!((1..=MAX_CHUNK).contains(&chunk_size), "chunk size");
        let mut buf = vec![0u8; chunk_size as usize];
        let (mut chunks, mut size) = (Vec::new(), 0u64);
        loop {
            let n = read_full(&mut r, &mut buf)?;
            if n == 0 {
                break;
            }
            chunks.push(*blake3::hash(&buf[..n]).as_bytes());
            size += n as u64;
            if n < buf.len() {
                break;
            }
        }
        Ok(Self {
            name: name.chars().take(MAX_NAME).collect(),
            size,
            chunk_size,
            chunks,
        })
    }

    pub fn count(&self) -> u32 {
        self.chunks.len() as u32
    }

    /// Bytes in chunk `i` (the last may be short).
    pub fn len_of(&self, i: u32) -> usize {
        let start = u64::from(i) * u64::from(self.chunk_size);
        (self.size.saturating_sub(start)).min(u64::from(self.chunk_size)) as usize
    }

    pub fn offset_of(&self, i: u32) -> u64 {
        u64::from(i) * u64::from(self.chunk_size)
    }

    /// Whether `data` is chunk `i`.
    pub fn check(&self, i: u32, data: &[u8]) -> Result<(), Error> {
        let want = self.chunks.get(i as usize).ok_or(Error::NoSuchChunk(i))?;
        if data.len() == self.len_of(i) && blake3::hash(data).as_bytes() == want {
            Ok(())
        } else {
            Err(Error::HashMismatch(i))
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let name = self.name.as_bytes();
        let mut b = Vec::with_capacity(4 + 8 + 4 + 2 + name.len() + 32 * self.chunks.len());
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.chunk_size.to_be_bytes());
        b.extend_from_slice(&(name.len() as u16).to_be_bytes());
        b.extend_from_slice(name);
        for h in &self.chunks {
            b.extend_from_slice(h);
        }
        b
    }

    /// The manifest's name: the hash of its encoding.
    pub fn root(&self) -> Hash {
        *blake3::hash(&self.encode()).as_bytes()
    }

    /// Parses an encoding and checks it against `root`.
    pub fn decode(b: &[u8], root: &Hash) -> Result<Self, Error> {
        if blake3::hash(b).as_bytes() != root {
            return Err(Error::WrongRoot);
        }
        let bad = Error::Manifest;
        let rest = b.strip_prefix(MAGIC).ok_or(bad("not a manifest"))?;
        let (size, rest) = take::<8>(rest).ok_or(bad("truncated"))?;
        let (chunk, rest) = take::<4>(rest).ok_or(bad("truncated"))?;
        let (nlen, rest) = take::<2>(rest).ok_or(bad("truncated"))?;
        let (size, chunk_size) = (u64::from_be_bytes(size), u32::from_be_bytes(chunk));
        let nlen = usize::from(u16::from_be_bytes(nlen));
        if !(1..=MAX_CHUNK).contains(&chunk_size) {
            return Err(bad("chunk size out of range"));
        }
        if nlen > MAX_NAME || rest.len() < nlen {
            return Err(bad("bad name"));
        }
        let name = std::str::from_utf8(&rest[..nlen]).map_err(|_| bad("name not UTF-8"))?;
        let hashes = &rest[nlen..];
        let count = size.div_ceil(u64::from(chunk_size));
        if hashes.len() % 32 != 0 || hashes.len() as u64 / 32 != count {
            return Err(bad("chunk count does not match the size"));
        }
        Ok(Self {
            name: name.to_string(),
            size,
            chunk_size,
            chunks: hashes
                .chunks_exact(32)
                .map(|h| h.try_into().expect("32 bytes"))
                .collect(),
        })
    }
}

fn take<const N: usize>(b: &[u8]) -> Option<([u8; N], &[u8])> {
    let (head, rest) = b.split_first_chunk::<N>()?;
    Some((*head, rest))
}

/// Reads until `buf` is full or the reader ends.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Seals and opens chunks under the community key.
pub struct Seal {
    aead: XChaCha20Poly1305,
}

impl Seal {
    pub fn new(community_key: &CommunityKey) -> Self {
        let key = community_key.derive_key("bond 2026 distribution chunk key");
        Self {
            aead: XChaCha20Poly1305::new(&key.into()),
        }
    }

    /// The nonce and associated data of chunk `i` of the file named by
    /// `root`: a chunk is bound to its place, and a nonce is never used
    /// for two different plaintexts.
    fn nonce(root: &Hash, i: u32) -> (XNonce, [u8; 36]) {
        let mut aad = [0u8; 36];
        aad[..32].copy_from_slice(root);
        aad[32..].copy_from_slice(&i.to_be_bytes());
        let n = blake3::hash(&aad);
        (*XNonce::from_slice(&n.as_bytes()[..24]), aad)
    }

    pub fn seal(&self, root: &Hash, i: u32, plain: &[u8]) -> Vec<u8> {
        let packed = zstd::bulk::compress(plain, 3).expect("zstd compresses any input");
        let (nonce, aad) = Self::nonce(root, i);
        self.aead
            .encrypt(
                &nonce,
                Payload {
                    msg: &packed,
                    aad: &aad,
                },
            )
            .expect("encryption of a bounded chunk")
    }

    /// Opens chunk `i` and checks it against the manifest.
    pub fn open(&self, m: &Manifest, root: &Hash, i: u32, sealed: &[u8]) -> Result<Vec<u8>, Error> {
        let (nonce, aad) = Self::nonce(root, i);
        let packed = self
            .aead
            .decrypt(
                &nonce,
                Payload {
                    msg: sealed,
                    aad: &aad,
                },
            )
            .map_err(|_| Error::Unauthentic(i))?;
        let plain = zstd::bulk::decompress(&packed, m.len_of(i).max(1))
            .map_err(|_| Error::BadCompression(i))?;
        m.check(i, &plain)?;
        Ok(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 13) as u8).collect()
    }

    #[test]
    fn manifest_round_trip_and_sizes() {
        for (n, chunk) in [(0, 4), (1, 4), (4, 4), (5, 4), (1000, 64), (1024, 64)] {
            let d = data(n);
            let m = Manifest::build("f.bin", &d[..], chunk).unwrap();
            assert_eq!(m.size, n as u64);
            assert_eq!(m.count() as usize, n.div_ceil(chunk as usize));
            let total: usize = (0..m.count()).map(|i| m.len_of(i)).sum();
            assert_eq!(total, n);
            for i in 0..m.count() {
                let at = m.offset_of(i) as usize;
                m.check(i, &d[at..at + m.len_of(i)]).unwrap();
            }
            let root = m.root();
            assert_eq!(Manifest::decode(&m.encode(), &root).unwrap(), m);
        }
    }

    #[test]
    fn a_manifest_that_does_not_match_its_root_is_refused() {
        let m = Manifest::build("f", &data(300)[..], 64).unwrap();
        let (root, mut b) = (m.root(), m.encode());
        b[20] ^= 1;
        assert_eq!(Manifest::decode(&b, &root), Err(Error::WrongRoot));
        // A well-hashed but inconsistent encoding is refused too.
        let mut lie = m.clone();
        lie.size += 1000;
        let e = lie.encode();
        assert!(matches!(
            Manifest::decode(&e, blake3::hash(&e).as_bytes()),
            Err(Error::Manifest(_))
        ));
        for cut in 0..e.len() {
            let b = &e[..cut];
            assert!(Manifest::decode(b, blake3::hash(b).as_bytes()).is_err());
        }
    }

    #[test]
    fn chunks_verify_and_wrong_ones_are_caught() {
        let d = data(1000);
        let m = Manifest::build("f", &d[..], 256).unwrap();
        assert_eq!(m.check(0, &d[..256]), Ok(()));
        assert_eq!(m.check(1, &d[..256]), Err(Error::HashMismatch(1)));
        assert_eq!(m.check(3, &d[768..]), Ok(()));
        assert_eq!(m.check(3, &d[767..]), Err(Error::HashMismatch(3)));
        assert_eq!(m.check(4, &[]), Err(Error::NoSuchChunk(4)));
    }

    #[test]
    fn sealed_chunks_open_only_with_the_key_in_their_place() {
        let d = data(1000);
        let m = Manifest::build("f", &d[..], 256).unwrap();
        let root = m.root();
        let (s, other) = (
            Seal::new(&CommunityKey::new("community one key")),
            Seal::new(&CommunityKey::new("another key")),
        );
        let sealed = s.seal(&root, 1, &d[256..512]);
        assert_eq!(s.open(&m, &root, 1, &sealed).unwrap(), &d[256..512]);
        assert_eq!(s.seal(&root, 1, &d[256..512]), sealed, "deterministic");
        assert_eq!(
            other.open(&m, &root, 1, &sealed),
            Err(Error::Unauthentic(1))
        );
        assert_eq!(s.open(&m, &root, 2, &sealed), Err(Error::Unauthentic(2)));
        let mut bent = sealed.clone();
        bent[3] ^= 0x80;
        assert_eq!(s.open(&m, &root, 1, &bent), Err(Error::Unauthentic(1)));
        // A relay with the key that seals the wrong data is caught by the hash.
        let liar = s.seal(&root, 1, &d[0..256]);
        assert_eq!(s.open(&m, &root, 1, &liar), Err(Error::HashMismatch(1)));
        // Nor can it make a chunk inflate past the chunk size.
        let bomb = s.seal(&root, 3, &vec![0u8; 100_000]);
        assert_eq!(s.open(&m, &root, 3, &bomb), Err(Error::BadCompression(3)));
        // Compression does its work on compressible data.
        let zeros = Manifest::build("z", &[0u8; 4096][..], 4096).unwrap();
        assert!(s.seal(&zeros.root(), 0, &[0u8; 4096]).len() < 100);
    }
}
