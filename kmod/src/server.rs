//! The control server: one listening Unix socket, one accept thread, one thread per connection up
//! to a cap.
//!
//! A client is not trusted. Each connection is served one request at a time; the header is read
//! and checked before the payload, and the payload length is checked against
//! [`ServerLimits::max_payload`] before anything is allocated. Every read has a deadline: a
//! client has [`ServerLimits::idle_timeout`] to start a request and
//! [`ServerLimits::request_timeout`] to finish it once its first byte arrived (a client that
//! trickles bytes is dropped), and every reply write has [`ServerLimits::write_timeout`]. A
//! malformed header gets an error reply and the connection is closed (its framing cannot be
//! trusted any more); a well-framed request with a bad payload gets an error reply and the
//! connection stays open. Past [`ServerLimits::max_connections`] a new connection gets an
//! `EAGAIN` reply and is closed. Nothing a client sends reaches a panic, and the VM behind the
//! server is only ever called with decoded, checked requests.
//!
//! The socket file is created mode 0600. A socket file left by a dead server is replaced; one
//! that a live server answers on is refused.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::proto::{self, status, Command, Header, ProtoError, Reply, Request, HEADER_LEN};

/// The longest path a Unix socket address holds (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Errors starting a server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The path does not fit in a socket address.
    #[error("Control socket path {} is {len} bytes, longer than the {MAX_SOCKET_PATH} a Unix socket allows", .path.display())]
    PathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// A live server answers on the path.
    #[error("Control socket {} is in use by another process", .path.display())]
    InUse {
        /// The path.
        path: PathBuf,
    },
    /// Something that is not a socket is at the path.
    #[error("{} exists and is not a socket", .path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// Binding, or preparing the path, failed.
    #[error("Cannot serve control socket {}", .path.display())]
    Bind {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The accept thread could not be started.
    #[error("Cannot start the control thread for {}", .path.display())]
    Thread {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Bounds on what one server gives its clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// Connections served at once; more are answered `EAGAIN` and closed.
    pub max_connections: usize,
    /// How long a connection may sit between requests.
    pub idle_timeout: Duration,
    /// How long a request may take to arrive once its first byte has.
    pub request_timeout: Duration,
    /// How long writing a reply may take.
    pub write_timeout: Duration,
    /// The largest request payload.
    pub max_payload: u32,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 8,
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(2),
            write_timeout: Duration::from_secs(2),
            max_payload: proto::MAX_PAYLOAD,
        }
    }
}

/// Counters shared by the servers of one module (the `hw.vmm.control.*` sysctls).
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted and served.
    pub connections: AtomicU64,
    /// Connections refused because the cap was reached.
    pub connections_refused: AtomicU64,
    /// Requests answered with status 0.
    pub requests: AtomicU64,
    /// Requests answered with an error status (refused).
    pub refused: AtomicU64,
    /// Malformed messages (bad header, truncated, too long): answered and the connection closed.
    pub bad_messages: AtomicU64,
    /// Connections dropped because a client was too slow.
    pub timeouts: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What serves decoded requests on one socket.
pub(crate) trait Handler: Send + Sync {
    /// Answers one request: a reply, or a status and a message.
    fn handle(&self, request: Request) -> Result<Reply, (u32, String)>;
}

struct Shared {
    handler: Arc<dyn Handler>,
    limits: ServerLimits,
    stats: Arc<ServerStats>,
    stop: AtomicBool,
}

/// A running server on one socket path. Stopping (or dropping) it closes every connection,
/// joins its threads and removes the socket file if it is still the one it created.
pub struct ControlServer {
    path: PathBuf,
    shared: Arc<Shared>,
    wake: UnixStream,
    thread: Option<JoinHandle<()>>,
    /// (device, inode) of the socket file created.
    ident: (u64, u64),
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("path", &self.path)
            .finish()
    }
}

