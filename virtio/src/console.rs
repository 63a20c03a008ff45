//! virtio-console with one port, no multiport (virtio 1.2 §5.3; bhyve's `pci_virtio_console.c`).
//!
//! Queue 0 (receiveq0) carries host input to the guest, queue 1 (transmitq0) guest output to the
//! host. Backends ([`ConsoleBackend`]): standard input/output, an output file, or a Unix socket
//! the monitor listens on (one client at a time, as bhyve's `port1=` sockets). Output to a backend
//! with no reader (no client connected) is dropped and counted; an output error is counted and
//! logged but never stops the guest.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::device::{device_id, ActivateError, DeviceError, QueueCtx, QueueHandler, VirtioDevice};
use crate::log::VirtioStats;

/// Queue size offered.
pub const QUEUE_SIZE: u16 = 64;
const INPUT_CHUNK: usize = 4096;
const OUTPUT_CHUNK: usize = 4096;

/// Where console bytes go and come from.
pub trait ConsoleBackend: Send {
    /// Readable when input (or a connection) is waiting; `None` when there is no input.
    fn input_fd(&self) -> Option<RawFd>;
    /// Reads input: `Ok(0)` is the end of input for good, `WouldBlock` means nothing now.
    fn read_input(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Writes guest output; returns how many bytes were dropped (no reader).
    fn write_output(&mut self, data: &[u8]) -> std::io::Result<usize>;
}

/// Standard input and output (bhyve's `stdio`).
#[derive(Debug, Default)]
pub struct StdioBackend;

impl ConsoleBackend for StdioBackend {
    fn input_fd(&self) -> Option<RawFd> {
        Some(std::io::stdin().as_raw_fd())
    }
    fn read_input(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // Only called once poll(2) said stdin is readable: this read does not block.
        std::io::stdin().lock().read(buf)
    }
    fn write_output(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        out.write_all(data)?;
        out.flush()?;
        Ok(0)
    }
}

/// Output appended to a file; no input.
#[derive(Debug)]
pub struct FileBackend {
    file: std::fs::File,
}

impl FileBackend {
    /// Opens (creates, appends to) `path`.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self { file })
    }
}

impl ConsoleBackend for FileBackend {
    fn input_fd(&self) -> Option<RawFd> {
        None
    }
    fn read_input(&mut self, _buf: &mut [u8]) -> std::io::Result<usize> {
        Ok(0)
    }
    fn write_output(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.file.write_all(data)?;
        Ok(0)
    }
}

/// A Unix socket the monitor listens on; one client at a time.
#[derive(Debug)]
pub struct UnixBackend {
    listener: UnixListener,
    client: Option<UnixStream>,
    path: PathBuf,
}

impl UnixBackend {
    /// Binds and listens on `path` (which must not exist).
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            client: None,
            path: path.to_path_buf(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl ConsoleBackend for UnixBackend {
    fn input_fd(&self) -> Option<RawFd> {
        Some(match &self.client {
            Some(c) => c.as_raw_fd(),
            None => self.listener.as_raw_fd(),
        })
    }
    fn read_input(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(c) = &mut self.client else {
            let (s, _) = self.listener.accept()?;
            s.set_nonblocking(true)?;
            self.client = Some(s);
            return Err(std::io::ErrorKind::WouldBlock.into());
        };
        match c.read(buf) {
            // The client left: listen for the next one.
            Ok(0) => {
                self.client = None;
                Err(std::io::ErrorKind::WouldBlock.into())
            }
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => {
                self.client = None;
                Err(std::io::ErrorKind::WouldBlock.into())
            }
            other => other,
        }
    }
    fn write_output(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let Some(c) = &mut self.client else {
            return Ok(data.len());
        };
        let mut done = 0;
        let mut spins = 0;
        while done < data.len() {
            match c.write(data.get(done..).unwrap_or_default()) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && spins < 100 => {
                    spins += 1;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.client = None;
                    return Err(e);
                }
            }
        }
        Ok(data.len() - done)
    }
}

impl Drop for UnixBackend {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The virtio-console device type.
pub struct Console {
    backend: Option<Box<dyn ConsoleBackend>>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("backend", &self.backend.is_some())
            .finish()
    }
}

impl Console {
    /// A console over `backend`.
    pub fn new(backend: Box<dyn ConsoleBackend>) -> Self {
        Self {
            backend: Some(backend),
        }
    }
}

impl VirtioDevice for Console {
    fn device_id(&self) -> u16 {
        device_id::CONSOLE
    }
    fn features(&self) -> u64 {
        0
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }
    fn config_len(&self) -> u64 {
        // cols, rows, max_nr_ports, emerg_wr: all 0 (no SIZE, MULTIPORT or EMERG_WRITE).
        12
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn pci_class(&self) -> (u8, u8, u8) {
        (0x07, 0x80, 0x00)
    }
    fn activate(&mut self, _features: u64) -> Result<Box<dyn QueueHandler>, ActivateError> {
        let backend = self.backend.take().ok_or(ActivateError::NoBackend)?;
        Ok(Box::new(ConsoleHandler {
            backend,
            pending: Vec::new(),
            eof: false,
        }))
    }
    fn reset(&mut self, handler: Option<Box<dyn QueueHandler>>) {
        if let Some(b) = handler
            .and_then(|h| h.into_backend())
            .and_then(|b| b.downcast::<Box<dyn ConsoleBackend>>().ok())
        {
            self.backend = Some(*b);
        }
    }
    fn name(&self) -> &'static str {
        "virtio-console"
    }
}

/// The request processing of an active console.
pub struct ConsoleHandler {
    backend: Box<dyn ConsoleBackend>,
    pending: Vec<u8>,
    eof: bool,
}

impl std::fmt::Debug for ConsoleHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleHandler")
            .field("pending", &self.pending.len())
            .field("eof", &self.eof)
            .finish()
    }
}

