//! Chunk sizes for the targets that check a decoder gives the same result however its input
//! is split: a small xorshift of a seed taken from the fuzz input.

/// Sizes from 0 to `span - 1` that add up to at least `len` (the last may overshoot).
pub fn sizes(seed: u32, span: usize, len: usize) -> Vec<usize> {
    let span = span.max(1) as u32;
    let mut x = seed | 1;
    let mut sizes = Vec::new();
    let mut covered = 0;
    while covered < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let size = (x % span) as usize;
        sizes.push(size);
        covered += size;
    }
    sizes
}

/// A reader that hands out `data` in the given sizes (a size of 0 is skipped: a read of 0
/// bytes means end of stream), then the rest in one read.
pub struct Chunked {
    data: Vec<u8>,
    at: usize,
    sizes: std::vec::IntoIter<usize>,
}

impl Chunked {
    pub fn new(data: &[u8], sizes: Vec<usize>) -> Chunked {
        Chunked {
            data: data.to_vec(),
            at: 0,
            sizes: sizes.into_iter(),
        }
    }
}

impl std::io::Read for Chunked {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let rest = &self.data[self.at..];
        if rest.is_empty() || buf.is_empty() {
            return Ok(0);
        }
        let size = loop {
            match self.sizes.next() {
                Some(0) => continue,
                Some(n) => break n,
                None => break rest.len(),
            }
        };
        let n = size.min(rest.len()).min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.at += n;
        Ok(n)
    }
}
