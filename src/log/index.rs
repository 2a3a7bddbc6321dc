//! Sparse per-segment index: every N-th record's offset and byte position, so a reader can
//! start at any offset without scanning the segment from its start.
//!
//! `<first offset>.idx` beside each sealed segment: `magic | version | count | segment length
//! | (offset, position)* | CRC32C`. An index is trusted only if its checksum holds and it
//! covers exactly the segment's current length; otherwise it is stale and rebuilt by a scan.

use std::path::{Path, PathBuf};

use super::LogError;

const INDEX_MAGIC: [u8; 8] = *b"CAIRNIDX";
const INDEX_VERSION: u32 = 1;
const INDEX_HEADER_LEN: usize = 24;

/// The sparse index of one segment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SparseIndex {
    /// Length of the segment file the index describes.
    pub segment_len: u64,
    /// `(offset, byte position)` pairs in increasing order.
    pub entries: Vec<(u64, u64)>,
}

impl SparseIndex {
    /// The index file of a segment file.
    pub fn path_for(segment: &Path) -> PathBuf {
        segment.with_extension("idx")
    }

    /// Loads an index if it is present, intact and not stale. An index covering a prefix of
    /// the segment is still right for that prefix — segments only grow, and whoever truncates
    /// a segment deletes its index first — but one claiming more than the segment holds is
    /// stale.
    pub fn load(path: &Path, segment_len: u64) -> Option<SparseIndex> {
        let bytes = std::fs::read(path).ok()?;
        let index = Self::decode(&bytes)?;
        (index.segment_len <= segment_len).then_some(index)
    }

    fn decode(bytes: &[u8]) -> Option<SparseIndex> {
        if bytes.len() < INDEX_HEADER_LEN + 4 || bytes[0..8] != INDEX_MAGIC {
            return None;
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if u32::from_le_bytes(crc.try_into().ok()?) != super::format::crc32c(body) {
            return None;
        }
        if u32::from_le_bytes(body[8..12].try_into().ok()?) != INDEX_VERSION {
            return None;
        }
        let count = u32::from_le_bytes(body[12..16].try_into().ok()?) as usize;
        let segment_len = u64::from_le_bytes(body[16..24].try_into().ok()?);
        let pairs = &body[INDEX_HEADER_LEN..];
        if pairs.len() != count.checked_mul(16)? {
            return None;
        }
        let entries = pairs
            .chunks_exact(16)
            .map(|c| {
                let mut off = [0u8; 8];
                let mut pos = [0u8; 8];
                off.copy_from_slice(&c[0..8]);
                pos.copy_from_slice(&c[8..16]);
                (u64::from_le_bytes(off), u64::from_le_bytes(pos))
            })
            .collect();
        Some(SparseIndex {
            segment_len,
            entries,
        })
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(INDEX_HEADER_LEN + self.entries.len() * 16 + 4);
        out.extend_from_slice(&INDEX_MAGIC);
        out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.segment_len.to_le_bytes());
        for (offset, pos) in &self.entries {
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&pos.to_le_bytes());
        }
        let crc = super::format::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Writes the index atomically (temporary file, then rename). The index is a cache: a
    /// crash in between only leaves it to be rebuilt.
    pub fn write(&self, path: &Path) -> Result<(), LogError> {
        let tmp = path.with_extension("idx.tmp");
        std::fs::write(&tmp, self.encode()).map_err(|e| LogError::io(&tmp, "write index", e))?;
        std::fs::rename(&tmp, path).map_err(|e| LogError::io(path, "rename index", e))
    }

    /// The entry with the greatest offset not above `offset`.
    pub fn seek(&self, offset: u64) -> Option<(u64, u64)> {
        let i = self.entries.partition_point(|&(o, _)| o <= offset);
        i.checked_sub(1).map(|i| self.entries[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_detects_staleness_and_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("00000000000000000000.idx");
        let index = SparseIndex {
            segment_len: 1000,
            entries: vec![(0, 32), (256, 500), (512, 900)],
        };
        index.write(&path).expect("write");
        assert_eq!(SparseIndex::load(&path, 1000), Some(index.clone()));
        assert_eq!(SparseIndex::load(&path, 999), None, "stale length");
        assert_eq!(
            SparseIndex::load(&path, 1001),
            Some(index.clone()),
            "prefix"
        );
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[30] ^= 1;
        std::fs::write(&path, &bytes).expect("write");
        assert_eq!(SparseIndex::load(&path, 1000), None, "damaged");
        assert_eq!(index.seek(300), Some((256, 500)));
        assert_eq!(index.seek(0), Some((0, 32)));
        assert_eq!(SparseIndex::default().seek(5), None);
    }
}
