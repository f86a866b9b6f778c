//! The frames of a chunk stream (`GET /dist/{root}/stream/..`): the chunk
//! number and the sealed length, 4 bytes each, big-endian, then the sealed
//! chunk. A frame numbered [`HEARTBEAT`] with nothing in it says "still
//! waiting for the next chunk".

pub const HEADER: usize = 8;
pub const HEARTBEAT: u32 = u32::MAX;

pub fn encode(i: u32, sealed: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEADER + sealed.len());
    f.extend_from_slice(&i.to_be_bytes());
    f.extend_from_slice(&(sealed.len() as u32).to_be_bytes());
    f.extend_from_slice(sealed);
    f
}

pub fn heartbeat() -> Vec<u8> {
    encode(HEARTBEAT, &[])
}

#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Heartbeat,
    Chunk(u32, Vec<u8>),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("a frame of {0} bytes (at most {1})")]
    TooLong(usize, usize),
    #[error("a heartbeat of {0} bytes")]
    BadHeartbeat(usize),
}

/// Reassembles frames from a stream's pieces, however they are cut.
pub struct Reader {
    buf: Vec<u8>,
    max_len: usize,
}

impl Reader {
    /// Frames longer than `max_len` are refused from their header, before
    /// their bytes are buffered.
    pub fn new(max_len: usize) -> Self {
        Self {
            buf: Vec::new(),
            max_len,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, if it is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, Error> {
        let Some((head, _)) = self.buf.split_first_chunk::<HEADER>() else {
            return Ok(None);
        };
        let (i, len) = head.split_at(4);
        let i = u32::from_be_bytes(i.try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
        if i == HEARTBEAT && len != 0 {
            return Err(Error::BadHeartbeat(len));
        }
        if len > self.max_len {
            return Err(Error::TooLong(len, self.max_len));
        }
        if self.buf.len() < HEADER + len {
            return Ok(None);
        }
        let rest = self.buf.split_off(HEADER + len);
        let mut frame = std::mem::replace(&mut self.buf, rest);
        Ok(Some(if i == HEARTBEAT {
            Frame::Heartbeat
        } else {
            Frame::Chunk(i, frame.split_off(HEADER))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> Vec<u8> {
        [
            encode(0, b"first chunk"),
            heartbeat(),
            encode(3, &[]),
            encode(6, &[7; 300]),
        ]
        .concat()
    }

    fn expected() -> Vec<Frame> {
        vec![
            Frame::Chunk(0, b"first chunk".to_vec()),
            Frame::Heartbeat,
            Frame::Chunk(3, vec![]),
            Frame::Chunk(6, vec![7; 300]),
        ]
    }

    /// The same frames however the stream is cut, down to a byte at a time.
    #[test]
    fn frames_come_out_whole_however_the_stream_is_cut() {
        let s = stream();
        for piece in 1..=s.len() {
            let mut r = Reader::new(1000);
            let mut got = Vec::new();
            for p in s.chunks(piece) {
                r.push(p);
                while let Some(f) = r.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, expected(), "pieces of {piece}");
            assert_eq!(r.next_frame(), Ok(None));
        }
    }

    #[test]
    fn long_frames_and_full_heartbeats_are_refused_from_the_header() {
        let mut r = Reader::new(100);
        r.push(&encode(1, &[0; 101])[..HEADER]);
        assert_eq!(r.next_frame(), Err(Error::TooLong(101, 100)));
        let mut r = Reader::new(100);
        r.push(&encode(HEARTBEAT, &[1])[..HEADER]);
        assert_eq!(r.next_frame(), Err(Error::BadHeartbeat(1)));
        // Seven bytes are not a header yet.
        let mut r = Reader::new(100);
        r.push(&[0; 7]);
        assert_eq!(r.next_frame(), Ok(None));
    }
}