/// Whether a stale socket file was replaced when a server started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bound {
    /// The path was free.
    Fresh,
    /// A socket file nobody answered on was removed first.
    ReplacedStale,
}

fn bind_error(path: &Path, source: io::Error) -> ServerError {
    ServerError::Bind {
        path: path.to_owned(),
        source,
    }
}

/// Binds `path`, replacing a stale socket file; refuses a live one or a non-socket.
fn bind(path: &Path) -> Result<(UnixListener, Bound), ServerError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(ServerError::PathTooLong {
            path: path.to_owned(),
            len,
        });
    }
    match UnixListener::bind(path) {
        Ok(l) => return Ok((l, Bound::Fresh)),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
        Err(e) => return Err(bind_error(path, e)),
    }
    let meta = fs::symlink_metadata(path).map_err(|e| bind_error(path, e))?;
    if !meta.file_type().is_socket() {
        return Err(ServerError::NotASocket {
            path: path.to_owned(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ServerError::InUse {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            fs::remove_file(path).map_err(|e| bind_error(path, e))?;
            UnixListener::bind(path)
                .map(|l| (l, Bound::ReplacedStale))
                .map_err(|e| bind_error(path, e))
        }
        Err(e) => Err(bind_error(path, e)),
    }
}

impl ControlServer {
    /// Serves `handler` on a new socket at `path`.
    pub(crate) fn start(
        path: &Path,
        handler: Arc<dyn Handler>,
        limits: ServerLimits,
        stats: Arc<ServerStats>,
    ) -> Result<(Self, Bound), ServerError> {
        let (listener, bound) = bind(path)?;
        let cleanup = |e: io::Error| {
            let _ = fs::remove_file(path);
            bind_error(path, e)
        };
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(cleanup)?;
        let meta = fs::symlink_metadata(path).map_err(cleanup)?;
        listener.set_nonblocking(true).map_err(cleanup)?;
        let (wake, wake_rx) = UnixStream::pair().map_err(cleanup)?;
        let shared = Arc::new(Shared {
            handler,
            limits,
            stats,
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let name = format!(
            "vmmctl-{}",
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || accept_loop(&listener, &wake_rx, &s))
            .map_err(|source| {
                let _ = fs::remove_file(path);
                ServerError::Thread {
                    path: path.to_owned(),
                    source,
                }
            })?;
        Ok((
            Self {
                path: path.to_owned(),
                shared,
                wake,
                thread: Some(thread),
                ident: (meta.dev(), meta.ino()),
            },
            bound,
        ))
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops serving: closes every connection, joins the threads, removes the socket file.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::Release);
        let _ = (&self.wake).write_all(&[1]);
        let _ = thread.join();
        // Remove the file only if it is still the socket this server created.
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if meta.file_type().is_socket() && (meta.dev(), meta.ino()) == self.ident {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Connection {
    thread: JoinHandle<()>,
    /// A handle on the stream, to shut it down when the server stops.
    stream: UnixStream,
}

/// Waits until `listener` or `wake` is readable, or a second passes.
fn wait_readable(listener: &UnixListener, wake: &UnixStream) {
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a valid array of two pollfd entries for the duration of the call, and
    // both descriptors stay open (they are borrowed from live objects).
    let _ = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
}

fn accept_loop(listener: &UnixListener, wake: &UnixStream, shared: &Arc<Shared>) {
    let mut conns: Vec<Connection> = Vec::new();
    while !shared.stop.load(Ordering::Acquire) {
        wait_readable(listener, wake);
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        reap(&mut conns);
        loop {
            match listener.accept() {
                Ok((stream, _)) => admit(stream, &mut conns, shared),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    // Out of descriptors or memory: back off instead of spinning on a listener
                    // that stays readable.
                    std::thread::sleep(Duration::from_millis(50));
                    break;
                }
            }
        }
    }
    for c in &conns {
        let _ = c.stream.shutdown(std::net::Shutdown::Both);
    }
    for c in conns {
        let _ = c.thread.join();
    }
}

fn reap(conns: &mut Vec<Connection>) {
    let mut i = 0;
    while i < conns.len() {
        if conns.get(i).is_some_and(|c| c.thread.is_finished()) {
            let c = conns.swap_remove(i);
            let _ = c.thread.join();
        } else {
            i += 1;
        }
    }
}

/// Tells a client it was not served, without waiting on it.
fn refuse(mut stream: UnixStream, status: u32, message: &str) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = stream.write_all(&proto::encode_error(0, 0, status, message));
}

fn admit(stream: UnixStream, conns: &mut Vec<Connection>, shared: &Arc<Shared>) {
    let max = shared.limits.max_connections;
    if conns.len() >= max {
        bump(&shared.stats.connections_refused);
        refuse(
            stream,
            status::EAGAIN,
            &format!("Too many connections ({max} served at once): try again later"),
        );
        return;
    }
    // Accepted sockets do not inherit the listener's O_NONBLOCK on Linux; make sure.
    let handle = stream
        .set_nonblocking(false)
        .and_then(|()| stream.try_clone());
    let handle = match handle {
        Ok(h) => h,
        Err(_) => {
            bump(&shared.stats.connections_refused);
            refuse(stream, status::EAGAIN, "Cannot serve this connection now");
            return;
        }
    };
    let s = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("vmmctl-conn".into())
        .spawn(move || {
            serve(&stream, &s);
            // The accept loop holds a handle on the stream until it reaps this thread: shut
            // the connection down now so the client sees the end at once.
            let _ = stream.shutdown(std::net::Shutdown::Both);
        });
    match spawned {
        Ok(thread) => {
            bump(&shared.stats.connections);
            conns.push(Connection {
                thread,
                stream: handle,
            });
        }
        Err(_) => {
            bump(&shared.stats.connections_refused);
            refuse(handle, status::EAGAIN, "Cannot serve this connection now");
        }
    }
}

/// How a read with a deadline ended badly.
enum ReadFail {
    /// The deadline passed.
    Timeout,
    /// The peer closed after `got` bytes.
    Closed { got: usize },
    /// Any other error.
    Io,
}

/// Fills `buf` by `deadline`.
fn read_by(mut stream: &UnixStream, buf: &mut [u8], deadline: Instant) -> Result<(), ReadFail> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReadFail::Timeout);
        }
        if stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .is_err()
        {
            return Err(ReadFail::Io);
        }
        let Some(rest) = buf.get_mut(got..) else {
            return Err(ReadFail::Io);
        };
        match stream.read(rest) {
            Ok(0) => return Err(ReadFail::Closed { got }),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ReadFail::Timeout)
            }
            Err(_) => return Err(ReadFail::Io),
        }
    }
    Ok(())
}

