//! Lanes: plain TCP connections that carry a chain's chunks (the parameters down, the running
//! sum back) without gRPC in the way. A chunk's values go from the sender's tensor straight
//! into the socket and from the socket straight into the receiver's tensor: one copy into the
//! kernel and one out, where the stream path adds an encode buffer, HTTP/2 framing, a decode
//! buffer and a copy out of the message, and hands every chunk between two threads.
//!
//! A lane starts with a hello (`PREFACE`, the lane's kind, the job token) that the listener
//! answers with one byte. Then come frames: a 32-byte header (ticket, step, stream, offset,
//! number of values) and the values, little-endian f32. Everything read is checked here
//! before it lands: the header against what the receiver expects next, the length before a
//! byte of the values is read.

use crate::{ChunkStream, WireError, MAX_CHUNK_VALUES};
use std::io::IoSlice;
use std::ops::Range;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A lane's first bytes (in the clear, also before a lane's TLS handshake). Its first byte is
/// neither HTTP/2's (`PRI * ...`) nor TLS's, so a peer port closes anything else at once.
pub const PREFACE: [u8; 8] = *b"DTRLANE1";

/// The longest job token a hello may carry.
pub const MAX_TOKEN: usize = 1024;

/// The listener's answer to a hello it takes.
pub const ACCEPTED: u8 = 0;
/// The listener's answer to a hello it refuses (then it closes the lane).
pub const REFUSED: u8 = 1;

/// Which way a lane's frames go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaneKind {
    /// From the dialer to the listener (to a member: its parameters, or its predecessor's
    /// running sum).
    Feed,
    /// From the listener to the dialer (the last member's sum, to the coordinator that dialed).
    Collect,
}

/// Why a lane is given up. Any error leaves the lane unusable: the caller drops it.
#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The peer sent something the protocol or the step does not allow.
    #[error("{0}")]
    Protocol(#[from] WireError),
    /// The peer closed the lane.
    #[error("the peer closed the lane")]
    Closed,
}

/// A hello: the preface, the kind (1 feed, 2 collect), the token's length (u16 LE) and the
/// token (empty without one).
pub fn hello(kind: LaneKind, token: Option<&str>) -> Vec<u8> {
    let token = token.unwrap_or_default().as_bytes();
    let mut b = Vec::with_capacity(PREFACE.len() + 3 + token.len());
    b.extend_from_slice(&PREFACE);
    b.push(match kind {
        LaneKind::Feed => 1,
        LaneKind::Collect => 2,
    });
    b.extend_from_slice(&(token.len().min(MAX_TOKEN) as u16).to_le_bytes());
    b.extend_from_slice(&token[..token.len().min(MAX_TOKEN)]);
    b
}

/// Reads a hello: its kind and token (at most `MAX_TOKEN` bytes, checked before it is read).
pub async fn read_hello<R: AsyncRead + Unpin>(r: &mut R) -> Result<(LaneKind, Vec<u8>), LaneError> {
    let mut head = [0u8; PREFACE.len() + 3];
    read_exact(r, &mut head).await?;
    if head[..PREFACE.len()] != PREFACE {
        return Err(WireError::Invalid("not a lane's preface".into()).into());
    }
    let kind = match head[PREFACE.len()] {
        1 => LaneKind::Feed,
        2 => LaneKind::Collect,
        k => return Err(WireError::Invalid(format!("lane kind {k}")).into()),
    };
    let len = u16::from_le_bytes([head[PREFACE.len() + 1], head[PREFACE.len() + 2]]) as usize;
    if len > MAX_TOKEN {
        return Err(WireError::Invalid(format!("a token of {len} bytes")).into());
    }
    let mut token = vec![0u8; len];
    read_exact(r, &mut token).await?;
    Ok((kind, token))
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), LaneError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(LaneError::Closed),
        Err(e) => Err(e.into()),
    }
}

