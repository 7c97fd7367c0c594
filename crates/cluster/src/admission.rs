//! Connections before they have said anything: a cap on how many may wait at once, and a
//! deadline for their first bytes. Idle or trickling TCP connections cost the coordinator a
//! socket each; without these, enough of them would use up its descriptors and keep real
//! workers out. (Once a call arrives, the token check and the hub's stream caps take over.)

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Connections that have not yet sent `HEARD` bytes, at most.
pub const MAX_UNHEARD: usize = 256;

/// Bytes a connection must send within `FIRST_BYTES` to stop counting as unheard: an HTTP/2
/// preface, settings and a call's headers are more than this.
pub const HEARD: usize = 128;

/// How long a new connection has to send its first `HEARD` bytes.
pub const FIRST_BYTES: Duration = Duration::from_secs(10);

/// Admits new connections while fewer than a cap are waiting to be heard.
#[derive(Clone)]
pub struct Admission {
    places: Arc<Semaphore>,
    first_bytes: Duration,
}

impl Default for Admission {
    fn default() -> Self {
        Admission::new(MAX_UNHEARD, FIRST_BYTES)
    }
}

impl Admission {
    /// At most `max_unheard` connections waiting, each for at most `first_bytes`.
    pub fn new(max_unheard: usize, first_bytes: Duration) -> Admission {
        Admission { places: Arc::new(Semaphore::new(max_unheard)), first_bytes }
    }

    /// The connection, guarded; `None` (and it is closed) when too many are waiting already.
    pub fn admit(&self, stream: TcpStream) -> Option<Guarded> {
        let permit = Arc::clone(&self.places).try_acquire_owned().ok()?;
        Some(Guarded {
            inner: stream,
            deadline: Box::pin(tokio::time::sleep(self.first_bytes)),
            heard: 0,
            permit: Some(permit),
        })
    }
}

/// A TCP connection that fails its reads if it has not sent `HEARD` bytes by its deadline,
/// and holds a place among the unheard until it has.
pub struct Guarded {
    inner: TcpStream,
    deadline: Pin<Box<tokio::time::Sleep>>,
    heard: usize,
    permit: Option<OwnedSemaphorePermit>,
}

impl AsyncRead for Guarded {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.permit.is_some() && this.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "nothing said in time")));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.permit.is_some() {
            this.heard += buf.filled().len() - before;
            if this.heard >= HEARD {
                this.permit = None; // heard: its place goes to the next connection
            }
        }
        read
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for Guarded {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair(listener: &tokio::net::TcpListener) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn silent_connections_time_out_and_are_capped_while_heard_ones_go_on() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let wait = Duration::from_millis(300);
        let admission = Admission::new(3, wait);
        // A connection that says enough keeps going past the deadline.
        let (mut talker, server) = pair(&listener).await;
        let mut heard = admission.admit(server).unwrap();
        talker.write_all(&[7u8; HEARD]).await.unwrap();
        let mut got = vec![0u8; HEARD];
        heard.read_exact(&mut got).await.unwrap();
        // A silent one fails its read at the deadline.
        let (_silent, server) = pair(&listener).await;
        let mut silent = admission.admit(server).unwrap();
        let mut one = [0u8; 1];
        let started = std::time::Instant::now();
        let e = silent.read(&mut one).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= wait - Duration::from_millis(50), "{:?}", started.elapsed());
        talker.write_all(b"x").await.unwrap();
        assert_eq!(heard.read(&mut one).await.unwrap(), 1, "a heard connection has no deadline");
        // Three places: the silent one and two more, then new ones are turned away until one
        // of the unheard is gone.
        let (_c1, s1) = pair(&listener).await;
        let _g1 = admission.admit(s1).expect("a place");
        let (_c2, s2) = pair(&listener).await;
        let g2 = admission.admit(s2).expect("a place");
        let (_c3, s3) = pair(&listener).await;
        assert!(admission.admit(s3).is_none(), "the unheard are capped");
        drop(g2);
        let (_c4, s4) = pair(&listener).await;
        assert!(admission.admit(s4).is_some(), "a place freed by a closed connection");
        drop(silent);
    }
}
