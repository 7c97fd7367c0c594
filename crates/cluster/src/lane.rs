//! Lanes (`dtrain_proto::lane`) as the cluster uses them: dialing one, admitting one that
//! dials a worker's peer port, and the newest of each kind waiting there for the member's
//! next step. A lane stays open from step to step; any error closes it, and the next step
//! dials again.

use dtrain_proto::lane::{hello, read_hello, LaneKind, ACCEPTED, REFUSED};
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// How long dialing a lane (connect, hello, answer) may take.
pub(crate) const DIAL: Duration = Duration::from_secs(2);

/// How long a lane that dialed in may take to say hello (the dialer sends it at once, and
/// gives up after `DIAL`).
const HELLO: Duration = DIAL;

/// Dials a lane of `kind` to the peer port at `address` with `token`: the socket, once the
/// port accepted it; else why not.
pub(crate) async fn dial(address: &str, kind: LaneKind, token: Option<&str>) -> Result<TcpStream, String> {
    let attempt = async {
        let mut s = TcpStream::connect(address).await.map_err(|e| e.to_string())?;
        // Frames are written whole; Nagle would hold a frame's tail for the peer's ACK.
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        s.write_all(&hello(kind, token)).await.map_err(|e| e.to_string())?;
        let mut answer = [0u8];
        s.read_exact(&mut answer).await.map_err(|e| format!("no answer to the hello ({e})"))?;
        match answer[0] {
            ACCEPTED => Ok(s),
            _ => Err("the peer port refused the lane (wrong job token?)".to_string()),
        }
    };
    tokio::time::timeout(DIAL, attempt).await.map_err(|_| format!("no lane within {DIAL:?}"))?
}

/// Whether a lane this side only writes to is still open: the peer never writes on it, so
/// anything to read (its end, a reset, or bytes it should not send) means it is not. A peer
/// closes a lane when another replaced it, e.g. after the chain changed.
pub(crate) fn still_open(lane: &TcpStream) -> bool {
    let mut b = [0u8];
    matches!(lane.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// The lanes a peer port admitted, newest of each kind, until the member takes them.
#[derive(Default)]
pub(crate) struct Arrivals {
    feed: Mutex<Option<TcpStream>>,
    collect: Mutex<Option<TcpStream>>,
    arrived: Notify,
}

impl Arrivals {
    fn slot(&self, kind: LaneKind) -> &Mutex<Option<TcpStream>> {
        match kind {
            LaneKind::Feed => &self.feed,
            LaneKind::Collect => &self.collect,
        }
    }

    /// Leaves `lane` for the member (an older one of its kind is closed).
    fn put(&self, kind: LaneKind, lane: TcpStream) {
        if let Ok(mut slot) = self.slot(kind).lock() {
            *slot = Some(lane);
        }
        self.arrived.notify_one();
    }

    /// The newest lane of `kind` admitted since the last take.
    pub(crate) fn take(&self, kind: LaneKind) -> Option<TcpStream> {
        self.slot(kind).lock().ok().and_then(|mut s| s.take())
    }

    /// Returns once a lane was admitted (possibly before this call: check `take` again).
    pub(crate) async fn arrived(&self) {
        self.arrived.notified().await;
    }
}

/// A lane that dialed the peer port: its hello read within `HELLO`, the token compared,
/// the answer written, and the lane left in `arrivals`. `Err` says why it was refused.
pub(crate) async fn admit(mut lane: TcpStream, token: Option<&str>, arrivals: &Arrivals) -> Result<(), String> {
    let (kind, got) = tokio::time::timeout(HELLO, read_hello(&mut lane))
        .await
        .map_err(|_| format!("no hello within {HELLO:?}"))?
        .map_err(|e| e.to_string())?;
    if !crate::auth::same_token(&got, token) {
        let _ = lane.write_all(&[REFUSED]).await;
        return Err("a lane without the job token".into());
    }
    let _ = lane.set_nodelay(true);
    lane.write_all(&[ACCEPTED]).await.map_err(|e| e.to_string())?;
    arrivals.put(kind, lane);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    async fn port(token: Option<&'static str>) -> (String, Arc<Arrivals>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let arrivals = Arc::new(Arrivals::default());
        let a = Arc::clone(&arrivals);
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let _ = admit(s, token, &a).await;
            }
        });
        (address, arrivals)
    }

    #[tokio::test]
    async fn a_lane_with_the_token_is_admitted_and_waits_for_the_member() {
        let (address, arrivals) = port(Some("a-token-of-16-bytes")).await;
        let _lane = dial(&address, LaneKind::Collect, Some("a-token-of-16-bytes")).await.unwrap();
        assert!(arrivals.take(LaneKind::Feed).is_none());
        assert!(arrivals.take(LaneKind::Collect).is_some());
        assert!(arrivals.take(LaneKind::Collect).is_none(), "taken once");
    }

    #[tokio::test]
    async fn a_lane_without_the_token_is_refused_and_never_reaches_the_member() {
        let (address, arrivals) = port(Some("a-token-of-16-bytes")).await;
        let e = dial(&address, LaneKind::Feed, Some("another-token-16-bytes")).await.unwrap_err();
        assert!(e.contains("refused"), "{e}");
        assert!(dial(&address, LaneKind::Feed, None).await.is_err());
        assert!(arrivals.take(LaneKind::Feed).is_none());
    }

    #[tokio::test]
    async fn a_lane_the_port_closed_is_seen_closed_by_its_writer() {
        let (address, arrivals) = port(None).await;
        let lane = dial(&address, LaneKind::Feed, None).await.unwrap();
        assert!(still_open(&lane));
        drop(arrivals.take(LaneKind::Feed));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while still_open(&lane) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!still_open(&lane), "the writer still thinks the lane open");
    }

    #[tokio::test]
    async fn a_newer_lane_replaces_one_not_yet_taken() {
        let (address, arrivals) = port(None).await;
        let mut old = dial(&address, LaneKind::Feed, None).await.unwrap();
        let _new = dial(&address, LaneKind::Feed, None).await.unwrap();
        assert!(arrivals.take(LaneKind::Feed).is_some());
        assert!(arrivals.take(LaneKind::Feed).is_none());
        // The older one was closed by the port.
        let mut b = [0u8];
        let read = tokio::time::timeout(Duration::from_secs(5), old.read(&mut b)).await.unwrap();
        assert_eq!(read.unwrap(), 0);
    }
}