/// The bytes of a frame's header.
pub const HEADER_BYTES: usize = 32;

/// A frame's header: which step's which tensor, where in it, and how many values follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// The ticket the coordinator gave the sender for this step (the receiver knows it too).
    pub ticket: u64,
    /// The step.
    pub step: u64,
    /// Which tensor.
    pub stream: ChunkStream,
    /// Index of the first value.
    pub offset: u64,
    /// How many values follow (at most `MAX_CHUNK_VALUES`).
    pub values: u32,
}

impl FrameHeader {
    /// Little-endian: ticket, step, offset (u64 each), values (u32), stream (u8), three zeros.
    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(&self.ticket.to_le_bytes());
        b[8..16].copy_from_slice(&self.step.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..28].copy_from_slice(&self.values.to_le_bytes());
        b[28] = match self.stream {
            ChunkStream::Params => 0,
            ChunkStream::Sum => 1,
        };
        b
    }

    /// The header in `b`, if it is one (a known stream, zero padding, at most
    /// `MAX_CHUNK_VALUES` values).
    pub fn parse(b: &[u8; HEADER_BYTES]) -> Result<FrameHeader, WireError> {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let values = u32::from_le_bytes([b[24], b[25], b[26], b[27]]);
        let stream = match b[28] {
            0 => ChunkStream::Params,
            1 => ChunkStream::Sum,
            s => return Err(WireError::Invalid(format!("a frame of stream {s}"))),
        };
        if b[29..] != [0, 0, 0] {
            return Err(WireError::Invalid("a frame header with nonzero padding".into()));
        }
        if values > MAX_CHUNK_VALUES {
            return Err(WireError::Invalid(format!("a frame of {values} values (at most {MAX_CHUNK_VALUES})")));
        }
        Ok(FrameHeader { ticket: u64_at(0), step: u64_at(8), stream, offset: u64_at(16), values })
    }

    /// The range of the tensor the frame covers, checked against the frame the receiver
    /// expects next: `ticket`'s, of `step`'s `stream`, starting at `next`, `chunk` values long
    /// or up to the tensor's end `len`.
    pub fn expect(&self, want: &Expected, next: usize) -> Result<Range<usize>, WireError> {
        if self.ticket != want.ticket {
            return Err(WireError::Invalid("a frame with another ticket".into()));
        }
        if self.step != want.step || self.stream != want.stream {
            return Err(WireError::Invalid(format!(
                "a frame of step {} {:?}; expected step {} {:?}",
                self.step, self.stream, want.step, want.stream
            )));
        }
        let range = next..next.saturating_add(want.chunk).min(want.len);
        if self.offset != next as u64 || self.values as usize != range.len() {
            return Err(WireError::Invalid(format!(
                "a frame of {} values at {}; expected {} at {next}",
                self.values,
                self.offset,
                range.len()
            )));
        }
        Ok(range)
    }
}

/// Where a frame's values go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// Into this range of the tensor.
    Into(Range<usize>),
    /// Nowhere: read past them (a frame of an earlier step, which the receiver abandoned).
    Skip,
}

impl FrameHeader {
    /// `expect`, except that a frame of an earlier step is skipped: a step abandoned midway
    /// (it went over the star) may leave some of its frames on a lane.
    pub fn place(&self, want: &Expected, next: usize) -> Result<Place, WireError> {
        if self.step < want.step {
            return Ok(Place::Skip);
        }
        self.expect(want, next).map(Place::Into)
    }
}

/// What a receiver expects of the frames of one tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expected {
    /// The sender's ticket.
    pub ticket: u64,
    /// The step.
    pub step: u64,
    /// Which tensor.
    pub stream: ChunkStream,
    /// Values per frame (all but the last).
    pub chunk: usize,
    /// The tensor's length.
    pub len: usize,
}

