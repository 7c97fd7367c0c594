//! Lanes (`dtrain_proto::lane`) as the cluster uses them: dialing one, admitting one that
//! dials a worker's peer port, and the newest of each kind waiting there for the member's
//! next step. A lane stays open from step to step; any error closes it, and the next step
//! dials again. Under mutual TLS a lane is mutual TLS too: after its preface (in the clear, so
//! the port tells a lane from anything else) comes a TLS handshake with the workers' own
//! certificates (the coordinator's, for its lanes to a chain's ends), and the hello and frames
//! go inside.

use dtrain_proto::lane::{hello, read_hello, LaneKind, ACCEPTED, PREFACE, REFUSED};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// How long dialing a lane (connect, handshake, hello, answer) may take.
pub(crate) const DIAL: Duration = Duration::from_secs(2);

/// How long a lane that dialed in may take to say hello (the dialer sends it at once, and
/// gives up after `DIAL`), its TLS handshake included.
const HELLO: Duration = DIAL;

/// A lane's connection: plain TCP, or mutual TLS over it (between members under TLS).
pub(crate) enum LaneStream {
    Plain(TcpStream),
    /// Boxed: a TLS session is a few KB.
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl std::fmt::Debug for LaneStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, tcp) = match self {
            LaneStream::Plain(s) => ("plain", s),
            LaneStream::Tls(s) => ("TLS", s.get_ref().0),
        };
        write!(f, "{kind} lane to {:?}", tcp.peer_addr().ok())
    }
}

impl LaneStream {
    fn tcp(&self) -> &TcpStream {
        match self {
            LaneStream::Plain(s) => s,
            LaneStream::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for LaneStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LaneStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            LaneStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for LaneStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            LaneStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            LaneStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            LaneStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            LaneStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            LaneStream::Plain(s) => s.is_write_vectored(),
            LaneStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LaneStream::Plain(s) => Pin::new(s).poll_flush(cx),
            LaneStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LaneStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            LaneStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// How the coordinator opens lanes to a chain's ends: with the job token, and under mutual TLS
/// with its own certificate (checking the members' against its client CA and the name every
/// worker's certificate carries).
#[derive(Clone)]
pub(crate) struct LaneAccess {
    pub(crate) token: Option<String>,
    pub(crate) tls: Option<LaneTls>,
}

/// Mutual TLS for lanes between chain members: a worker presents its own certificate both
/// ways (as to the coordinator) and takes a peer's only if the CA signed it and, dialing,
/// only if it carries the name every worker's certificate carries.
#[derive(Clone)]
pub(crate) struct LaneTls {
    acceptor: tokio_rustls::TlsAcceptor,
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl LaneTls {
    /// From PEM bytes; an error says which part is wrong.
    pub(crate) fn new(cert: &[u8], key: &[u8], ca: &[u8], name: &str) -> Result<LaneTls, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("the certificate: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("the key: {e}"))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca) {
            roots.add(c.map_err(|e| format!("the CA: {e}"))?).map_err(|e| format!("the CA: {e}"))?;
        }
        let roots = Arc::new(roots);
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), provider.clone())
                .build()
                .map_err(|e| format!("the CA: {e}"))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(|e| format!("the certificate and key: {e}"))?;
        // The dialer only writes, and takes anything it reads as the lane's end: no tickets.
        server.send_tls13_tickets = 0;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(|e| format!("the certificate and key: {e}"))?;
        let name = ServerName::try_from(name.to_string()).map_err(|e| format!("the peer name {name:?}: {e}"))?;
        Ok(LaneTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
            name,
        })
    }
}

