//! The client side of the control ABI (what bhyvectl uses): connect, say `HELLO`, make calls.
//!
//! A server is not trusted either: reply lengths are capped at [`MAX_REPLY_PAYLOAD`] before
//! anything is allocated, every read and write has a timeout, and a reply must echo the
//! request's id.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::proto::{
    self, status, Header, Hello, ProtoError, Reply, Request, HEADER_LEN, MAX_REPLY_PAYLOAD, VERSION,
};

/// Errors of a control client; each names the socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing at the path.
    #[error("No control socket at {}", .path.display())]
    NoSocket {
        /// The path.
        path: PathBuf,
    },
    /// A socket file nobody serves (the server died).
    #[error("Nobody serves {} (stale socket)", .path.display())]
    Stale {
        /// The path.
        path: PathBuf,
    },
    /// Connecting failed otherwise.
    #[error("Cannot connect to {}: {source}", .path.display())]
    Connect {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading or writing failed, or the server closed the connection.
    #[error("I/O on {}: {source}", .path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The server did not answer in time.
    #[error("No reply from {} within {timeout:?}", .path.display())]
    Timeout {
        /// The path.
        path: PathBuf,
        /// The timeout.
        timeout: Duration,
    },
    /// The server speaks another protocol version.
    #[error("Protocol version mismatch: this client speaks version {ours}, the server at {} speaks version {theirs}", .path.display())]
    VersionMismatch {
        /// The path.
        path: PathBuf,
        /// This build's version.
        ours: u16,
        /// The server's.
        theirs: u16,
    },
    /// The reply is malformed.
    #[error("Bad reply from {}: {source}", .path.display())]
    Protocol {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: ProtoError,
    },
    /// The server refused the request.
    #[error("{message} ({})", status::name(*.status))]
    Remote {
        /// The errno-style status.
        status: u32,
        /// The server's message.
        message: String,
    },
}

impl ClientError {
    /// The status of a [`ClientError::Remote`], if it is one.
    pub fn status(&self) -> Option<u32> {
        match self {
            ClientError::Remote { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A connection to one control socket, after a successful `HELLO`.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    path: PathBuf,
    next_id: u64,
    timeout: Duration,
    hello: Hello,
}

impl Client {
    /// Connects to `path` and says `HELLO`; every read and write is bounded by `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ClientError::NoSocket {
                path: path.to_owned(),
            },
            io::ErrorKind::ConnectionRefused => ClientError::Stale {
                path: path.to_owned(),
            },
            _ => ClientError::Connect {
                path: path.to_owned(),
                source,
            },
        })?;
        let io_err = |source| ClientError::Io {
            path: path.to_owned(),
            source,
        };
        stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
        stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
        let mut client = Self {
            stream,
            path: path.to_owned(),
            next_id: 1,
            timeout,
            hello: Hello {
                version: VERSION,
                endpoint: proto::Endpoint::Module,
                name: String::new(),
                ncpus: 0,
                running: false,
                maxcpu: 0,
            },
        };
        match client.call(&Request::Hello)? {
            Reply::Hello(h) => {
                if h.version != VERSION {
                    return Err(ClientError::VersionMismatch {
                        path: path.to_owned(),
                        ours: VERSION,
                        theirs: h.version,
                    });
                }
                client.hello = h;
                Ok(client)
            }
            _ => Err(client.protocol(ProtoError::Direction("HELLO answered with another reply"))),
        }
    }

    /// What the server said to `HELLO`.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn protocol(&self, source: ProtoError) -> ClientError {
        ClientError::Protocol {
            path: self.path.clone(),
            source,
        }
    }

    fn io(&self, source: io::Error) -> ClientError {
        if matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            return ClientError::Timeout {
                path: self.path.clone(),
                timeout: self.timeout,
            };
        }
        ClientError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Sends `request` and waits for its reply.
    pub fn call(&mut self, request: &Request) -> Result<Reply, ClientError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let bytes = proto::encode_request(id, request).map_err(|e| self.protocol(e))?;
        if let Err(e) = self.stream.write_all(&bytes) {
            // The server may have refused the connection with a reply and closed it: read it.
            if let Ok(reply) = self.read_reply(0) {
                return self.finish(request, reply);
            }
            return Err(self.io(e));
        }
        let reply = self.read_reply(id)?;
        self.finish(request, reply)
    }

    fn finish(
        &self,
        request: &Request,
        (header, payload): (Header, Vec<u8>),
    ) -> Result<Reply, ClientError> {
        if header.status != status::OK {
            let message = String::from_utf8_lossy(&payload).into_owned();
            return Err(ClientError::Remote {
                status: header.status,
                message,
            });
        }
        if header.command != request.command() as u16 {
            return Err(self.protocol(ProtoError::Direction("The reply is for another command")));
        }
        Reply::decode(header.command, &payload).map_err(|e| self.protocol(e))
    }

    /// Reads one reply for request `id` (or an unsolicited refusal with id 0).
    fn read_reply(&mut self, id: u64) -> Result<(Header, Vec<u8>), ClientError> {
        let mut head = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut head).map_err(|e| self.io(e))?;
        let header = Header::decode(&head).map_err(|e| self.protocol(e))?;
        if header.version != VERSION {
            return Err(ClientError::VersionMismatch {
                path: self.path.clone(),
                ours: VERSION,
                theirs: header.version,
            });
        }
        header.check_reply().map_err(|e| self.protocol(e))?;
        if header.id != id && !(header.id == 0 && header.status != status::OK) {
            return Err(self.protocol(ProtoError::Direction("The reply's id is not the request's")));
        }
        // Capped by check_reply: at most MAX_REPLY_PAYLOAD bytes.
        let len = usize::try_from(header.length.min(MAX_REPLY_PAYLOAD)).unwrap_or(0);
        let mut payload = vec![0u8; len];
        self.stream
            .read_exact(&mut payload)
            .map_err(|e| self.io(e))?;
        Ok((header, payload))
    }
}