/// Sends one frame: the header and `values`, in one vectored write where the socket takes it.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    header: &FrameHeader,
    values: &[f32],
) -> Result<(), LaneError> {
    let head = header.to_bytes();
    let converted: Vec<u8>;
    let bytes: &[u8] = if cfg!(target_endian = "little") {
        // SAFETY: any f32 is four initialized bytes; u8 has no alignment requirement.
        unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
    } else {
        converted = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        &converted
    };
    let mut bufs = [IoSlice::new(&head), IoSlice::new(bytes)];
    let mut left: &mut [IoSlice<'_>] = &mut bufs;
    while !left.is_empty() {
        let n = w.write_vectored(left).await?;
        if n == 0 {
            return Err(LaneError::Closed);
        }
        IoSlice::advance_slices(&mut left, n);
    }
    // A TLS stream may hold the frame's last record until flushed (a socket's flush is free).
    w.flush().await?;
    Ok(())
}

/// Reads frames, each straight into the part of a tensor its header names. Cancel-safe: what
/// was read survives a dropped `next` (a `select!` that woke for something else), so the next
/// call, with the same tensor, goes on where it stopped.
#[derive(Debug, Default)]
pub struct FrameReader {
    header: [u8; HEADER_BYTES],
    header_read: usize,
    /// The frame whose values are being read, where they go, and how many bytes are in.
    current: Option<(FrameHeader, Place)>,
    values_read: usize,
}

impl FrameReader {
    /// The next frame `place` (which checks each header) puts somewhere, its values in
    /// `tensor[range]`; frames it skips are read past. A frame it refuses is an error, and
    /// nothing of its values is read.
    pub async fn next<R, F>(&mut self, r: &mut R, tensor: &mut [f32], mut place: F) -> Result<FrameHeader, LaneError>
    where
        R: AsyncRead + Unpin,
        F: FnMut(&FrameHeader) -> Result<Place, WireError>,
    {
        loop {
            let (header, into) = match self.current.clone() {
                Some(frame) => frame,
                None => {
                    while self.header_read < HEADER_BYTES {
                        let n = r.read(&mut self.header[self.header_read..]).await?;
                        if n == 0 {
                            return Err(LaneError::Closed);
                        }
                        self.header_read += n;
                    }
                    let header = FrameHeader::parse(&self.header)?;
                    let into = place(&header)?;
                    if let Place::Into(range) = &into {
                        if range.len() != header.values as usize || range.end > tensor.len() {
                            let e = format!("a frame of {} values placed at {range:?}", header.values);
                            return Err(WireError::Invalid(e).into());
                        }
                    }
                    self.current = Some((header, into.clone()));
                    self.values_read = 0;
                    (header, into)
                }
            };
            match into {
                Place::Into(range) => {
                    let part = &mut tensor[range];
                    // SAFETY: every bit pattern is a valid f32, so the bytes may be written freely.
                    let bytes = unsafe {
                        std::slice::from_raw_parts_mut(part.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(part))
                    };
                    self.fill(r, bytes).await?;
                    if cfg!(target_endian = "big") {
                        part.iter_mut().for_each(|x| *x = f32::from_le_bytes(x.to_ne_bytes()));
                    }
                    self.current = None;
                    self.header_read = 0;
                    return Ok(header);
                }
                Place::Skip => {
                    let mut scratch = [0u8; 8192];
                    let len = 4 * header.values as usize;
                    while self.values_read < len {
                        let want = (len - self.values_read).min(scratch.len());
                        let n = r.read(&mut scratch[..want]).await?;
                        if n == 0 {
                            return Err(LaneError::Closed);
                        }
                        self.values_read += n;
                    }
                    self.current = None;
                    self.header_read = 0;
                }
            }
        }
    }

    /// A new step starts: the rest of a frame a dropped `next` left half read goes nowhere
    /// (its tensor was the last step's).
    pub fn new_step(&mut self) {
        if let Some((_, place)) = &mut self.current {
            *place = Place::Skip;
        }
    }

    /// Reads into `bytes` from where the last call stopped.
    async fn fill<R: AsyncRead + Unpin>(&mut self, r: &mut R, bytes: &mut [u8]) -> Result<(), LaneError> {
        while self.values_read < bytes.len() {
            let n = r.read(&mut bytes[self.values_read..]).await?;
            if n == 0 {
                return Err(LaneError::Closed);
            }
            self.values_read += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    fn header(offset: u64, values: u32) -> FrameHeader {
        FrameHeader { ticket: 7, step: 3, stream: ChunkStream::Sum, offset, values }
    }

    #[test]
    fn a_header_round_trips_and_a_malformed_one_is_refused() {
        let h = header(1 << 40, 5);
        assert_eq!(FrameHeader::parse(&h.to_bytes()), Ok(h));
        let mut b = h.to_bytes();
        b[28] = 2;
        assert!(FrameHeader::parse(&b).is_err(), "unknown stream");
        let mut b = h.to_bytes();
        b[31] = 1;
        assert!(FrameHeader::parse(&b).is_err(), "padding");
        let b = header(0, MAX_CHUNK_VALUES + 1).to_bytes();
        assert!(FrameHeader::parse(&b).is_err(), "too many values");
    }

    /// A writer that holds what it is given until flushed (as a TLS session does when the
    /// socket is full) still delivers a frame with nothing written after it.
    #[tokio::test]
    async fn a_frame_is_flushed_through_a_buffering_writer() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut held = tokio::io::BufWriter::with_capacity(1 << 20, a);
        write_frame(&mut held, &header(0, 3), &[1.5, -2.0, 0.25]).await.unwrap();
        let want = Expected { ticket: 7, step: 3, stream: ChunkStream::Sum, chunk: 3, len: 3 };
        let mut got = [0.0f32; 3];
        let mut reader = FrameReader::default();
        let read = reader.next(&mut b, &mut got, |h| h.place(&want, 0));
        tokio::time::timeout(std::time::Duration::from_secs(5), read).await.expect("delivered").unwrap();
        assert_eq!(got, [1.5, -2.0, 0.25]);
    }

    #[test]
    fn a_frame_is_checked_against_what_comes_next() {
        let want = Expected { ticket: 7, step: 3, stream: ChunkStream::Sum, chunk: 4, len: 10 };
        assert_eq!(header(0, 4).expect(&want, 0), Ok(0..4));
        assert_eq!(header(8, 2).expect(&want, 8), Ok(8..10), "the last is shorter");
        assert!(header(4, 4).expect(&want, 0).is_err(), "out of order");
        assert!(header(8, 4).expect(&want, 8).is_err(), "past the end");
        assert!(FrameHeader { ticket: 8, ..header(0, 4) }.expect(&want, 0).is_err(), "another ticket");
        assert!(FrameHeader { step: 2, ..header(0, 4) }.expect(&want, 0).is_err(), "another step");
        let params = FrameHeader { stream: ChunkStream::Params, ..header(0, 4) };
        assert!(params.expect(&want, 0).is_err(), "another tensor");
    }

    #[tokio::test]
    async fn frames_land_in_place_even_when_the_reader_is_interrupted() {
        let sent: Vec<f32> = (0..40).map(|i| i as f32 * 0.5 - 3.0).collect();
        let mut wire = vec![];
        // What an abandoned step left on the lane: read past.
        let stale = FrameHeader { step: 2, ticket: 1, ..header(0, 3000) };
        write_frame(&mut wire, &stale, &[9.0; 3000]).await.unwrap();
        for (i, part) in sent.chunks(16).enumerate() {
            write_frame(&mut wire, &header(16 * i as u64, part.len() as u32), part).await.unwrap();
        }
        let want = Expected { ticket: 7, step: 3, stream: ChunkStream::Sum, chunk: 16, len: 40 };
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let (mut got, mut reader) = (vec![0f32; 40], FrameReader::default());
        assert_eq!(stale.place(&want, 0), Ok(Place::Skip));
        let (mut next, mut interrupted) = (0, 0);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        // Seven bytes at a time, and the read dropped whenever it has to wait (as a `select!`
        // that woke for something else drops it): nothing read is lost.
        for piece in wire.chunks(701) {
            a.write_all(piece).await.unwrap();
            loop {
                let at = next;
                let read = std::pin::pin!(reader.next(&mut b, &mut got, |h| h.place(&want, at)));
                match read.poll(&mut cx) {
                    std::task::Poll::Ready(h) => {
                        let h = h.unwrap();
                        next = (h.offset + h.values as u64) as usize;
                    }
                    std::task::Poll::Pending => {
                        interrupted += 1;
                        break;
                    }
                }
            }
        }
        assert_eq!(next, 40);
        assert_eq!(got, sent);
        // A step abandoned mid-frame: the rest of that frame is read past in the next one.
        let mut wire = vec![];
        write_frame(&mut wire, &header(0, 16), &[5.0; 16]).await.unwrap();
        write_frame(&mut wire, &FrameHeader { step: 4, ..header(0, 16) }, &[6.0; 16]).await.unwrap();
        a.write_all(&wire[..40]).await.unwrap();
        {
            let read = std::pin::pin!(reader.next(&mut b, &mut got, |h| h.place(&want, 0)));
            assert!(read.poll(&mut cx).is_pending());
        }
        reader.new_step();
        a.write_all(&wire[40..]).await.unwrap();
        let mut fresh = vec![0f32; 40];
        let next_step = Expected { step: 4, ..want };
        reader.next(&mut b, &mut fresh, |h| h.place(&next_step, 0)).await.unwrap();
        assert_eq!(fresh[..16], [6.0; 16]);
        // Its first two values had landed before the step was left; the rest went nowhere.
        assert_eq!(got[..2], [5.0; 2]);
        assert_eq!(got[2..], sent[2..], "the rest of the abandoned frame landed");
        assert!(interrupted > 15, "dropped mid-frame only {interrupted} times");
    }

    #[tokio::test]
    async fn a_refused_or_truncated_frame_is_an_error() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        write_frame(&mut a, &header(0, 4), &[1.0; 4]).await.unwrap();
        let mut got = vec![0f32; 4];
        let refuse = |_: &FrameHeader| Err(WireError::Invalid("no".into()));
        assert!(matches!(FrameReader::default().next(&mut b, &mut got, refuse).await, Err(LaneError::Protocol(_))));
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&header(0, 4).to_bytes()).await.unwrap();
        a.write_all(&[0u8; 6]).await.unwrap();
        drop(a);
        let r = FrameReader::default().next(&mut b, &mut got, |_| Ok(Place::Into(0..4))).await;
        assert!(matches!(r, Err(LaneError::Closed)), "{r:?}");
        let (mut a, mut b) = tokio::io::duplex(1024);
        write_frame(&mut a, &header(0, 4), &[1.0; 4]).await.unwrap();
        let r = FrameReader::default().next(&mut b, &mut got, |_| Ok(Place::Into(0..3))).await;
        assert!(matches!(r, Err(LaneError::Protocol(_))), "placed wrong: {r:?}");
    }

    #[tokio::test]
    async fn a_hello_round_trips_and_an_oversized_token_is_refused_unread() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        a.write_all(&hello(LaneKind::Collect, Some("secret"))).await.unwrap();
        assert_eq!(read_hello(&mut b).await.unwrap(), (LaneKind::Collect, b"secret".to_vec()));
        let mut bad = hello(LaneKind::Feed, None);
        bad[9..11].copy_from_slice(&u16::MAX.to_le_bytes());
        a.write_all(&bad).await.unwrap();
        assert!(matches!(read_hello(&mut b).await, Err(LaneError::Protocol(_))));
        a.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        assert!(read_hello(&mut b).await.is_err());
    }
}
