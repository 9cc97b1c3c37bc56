//! A Parquet input in object storage read by ranged GETs: the footer, then each row group's
//! chunk of the one column `corpus prepare` decodes, in one GET per chunk (`prefetch`, before
//! the group is decoded; the decoder's page reads are then served from it). The other columns
//! (FineWeb's metadata, ids, URLs...) are never downloaded and the file is never held whole:
//! memory is bounded by one column chunk, however large the file.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use parquet::errors::ParquetError;
use parquet::file::reader::{ChunkReader, Length};

use crate::store::StoreDir;

/// A sequential read (`ChunkReader::get_read`: the decoder reads a column chunk's pages from
/// it, without saying where the chunk ends) fetches this much first, then twice as much each
/// GET up to `READ_AHEAD_MAX`: a chunk of n bytes costs at most ~2n + 64 KiB of transfer and
/// O(log n) requests, and a stop early in the chunk does not pay for the rest of the file.
const READ_AHEAD_MIN: u64 = 64 << 10;
const READ_AHEAD_MAX: u64 = 8 << 20;

/// Object `name` of `dir`, `size` bytes long, served to the Parquet decoder by ranges.
#[derive(Clone)]
pub(crate) struct ObjectChunks {
    dir: StoreDir,
    name: String,
    size: u64,
    /// Bytes fetched so far, over every clone (the log says how little of a file was read).
    fetched: Arc<AtomicU64>,
    /// The prefetched column chunk: its offset in the object and its bytes.
    chunk: Arc<Mutex<Option<(u64, Bytes)>>>,
}

impl ObjectChunks {
    pub fn new(dir: StoreDir, name: String, size: u64) -> ObjectChunks {
        ObjectChunks { dir, name, size, fetched: Arc::default(), chunk: Arc::default() }
    }

    /// Fetches bytes `start..start + len` in one GET and keeps them (dropping the chunk kept
    /// before) for the reads that fall inside.
    pub fn prefetch(&self, start: u64, len: u64) -> Result<(), ParquetError> {
        *self.chunk.lock().unwrap() = None;
        let end = start.saturating_add(len).min(self.size);
        let got = self.range(start, end)?;
        *self.chunk.lock().unwrap() = Some((start, got));
        Ok(())
    }

    /// Bytes `start..end` from the prefetched chunk, when it holds all of them.
    fn cached(&self, start: u64, end: u64) -> Option<Bytes> {
        let guard = self.chunk.lock().unwrap();
        let (at, bytes) = guard.as_ref()?;
        (start >= *at && end <= at + bytes.len() as u64).then(|| bytes.slice((start - at) as usize..(end - at) as usize))
    }

    pub fn fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    fn range(&self, start: u64, end: u64) -> Result<Bytes, ParquetError> {
        if start > end || end > self.size {
            return Err(ParquetError::EOF(format!("bytes {start}..{end} of a {}-byte object {}", self.size, self.dir.uri_of(&self.name))));
        }
        if start == end {
            return Ok(Bytes::new());
        }
        let got = self.dir.get_range(&self.name, start..end).map_err(|e| ParquetError::External(Box::new(e)))?;
        if got.len() as u64 != end - start {
            // the object changed under the reader (or the store answered short): its footer's
            // offsets no longer describe it
            return Err(ParquetError::General(format!(
                "{}: asked for bytes {start}..{end}, got {}; did the object change while it was read?",
                self.dir.uri_of(&self.name),
                got.len()
            )));
        }
        self.fetched.fetch_add(got.len() as u64, Ordering::Relaxed);
        Ok(got)
    }
}

impl Length for ObjectChunks {
    fn len(&self) -> u64 {
        self.size
    }
}

impl ChunkReader for ObjectChunks {
    type T = SequentialRead;

    fn get_read(&self, start: u64) -> Result<SequentialRead, ParquetError> {
        // inside the prefetched chunk: its rest first, then GETs past it
        let guard = self.chunk.lock().unwrap();
        let buf = match guard.as_ref() {
            Some((at, bytes)) if start >= *at && start < at + bytes.len() as u64 => bytes.slice((start - at) as usize..),
            _ => Bytes::new(),
        };
        drop(guard);
        Ok(SequentialRead { chunks: self.clone(), pos: start + buf.len() as u64, buf, next: READ_AHEAD_MIN })
    }

    fn get_bytes(&self, start: u64, length: usize) -> Result<Bytes, ParquetError> {
        let end = start + length as u64;
        match self.cached(start, end) {
            Some(b) => Ok(b),
            None => self.range(start, end),
        }
    }
}

/// The object from `pos` on, fetched as it is read, `next` bytes by the next GET.
pub(crate) struct SequentialRead {
    chunks: ObjectChunks,
    pos: u64,
    buf: Bytes,
    next: u64,
}

impl Read for SequentialRead {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.buf.is_empty() {
            let end = (self.pos + self.next).min(self.chunks.size);
            if self.pos >= end {
                return Ok(0);
            }
            self.buf = self.chunks.range(self.pos, end).map_err(std::io::Error::other)?;
            self.pos = end;
            self.next = (self.next * 2).min(READ_AHEAD_MAX);
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    use super::*;
    use crate::parquet_input::for_each_text;

