//! The TCP links between the processes of a cluster run, opened by cairn before timely uses
//! them, so that only a process of the same run — holding the same key — can join.
//!
//! Process `i` connects to every process below it and accepts one connection from every
//! process above it (timely's layout). Each new connection runs a challenge–response
//! handshake before timely sees a byte:
//!
//! 1. the connecting side sends [`MAGIC`], its process index and a fresh nonce;
//! 2. the accepting side answers with its own nonce and a proof: a keyed blake3 hash, under
//!    the run's key, of the connector's nonce and both indices;
//! 3. the connecting side checks that proof and sends its own over the acceptor's nonce.
//!
//! The key is the shared secret when one is given (`--secret-file` or `CAIRN_CLUSTER_SECRET`),
//! else the run's settings digest, which keeps processes of different runs apart but is no
//! secret. An accepting process drops a connection that fails the handshake — a port scan, a
//! process of another run, a wrong secret — with a warning naming the peer's address, and
//! keeps waiting for the real one; a connecting process whose peer fails to prove the key
//! stops with an error naming that peer. The links authenticate peers only: the bytes are not
//! encrypted, and a process that holds the key is trusted.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::EngineError;

/// First bytes of every cairn link: a stray client is recognised at once.
pub const MAGIC: &[u8; 12] = b"cairn-link/1";

/// How long a peer may take to answer during the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a process waits for all its peers before giving up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(600);

/// The key both ends prove they hold.
#[derive(Clone)]
pub struct LinkKey([u8; 32]);

impl LinkKey {
    /// The key of a run: from the shared secret when there is one, else from the settings
    /// digest (separates runs, protects nothing).
    pub fn new(secret: Option<&[u8]>, digest: u128) -> Self {
        let material = match secret {
            Some(s) => blake3::hash(s),
            None => blake3::hash(&digest.to_le_bytes()),
        };
        LinkKey(blake3::derive_key(
            "cairn cluster link key v1",
            material.as_bytes(),
        ))
    }

    fn proof(&self, role: &[u8], nonce: &[u8; 32], from: u64, to: u64) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(role);
        h.update(nonce);
        h.update(&from.to_le_bytes());
        h.update(&to.to_le_bytes());
        *h.finalize().as_bytes()
    }
}

