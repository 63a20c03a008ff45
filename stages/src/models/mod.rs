//! Slow-stage device models (the bhyve(8) side): they run on the device-model thread, reached over the
//! per-CPU exit rings. The 16550 UART's output goes on through [`console`]'s bounded ring to a writer
//! thread, so a backend that blocks stalls no device-model thread.

pub mod console;
pub mod uart;

/// A console backend that keeps what it is given, for the models' tests.
#[cfg(test)]
pub(crate) mod test_sink {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    pub(crate) struct Sink(pub(crate) Arc<Mutex<Vec<u8>>>);

    impl crate::models::console::Backend for Sink {}

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