/// Dials a lane of `kind` to the peer port at `address` with `token` (and `tls` between
/// members under TLS): the connection, once the port accepted it; else why not.
pub(crate) async fn dial(
    address: &str,
    kind: LaneKind,
    token: Option<&str>,
    tls: Option<&LaneTls>,
) -> Result<LaneStream, String> {
    let attempt = async {
        let mut s = TcpStream::connect(address).await.map_err(|e| e.to_string())?;
        // Frames are written whole; Nagle would hold a frame's tail for the peer's ACK.
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut lane = match tls {
            None => LaneStream::Plain(s),
            Some(tls) => {
                s.write_all(&PREFACE).await.map_err(|e| e.to_string())?;
                let s = tls.connector.connect(tls.name.clone(), s).await.map_err(|e| format!("TLS: {e}"))?;
                LaneStream::Tls(Box::new(tokio_rustls::TlsStream::Client(s)))
            }
        };
        lane.write_all(&hello(kind, token)).await.map_err(|e| e.to_string())?;
        lane.flush().await.map_err(|e| e.to_string())?;
        let mut answer = [0u8];
        lane.read_exact(&mut answer).await.map_err(|e| format!("no answer to the hello ({e})"))?;
        match answer[0] {
            ACCEPTED => Ok(lane),
            _ => Err("the peer port refused the lane (wrong job token?)".to_string()),
        }
    };
    tokio::time::timeout(DIAL, attempt).await.map_err(|_| format!("no lane within {DIAL:?}"))?
}

/// Whether a lane this side only writes to is still open: the peer never writes on it, so
/// anything to read (its end, a reset, or bytes it should not send) means it is not. A peer
/// closes a lane when another replaced it, e.g. after the chain changed. (Under TLS the bytes
/// read are the peer's records, unread by the session: the lane is dropped anyway.)
pub(crate) fn still_open(lane: &LaneStream) -> bool {
    let mut b = [0u8];
    matches!(lane.tcp().try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// The lanes a peer port admitted, newest of each kind, until the member takes them.
#[derive(Default)]
pub(crate) struct Arrivals {
    feed: Slot,
    collect: Slot,
}

/// Where the newest lane of a kind waits.
#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
    arrived: Notify,
}

#[derive(Default)]
struct SlotState {
    /// The newest lane admitted, until taken.
    lane: Option<LaneStream>,
    /// The number of the newest lane admitted (lanes are numbered as their admission begins).
    newest: u64,
    /// Lanes being admitted, and the last number given.
    opening: usize,
    numbered: u64,
}

/// A lane being admitted (it showed the token): counted in its slot until dropped (left for
/// the member, or its answer could not be written), numbered so that a slower admission of an
/// older lane does not replace a newer one.
pub(crate) struct Opening<'a> {
    slot: &'a Slot,
    number: u64,
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        if let Ok(mut state) = self.slot.state.lock() {
            state.opening = state.opening.saturating_sub(1);
        }
        self.slot.arrived.notify_one();
    }
}

impl Arrivals {
    fn slot(&self, kind: LaneKind) -> &Slot {
        match kind {
            LaneKind::Feed => &self.feed,
            LaneKind::Collect => &self.collect,
        }
    }