/// Writes a reply by the write timeout; false if the client is gone or too slow.
fn send(mut stream: &UnixStream, bytes: &[u8], shared: &Shared) -> bool {
    if stream
        .set_write_timeout(Some(shared.limits.write_timeout))
        .is_err()
    {
        return false;
    }
    match stream.write_all(bytes) {
        Ok(()) => true,
        Err(e) => {
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                bump(&shared.stats.timeouts);
            }
            false
        }
    }
}

/// The status a framing error is answered with.
fn framing_status(e: &ProtoError) -> u32 {
    match e {
        ProtoError::Version { .. } => status::EPROTONOSUPPORT,
        ProtoError::TooLong { .. } => status::E2BIG,
        _ => status::EBADMSG,
    }
}

/// Serves one connection until the client leaves, misbehaves, or the server stops.
fn serve(stream: &UnixStream, shared: &Shared) {
    let limits = &shared.limits;
    let stats = &shared.stats;
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let mut head = [0u8; HEADER_LEN];
        let (first, rest) = head.split_at_mut(1);
        match read_by(stream, first, Instant::now() + limits.idle_timeout) {
            Ok(()) => {}
            Err(ReadFail::Timeout) => {
                bump(&stats.timeouts);
                return;
            }
            Err(ReadFail::Closed { .. } | ReadFail::Io) => return,
        }
        let deadline = Instant::now() + limits.request_timeout;
        match read_by(stream, rest, deadline) {
            Ok(()) => {}
            Err(ReadFail::Timeout) => {
                bump(&stats.timeouts);
                return;
            }
            Err(ReadFail::Closed { got }) => {
                bump(&stats.bad_messages);
                let msg = format!(
                    "Truncated header: {} of {HEADER_LEN} bytes before the end of the stream",
                    got + 1
                );
                let _ = send(
                    stream,
                    &proto::encode_error(0, 0, status::EBADMSG, &msg),
                    shared,
                );
                return;
            }
            Err(ReadFail::Io) => return,
        }
        let header = match Header::decode(&head)
            .and_then(|h| h.check_request(limits.max_payload).map(|()| h))
        {
            Ok(h) => h,
            Err(e) => {
                bump(&stats.bad_messages);
                let (command, id) = reply_context(&head);
                let _ = send(
                    stream,
                    &proto::encode_error(command, id, framing_status(&e), &e.to_string()),
                    shared,
                );
                return;
            }
        };
        // `length` is at most `max_payload` (checked above): bounded allocation.
        let Ok(len) = usize::try_from(header.length) else {
            return;
        };
        let mut payload = vec![0u8; len];
        match read_by(stream, &mut payload, deadline) {
            Ok(()) => {}
            Err(ReadFail::Timeout) => {
                bump(&stats.timeouts);
                return;
            }
            Err(ReadFail::Closed { got }) => {
                bump(&stats.bad_messages);
                let msg = format!("Truncated payload: {got} of {len} bytes");
                let _ = send(
                    stream,
                    &proto::encode_error(header.command, header.id, status::EBADMSG, &msg),
                    shared,
                );
                return;
            }
            Err(ReadFail::Io) => return,
        }
        let (status, body) = answer(header.command, &payload, shared);
        if status == status::OK {
            bump(&stats.requests);
        } else {
            bump(&stats.refused);
        }
        let bytes = proto::encode_reply(header.command, header.id, status, &body);
        if !send(stream, &bytes, shared) {
            return;
        }
    }
}