const RXQ: u16 = 0;
const TXQ: u16 = 1;

impl ConsoleHandler {
    fn deliver(&mut self, ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError> {
        let mut used = false;
        while !self.pending.is_empty() {
            let Some(chain) = ctx.pop(RXQ)? else {
                break;
            };
            let n = chain.writer().write(ctx.mem, &self.pending)?;
            self.pending.drain(..n);
            VirtioStats::add(
                &ctx.signals.stats.bytes_to_guest,
                u64::try_from(n).unwrap_or(0),
            );
            ctx.add_used(RXQ, chain.head, u32::try_from(n).unwrap_or(0))?;
            used = true;
        }
        if used {
            ctx.signal(RXQ);
        }
        Ok(())
    }

    fn transmit(&mut self, ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError> {
        let mut used = false;
        let mut buf = [0u8; OUTPUT_CHUNK];
        while let Some(chain) = ctx.pop(TXQ)? {
            let stats = &ctx.signals.stats;
            let mut r = chain.reader();
            loop {
                let n = r.read(ctx.mem, &mut buf)?;
                if n == 0 {
                    break;
                }
                let data = buf.get(..n).unwrap_or_default();
                VirtioStats::add(&stats.bytes_from_guest, u64::try_from(n).unwrap_or(0));
                match self.backend.write_output(data) {
                    Ok(0) => {}
                    Ok(_) => VirtioStats::inc(&stats.dropped),
                    Err(e) => {
                        VirtioStats::inc(&stats.io_errors);
                        ctx.signals
                            .log
                            .log(format_args!("console output failed: {e}"));
                    }
                }
            }
            ctx.add_used(TXQ, chain.head, 0)?;
            used = true;
        }
        if used {
            ctx.signal(TXQ);
        }
        Ok(())
    }
}

impl QueueHandler for ConsoleHandler {
    fn queue_notify(&mut self, q: u16, ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError> {
        match q {
            RXQ => self.deliver(ctx),
            TXQ => self.transmit(ctx),
            _ => Ok(()),
        }
    }
    fn wait_fds(&self, out: &mut Vec<(RawFd, u32)>) {
        if !self.eof && self.pending.is_empty() {
            if let Some(fd) = self.backend.input_fd() {
                out.push((fd, 0));
            }
        }
    }
    fn fd_ready(&mut self, _token: u32, ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError> {
        if self.pending.is_empty() {
            let mut buf = [0u8; INPUT_CHUNK];
            match self.backend.read_input(&mut buf) {
                Ok(0) => self.eof = true,
                Ok(n) => self
                    .pending
                    .extend_from_slice(buf.get(..n).unwrap_or_default()),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    // An input that fails for good is treated as closed, so it is not polled again.
                    self.eof = true;
                    VirtioStats::inc(&ctx.signals.stats.io_errors);
                    ctx.signals
                        .log
                        .log(format_args!("console input failed, closed: {e}"));
                }
            }
        }
        self.deliver(ctx)
    }
    fn into_backend(self: Box<Self>) -> Option<Box<dyn std::any::Any + Send>> {
        Some(Box::new(self.backend))
    }
}

/// A connected Unix stream socket (input and output both ways), for tests and for a platform that
/// already holds a connection.
#[derive(Debug)]
pub struct SocketConsole {
    sock: UnixStream,
}

impl SocketConsole {
    /// A backend and the peer end.
    pub fn pair() -> std::io::Result<(Self, UnixStream)> {
        let (a, b) = UnixStream::pair()?;
        a.set_nonblocking(true)?;
        Ok((Self { sock: a }, b))
    }
}

impl ConsoleBackend for SocketConsole {
    fn input_fd(&self) -> Option<RawFd> {
        Some(self.sock.as_raw_fd())
    }
    fn read_input(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.sock.read(buf)
    }
    fn write_output(&mut self, data: &[u8]) -> std::io::Result<usize> {
        match self.sock.write(data) {
            Ok(n) => Ok(data.len() - n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(data.len()),
            Err(e) => Err(e),
        }
    }
}