    /// A Parquet file of `groups` row groups of `rows` rows: a `text` column of short documents
    /// and a `blob` column of 2 KiB of incompressible bytes per row (the metadata a reader of
    /// `text` must not download).
    fn two_column_file(groups: usize, rows: usize) -> (Vec<u8>, Vec<String>) {
        let schema = Arc::new(parse_message_type("message doc { REQUIRED BYTE_ARRAY text (UTF8); REQUIRED BYTE_ARRAY blob; }").unwrap());
        let mut out = Vec::new();
        let mut texts = Vec::new();
        let mut w = SerializedFileWriter::new(&mut out, schema, Arc::new(WriterProperties::builder().build())).unwrap();
        let mut state = 0x9e3779b97f4a7c15u64;
        for g in 0..groups {
            let text: Vec<String> = (0..rows).map(|r| format!("document {g}.{r}: the quick brown fox")).collect();
            let blob: Vec<ByteArray> = (0..rows)
                .map(|_| {
                    (0..2048)
                        .map(|_| {
                            state ^= state << 13;
                            state ^= state >> 7;
                            state ^= state << 17;
                            state as u8
                        })
                        .collect::<Vec<u8>>()
                        .into()
                })
                .collect();
            let mut rg = w.next_row_group().unwrap();
            let mut col = rg.next_column().unwrap().unwrap();
            let values: Vec<ByteArray> = text.iter().map(|s| s.as_str().into()).collect();
            col.typed::<ByteArrayType>().write_batch(&values, None, None).unwrap();
            col.close().unwrap();
            let mut col = rg.next_column().unwrap().unwrap();
            col.typed::<ByteArrayType>().write_batch(&blob, None, None).unwrap();
            col.close().unwrap();
            rg.close().unwrap();
            texts.extend(text);
        }
        w.close().unwrap();
        (out, texts)
    }

    #[test]
    fn only_the_text_column_is_fetched_and_every_row_is_read() {
        let (file, want) = two_column_file(3, 200);
        let dir = StoreDir::open("memory://parquet-object-test/in").unwrap();
        dir.put("docs.parquet", Bytes::from(file.clone())).unwrap();
        let chunks = ObjectChunks::new(dir, "docs.parquet".into(), file.len() as u64);
        let mut got = Vec::new();
        for_each_text(chunks.clone(), "docs.parquet", "text", &|at| chunks.prefetch(at.start, at.len).map_err(|e| e.to_string()), &mut |t| {
            got.push(t.unwrap());
            Ok(true)
        })
        .unwrap();
        assert_eq!(got, want);
        // 600 rows of 2 KiB blobs are ~1.2 MB; the text column and the footer are a few KB
        let (fetched, size) = (chunks.fetched(), file.len() as u64);
        assert!(size > 1_200_000, "the blobs should dominate the file: {size} bytes");
        assert!(fetched * 20 < size, "fetched {fetched} of {size} bytes: more than the text column");
        // the same rows as the file read whole
        let mut whole = Vec::new();
        for_each_text(Bytes::from(file), "docs.parquet", "text", &|_| Ok(()), &mut |t| {
            whole.push(t.unwrap());
            Ok(true)
        })
        .unwrap();
        assert_eq!(whole, want);
    }

    #[test]
    fn a_stop_fetches_no_further_row_group_and_a_short_object_is_an_error() {
        let (file, want) = two_column_file(4, 50);
        let dir = StoreDir::open("memory://parquet-object-test/stop").unwrap();
        dir.put("docs.parquet", Bytes::from(file.clone())).unwrap();
        let chunks = ObjectChunks::new(dir.clone(), "docs.parquet".into(), file.len() as u64);
        let mut got = Vec::new();
        for_each_text(chunks.clone(), "docs.parquet", "text", &|at| chunks.prefetch(at.start, at.len).map_err(|e| e.to_string()), &mut |t| {
            got.push(t.unwrap());
            Ok(got.len() < 10)
        })
        .unwrap();
        assert_eq!(got, want[..10]);
        let all = ObjectChunks::new(dir.clone(), "docs.parquet".into(), file.len() as u64);
        for_each_text(all.clone(), "docs.parquet", "text", &|at| all.prefetch(at.start, at.len).map_err(|e| e.to_string()), &mut |_| Ok(true)).unwrap();
        assert!(chunks.fetched() < all.fetched(), "a stop in the first row group fetched {} bytes, a full read {}", chunks.fetched(), all.fetched());
        // a size larger than the object (it was replaced by a shorter one after listing)
        let wrong = ObjectChunks::new(dir, "docs.parquet".into(), file.len() as u64 + 100);
        let err = for_each_text(wrong, "docs.parquet", "text", &|_| Ok(()), &mut |_| Ok(true)).unwrap_err().to_string();
        assert!(err.contains("did the object change") || err.contains("range"), "{err}");
    }
}