/// The command and id to answer a bad header with: the header's own if its magic is right.
fn reply_context(head: &[u8; HEADER_LEN]) -> (u16, u64) {
    if proto::le_u32(head, 0) != proto::MAGIC {
        return (0, 0);
    }
    (proto::le_u16(head, 6), proto::le_u64(head, 24))
}

/// Decodes and answers one well-framed request: (status, payload).
fn answer(command: u16, payload: &[u8], shared: &Shared) -> (u32, Vec<u8>) {
    let request = match Request::decode(command, payload) {
        Ok(r) => r,
        Err(e @ ProtoError::UnknownCommand { .. }) => {
            return (status::ENOTTY, e.to_string().into_bytes())
        }
        Err(e) => {
            let name = Command::from_u16(command).map_or("request", Command::name);
            return (status::EINVAL, format!("{name}: {e}").into_bytes());
        }
    };
    match shared.handler.handle(request) {
        Ok(reply) => match reply.encode() {
            Ok(bytes)
                if u32::try_from(bytes.len()).is_ok_and(|n| n <= proto::MAX_REPLY_PAYLOAD) =>
            {
                (status::OK, bytes)
            }
            Ok(bytes) => (
                status::EOVERFLOW,
                format!(
                    "Reply of {} bytes exceeds the limit of {}",
                    bytes.len(),
                    proto::MAX_REPLY_PAYLOAD
                )
                .into_bytes(),
            ),
            Err(e) => (status::EOVERFLOW, e.to_string().into_bytes()),
        },
        Err((status, message)) => (status, proto::truncate_message(&message).into()),
    }
}