/// A nonce that is never repeated: time, process id, address and a counter, hashed.
/// (Unpredictability is not needed, only freshness: it stops a recorded answer being replayed.)
fn nonce(context: &str) -> [u8; 32] {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = blake3::Hasher::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.update(&now.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    h.update(context.as_bytes());
    *h.finalize().as_bytes()
}

/// Opens this process's links: `result[j]` is the authenticated stream to process `j`
/// (`None` at `me`), ready for `timely`'s `initialize_networking_from_sockets`.
pub fn connect(
    hosts: &[String],
    me: usize,
    key: &LinkKey,
) -> Result<Vec<Option<TcpStream>>, EngineError> {
    let mut links: Vec<Option<TcpStream>> = (0..hosts.len()).map(|_| None).collect();
    let accept_key = key.clone();
    let accept_hosts = hosts.to_vec();
    let acceptor = std::thread::spawn(move || accept_all(&accept_hosts, me, &accept_key));
    for (j, address) in hosts.iter().enumerate().take(me) {
        links[j] = Some(connect_one(address, j, me, key)?);
    }
    let accepted = acceptor
        .join()
        .map_err(|_| EngineError::Input("the link acceptor thread panicked".into()))??;
    for (j, stream) in accepted {
        links[j] = Some(stream);
    }
    Ok(links)
}

fn link_error(message: String) -> EngineError {
    EngineError::Input(format!("cluster link: {message}"))
}

fn connect_one(
    address: &str,
    peer: usize,
    me: usize,
    key: &LinkKey,
) -> Result<TcpStream, EngineError> {
    let started = Instant::now();
    let mut stream = loop {
        match TcpStream::connect(address) {
            Ok(s) => break s,
            Err(e) if started.elapsed() < CONNECT_TIMEOUT => {
                tracing::debug!(peer, address, error = %e, "waiting for a peer process");
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => {
                return Err(link_error(format!(
                    "process {peer} at {address} did not accept a connection within {}s: {e}",
                    CONNECT_TIMEOUT.as_secs()
                )));
            }
        }
    };
    let io = |e: std::io::Error| {
        link_error(format!(
            "process {peer} at {address}: the handshake failed: {e}"
        ))
    };
    stream.set_nodelay(true).map_err(io)?;
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(io)?;
    let mine = nonce(address);
    let mut hello = Vec::with_capacity(MAGIC.len() + 8 + 32);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&(me as u64).to_le_bytes());
    hello.extend_from_slice(&mine);
    stream.write_all(&hello).map_err(io)?;
    let mut answer = [0u8; 64];
    stream.read_exact(&mut answer).map_err(|e| {
        link_error(format!(
            "process {peer} at {address} did not complete the handshake ({e}): is it a cairn \
             process of this run, started with the same secret?"
        ))
    })?;
    let (theirs, proof) = answer.split_at(32);
    let theirs: [u8; 32] = theirs
        .try_into()
        .map_err(|_| io(std::io::ErrorKind::InvalidData.into()))?;
    if proof != key.proof(b"acceptor", &mine, peer as u64, me as u64) {
        return Err(link_error(format!(
            "process {peer} at {address} could not prove it holds this run's key: it runs \
             other settings or another secret (give every process the same --secret-file or \
             CAIRN_CLUSTER_SECRET)"
        )));
    }
    stream
        .write_all(&key.proof(b"connector", &theirs, me as u64, peer as u64))
        .map_err(io)?;
    stream.set_read_timeout(None).map_err(io)?;
    Ok(stream)
}

fn accept_all(
    hosts: &[String],
    me: usize,
    key: &LinkKey,
) -> Result<Vec<(usize, TcpStream)>, EngineError> {
    let wanted = hosts.len() - me - 1;
    let mut accepted: Vec<(usize, TcpStream)> = Vec::with_capacity(wanted);
    if wanted == 0 {
        return Ok(accepted);
    }
    let listener = TcpListener::bind(&hosts[me]).map_err(|e| {
        link_error(format!(
            "cannot listen on {} (process {me}): {e}",
            hosts[me]
        ))
    })?;
    let started = Instant::now();
    listener
        .set_nonblocking(true)
        .map_err(|e| link_error(format!("{}: {e}", hosts[me])))?;
    while accepted.len() < wanted {
        match listener.accept() {
            Ok((stream, peer)) => match handshake(stream, peer, me, hosts.len(), key) {
                Ok((j, s)) if accepted.iter().any(|(k, _)| *k == j) => {
                    drop(s);
                    tracing::warn!(%peer, process = j, "refused a second connection claiming the same process index");
                }
                Ok(link) => accepted.push(link),
                Err(why) => {
                    tracing::warn!(%peer, reason = %why, "refused a connection that is not a process of this run");
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if started.elapsed() > CONNECT_TIMEOUT {
                    return Err(link_error(format!(
                        "process {me} waited {}s on {} for {} more process(es)",
                        CONNECT_TIMEOUT.as_secs(),
                        hosts[me],
                        wanted - accepted.len()
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(link_error(format!("{}: accept: {e}", hosts[me]))),
        }
    }
    Ok(accepted)
}

/// The accepting half of the handshake; the error says why a peer was refused.
fn handshake(
    mut stream: TcpStream,
    peer: SocketAddr,
    me: usize,
    processes: usize,
    key: &LinkKey,
) -> Result<(usize, TcpStream), String> {
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut hello = [0u8; MAGIC.len() + 8 + 32];
    stream
        .read_exact(&mut hello)
        .map_err(|e| format!("no complete greeting ({e})"))?;
    if &hello[..MAGIC.len()] != MAGIC {
        return Err("it does not speak the cairn link protocol".into());
    }
    let mut index = [0u8; 8];
    index.copy_from_slice(&hello[MAGIC.len()..MAGIC.len() + 8]);
    let index = u64::from_le_bytes(index);
    if index <= me as u64 || index >= processes as u64 {
        return Err(format!(
            "it claims process index {index}, but process {me} accepts only {}..{processes}",
            me + 1
        ));
    }
    let mut theirs = [0u8; 32];
    theirs.copy_from_slice(&hello[MAGIC.len() + 8..]);
    let mine = nonce(&peer.to_string());
    let mut answer = Vec::with_capacity(64);
    answer.extend_from_slice(&mine);
    answer.extend_from_slice(&key.proof(b"acceptor", &theirs, me as u64, index));
    stream.write_all(&answer).map_err(|e| e.to_string())?;
    let mut proof = [0u8; 32];
    stream
        .read_exact(&mut proof)
        .map_err(|e| format!("no proof of the key ({e})"))?;
    if proof != key.proof(b"connector", &mine, index, me as u64) {
        return Err(format!(
            "process {index} could not prove it holds this run's key (other settings or another secret)"
        ));
    }
    stream.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok((index as usize, stream))
}

/// Exit status of a process whose link delivered bytes that could not be read.
pub const LINK_FAILURE_EXIT: i32 = 3;

/// Turns timely's panics on a broken link into a clear error and a non-zero exit.
///
/// timely decodes what arrives from another process with `expect`: corrupt, truncated or
/// foreign bytes panic its receive thread or a worker, which then waits for progress that
/// never comes. For a cluster run this hook reports which process's link failed and ends
/// the process at once; the log is left as a kill would leave it — intact, every synced
/// event kept — so the same commands continue the run. Other panics go to the previous hook.
pub fn install_failure_report(hosts: Vec<String>, me: usize) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let thread = std::thread::current().name().unwrap_or("").to_string();
        let peer = thread
            .strip_prefix("timely:recv-")
            .or_else(|| thread.strip_prefix("timely:send-"))
            .and_then(|n| n.parse::<usize>().ok());
        let decoding =
            message.contains("deserialize") || message.contains("timely communication error");
        if peer.is_none() && !decoding {
            previous(info);
            return;
        }
        let whom = match peer {
            Some(p) => format!(
                "the link to process {p} ({})",
                hosts.get(p).map_or("?", |h| h.as_str())
            ),
            // A worker that cannot decode a record does not know who sent it; with two
            // processes there is only one it can be.
            None if hosts.len() == 2 => {
                let other = 1 - me.min(1);
                format!("the link to process {other} ({})", hosts[other])
            }
            None => "a link to another process".to_string(),
        };
        eprintln!(
            "error: cluster link: {whom} failed: {message} (thread {thread}); the bytes were \
             corrupt, truncated or not from a process of this run, or the peer stopped. \
             Nothing logged is lost: restart every process with the same command to continue."
        );
        std::process::exit(LINK_FAILURE_EXIT);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> String {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        format!("127.0.0.1:{port}")
    }

    #[test]
    fn strays_and_wrong_keys_are_refused_and_the_real_peer_joins() {
        let hosts = vec![free_port(), free_port()];
        let good = LinkKey::new(Some(b"s3cret"), 1);
        let h0 = hosts.clone();
        let k0 = good.clone();
        let zero = std::thread::spawn(move || connect(&h0, 0, &k0));
        // A stray client that sends garbage, and one that claims an impossible index.
        let mut stray = loop {
            if let Ok(s) = TcpStream::connect(&hosts[0]) {
                break s;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        stray
            .write_all(b"GET / HTTP/1.1\r\n\r\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx")
            .ok();
        let mut liar = TcpStream::connect(&hosts[0]).expect("connect");
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&7u64.to_le_bytes());
        hello.extend_from_slice(&[0u8; 32]);
        liar.write_all(&hello).expect("write");
        // A process with another secret is refused, and is told so.
        let wrong = LinkKey::new(Some(b"other"), 1);
        let err = connect(&hosts, 1, &wrong).expect_err("wrong secret");
        assert!(err.to_string().contains("could not prove"), "{err}");
        // The real process 1 still joins, and the link carries bytes both ways.
        let mut one = connect(&hosts, 1, &good).expect("process 1");
        let mut zero = zero.join().expect("thread").expect("process 0");
        let a = zero[1].as_mut().expect("link to 1");
        let b = one[0].as_mut().expect("link to 0");
        a.write_all(b"ping").expect("write");
        let mut got = [0u8; 4];
        b.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"ping");
        assert!(zero[0].is_none() && one[1].is_none());
    }

    #[test]
    fn without_a_secret_the_settings_digest_separates_runs() {
        assert_ne!(
            LinkKey::new(None, 1).0,
            LinkKey::new(None, 2).0,
            "two runs' keys must differ"
        );
        assert_ne!(LinkKey::new(Some(b"a"), 1).0, LinkKey::new(None, 1).0);
        assert_eq!(LinkKey::new(Some(b"a"), 1).0, LinkKey::new(Some(b"a"), 2).0);
    }
}