    /// A lane of `kind` is being admitted: counted before its dialer can have the answer, so
    /// a member told to use it (`take_admitted`) waits for it rather than take an older one.
    fn opening(&self, kind: LaneKind) -> Opening<'_> {
        let slot = self.slot(kind);
        let mut number = 0;
        if let Ok(mut state) = slot.state.lock() {
            state.opening += 1;
            state.numbered += 1;
            number = state.numbered;
        }
        Opening { slot, number }
    }

    /// Leaves the lane `opening` admitted for the member (an older one is closed; a newer
    /// one stays and this one is closed).
    fn put(&self, opening: &Opening<'_>, lane: LaneStream) {
        if let Ok(mut state) = opening.slot.state.lock() {
            if opening.number > state.newest {
                state.newest = opening.number;
                state.lane = Some(lane);
            }
        }
        opening.slot.arrived.notify_one();
    }

    /// The newest lane of `kind` admitted since the last take.
    pub(crate) fn take(&self, kind: LaneKind) -> Option<LaneStream> {
        self.slot(kind).state.lock().ok().and_then(|mut s| s.lane.take())
    }

    /// As `take`, but a lane of `kind` still being admitted is waited for (up to `DIAL`): its
    /// dialer may have had the answer, and sent the work that names it, before the lane is here.
    pub(crate) async fn take_admitted(&self, kind: LaneKind) -> Option<LaneStream> {
        let slot = self.slot(kind);
        let until = tokio::time::Instant::now() + DIAL;
        loop {
            match slot.state.lock().ok().map(|mut s| (s.lane.take(), s.opening)) {
                Some((Some(lane), _)) => return Some(lane),
                Some((None, opening)) if opening > 0 => {}
                _ => return None,
            }
            // A put or a failed admission since the check left a permit: no wake-up is missed.
            tokio::time::timeout_at(until, slot.arrived.notified()).await.ok()?;
        }
    }

    /// Returns once a lane of `kind` was admitted, or one being admitted failed (possibly
    /// before this call: check `take` again).
    pub(crate) async fn arrived(&self, kind: LaneKind) {
        self.slot(kind).arrived.notified().await;
    }
}

