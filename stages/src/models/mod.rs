//! Slow-stage device models (the bhyve(8) side): they run on the device-model thread, reached over the
//! per-CPU exit rings. The 16550 UART's output goes on through [`console`]'s bounded ring to a writer
//! thread, so a backend that blocks stalls no device-model thread.

pub mod console;
pub mod uart;