/// A lane that dialed the peer port: its TLS handshake made (with `tls`) and its hello read
/// within `HELLO`, the token compared, the answer written, and the lane left in `arrivals`.
/// `Err` says why it was refused.
pub(crate) async fn admit(
    s: TcpStream,
    token: Option<&str>,
    tls: Option<&LaneTls>,
    arrivals: &Arrivals,
) -> Result<(), String> {
    let _ = s.set_nodelay(true);
    let opening = async {
        let mut lane = match tls {
            None => LaneStream::Plain(s),
            Some(tls) => {
                let mut s = s;
                let mut preface = [0u8; PREFACE.len()];
                s.read_exact(&mut preface).await.map_err(|e| e.to_string())?;
                if preface != PREFACE {
                    return Err("not a lane's preface".to_string());
                }
                let s = tls.acceptor.accept(s).await.map_err(|e| format!("TLS: {e}"))?;
                LaneStream::Tls(Box::new(tokio_rustls::TlsStream::Server(s)))
            }
        };
        let hello = read_hello(&mut lane).await.map_err(|e| e.to_string())?;
        Ok((lane, hello))
    };
    let (mut lane, (kind, got)) =
        tokio::time::timeout(HELLO, opening).await.map_err(|_| format!("no hello within {HELLO:?}"))??;
    if !crate::auth::same_token(&got, token) {
        let _ = lane.write_all(&[REFUSED]).await;
        let _ = lane.flush().await;
        return Err("a lane without the job token".into());
    }
    // Counted before the dialer can have the answer (and tell the coordinator), only once it
    // showed the token: nobody else can make a member wait.
    let opening = arrivals.opening(kind);
    lane.write_all(&[ACCEPTED]).await.map_err(|e| e.to_string())?;
    lane.flush().await.map_err(|e| e.to_string())?;
    arrivals.put(&opening, lane);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn port(token: Option<&'static str>) -> (String, Arc<Arrivals>) {
        tls_port(token, None).await
    }

    async fn tls_port(token: Option<&'static str>, tls: Option<LaneTls>) -> (String, Arc<Arrivals>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let arrivals = Arc::new(Arrivals::default());
        let a = Arc::clone(&arrivals);
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let _ = admit(s, token, tls.as_ref(), &a).await;
            }
        });
        (address, arrivals)
    }

    /// Two workers' TLS settings, their certificates signed by one CA and carrying
    /// "dtrain-worker"; a third's signed by another CA; a fourth that expects its peers'
    /// certificates to carry another name.
    fn certificates() -> (LaneTls, LaneTls, LaneTls, LaneTls) {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let ca = || {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
        };
        let (ours, theirs) = (ca(), ca());
        let worker = |issuer: &CertifiedIssuer<'_, KeyPair>, peers: &str| {
            let key = KeyPair::generate().unwrap();
            let cert =
                CertificateParams::new(vec!["dtrain-worker".to_string()]).unwrap().signed_by(&key, issuer).unwrap();
            let (pem, key) = (cert.pem(), key.serialize_pem());
            LaneTls::new(pem.as_bytes(), key.as_bytes(), ours.pem().as_bytes(), peers).unwrap()
        };
        let w = "dtrain-worker";
        (worker(&ours, w), worker(&ours, w), worker(&theirs, w), worker(&ours, "another-name"))
    }

    /// Under TLS a lane between two workers of the CA is admitted and carries what is written;
    /// a worker whose certificate another CA signed gets none, nor a dialer that expects
    /// another name, one without the token, or one without TLS.
    #[tokio::test]
    async fn a_tls_lane_takes_only_workers_the_ca_signed() {
        let (a, b, stranger, misnamed) = certificates();
        let (address, arrivals) = tls_port(Some("a-token-of-16-bytes"), Some(b)).await;
        let mut lane = dial(&address, LaneKind::Feed, Some("a-token-of-16-bytes"), Some(&a)).await.unwrap();
        assert!(matches!(lane, LaneStream::Tls(_)));
        let mut got = arrivals.take_admitted(LaneKind::Feed).await.expect("admitted");
        lane.write_all(b"values").await.unwrap();
        lane.flush().await.unwrap();
        let mut buf = [0u8; 6];
        got.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"values");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(still_open(&lane), "the port sent nothing (no session tickets) on a lane the dialer writes to");
        // Frames written faster than they are read (the socket and the TLS session's buffer
        // fill) all arrive whole and in order, the last too with nothing written after it.
        use dtrain_proto::lane::{write_frame, Expected, FrameHeader, FrameReader};
        use dtrain_proto::ChunkStream;
        let (chunk, frames) = (1 << 17, 48);
        let sent: Vec<f32> = (0..chunk * frames).map(|i| i as f32).collect();
        let writer = tokio::spawn(async move {
            for (k, values) in sent.chunks(chunk).enumerate() {
                let offset = (k * chunk) as u64;
                let header = FrameHeader { ticket: 5, step: 1, stream: ChunkStream::Sum, offset, values: chunk as u32 };
                write_frame(&mut lane, &header, values).await.unwrap();
            }
            lane // kept open: the reader must not need the lane's end to get the last frame
        });
        let want = Expected { ticket: 5, step: 1, stream: ChunkStream::Sum, chunk, len: chunk * frames };
        let mut values = vec![0.0f32; chunk * frames];
        let mut reader = FrameReader::default();
        for k in 0..frames {
            tokio::time::sleep(Duration::from_millis(5)).await; // a slow reader: the socket fills
            let read = reader.next(&mut got, &mut values, |h| h.place(&want, k * chunk));
            tokio::time::timeout(Duration::from_secs(5), read).await.expect("the frame arrived").unwrap();
        }
        assert!(values.iter().enumerate().all(|(i, &v)| v == i as f32));
        let _lane = writer.await.unwrap();
        let e = dial(&address, LaneKind::Feed, Some("a-token-of-16-bytes"), Some(&stranger)).await.unwrap_err();
        assert!(e.contains("TLS") || e.contains("answer"), "{e}");
        assert!(arrivals.take(LaneKind::Feed).is_none());
        let e = dial(&address, LaneKind::Feed, Some("a-token-of-16-bytes"), Some(&misnamed)).await.unwrap_err();
        assert!(e.contains("TLS"), "a peer without the expected name: {e}");
        assert!(arrivals.take(LaneKind::Feed).is_none());
        let e = dial(&address, LaneKind::Feed, Some("another-token-16-bytes"), Some(&a)).await.unwrap_err();
        assert!(e.contains("refused"), "{e}");
        assert!(dial(&address, LaneKind::Feed, Some("a-token-of-16-bytes"), None).await.is_err(), "TLS required");
        let (plain, _) = port(None).await;
        assert!(dial(&plain, LaneKind::Feed, None, Some(&a)).await.is_err(), "no TLS there");
    }

    #[tokio::test]
    async fn a_lane_with_the_token_is_admitted_and_waits_for_the_member() {
        let (address, arrivals) = port(Some("a-token-of-16-bytes")).await;
        let _lane = dial(&address, LaneKind::Collect, Some("a-token-of-16-bytes"), None).await.unwrap();
        assert!(arrivals.take_admitted(LaneKind::Collect).await.is_some());
        assert!(arrivals.take(LaneKind::Feed).is_none());
        assert!(arrivals.take_admitted(LaneKind::Collect).await.is_none(), "taken once");
    }

    #[tokio::test]
    async fn a_lane_without_the_token_is_refused_and_never_reaches_the_member() {
        let (address, arrivals) = port(Some("a-token-of-16-bytes")).await;
        let e = dial(&address, LaneKind::Feed, Some("another-token-16-bytes"), None).await.unwrap_err();
        assert!(e.contains("refused"), "{e}");
        assert!(dial(&address, LaneKind::Feed, None, None).await.is_err());
        assert!(arrivals.take(LaneKind::Feed).is_none());
    }

    #[tokio::test]
    async fn a_lane_the_port_closed_is_seen_closed_by_its_writer() {
        let (address, arrivals) = port(None).await;
        let lane = dial(&address, LaneKind::Feed, None, None).await.unwrap();
        assert!(still_open(&lane));
        drop(arrivals.take_admitted(LaneKind::Feed).await.expect("admitted"));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while still_open(&lane) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!still_open(&lane), "the writer still thinks the lane open");
    }

    /// A member told to use a lane the port is still admitting (its dialer may have had the
    /// answer first) waits for that one, not an older one; with none being admitted it does
    /// not wait; an older admission that ends last does not replace a newer lane.
    #[tokio::test]
    async fn a_lane_still_being_admitted_is_waited_for_and_the_newest_wins() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let socket = || async { LaneStream::Plain(TcpStream::connect(address).await.unwrap()) };
        let arrivals = Arc::new(Arrivals::default());
        let t0 = tokio::time::Instant::now();
        assert!(arrivals.take_admitted(LaneKind::Collect).await.is_none());
        assert!(t0.elapsed() < Duration::from_millis(100), "nothing being admitted: no wait");

        let (older, newer) = (socket().await, socket().await);
        let newer_port = newer.tcp().local_addr().unwrap().port();
        let a = Arc::clone(&arrivals);
        let admitting = tokio::spawn(async move {
            let first = a.opening(LaneKind::Collect);
            let second = a.opening(LaneKind::Collect);
            tokio::time::sleep(Duration::from_millis(100)).await;
            a.put(&second, newer);
            drop(second);
            a.put(&first, older);
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let got = arrivals.take_admitted(LaneKind::Collect).await.expect("waited for");
        admitting.await.unwrap();
        assert_eq!(got.tcp().local_addr().unwrap().port(), newer_port, "the newer lane");
        assert!(arrivals.take(LaneKind::Collect).is_none(), "the older one, admitted last, is not kept");
    }

    #[tokio::test]
    async fn a_newer_lane_replaces_one_not_yet_taken() {
        let (address, arrivals) = port(None).await;
        let mut old = dial(&address, LaneKind::Feed, None, None).await.unwrap();
        let _new = dial(&address, LaneKind::Feed, None, None).await.unwrap();
        assert!(arrivals.take_admitted(LaneKind::Feed).await.is_some());
        assert!(arrivals.take_admitted(LaneKind::Feed).await.is_none());
        // The older one was closed by the port.
        let mut b = [0u8];
        let read = tokio::time::timeout(Duration::from_secs(5), old.read(&mut b)).await.unwrap();
        assert_eq!(read.unwrap(), 0);
    }
}
