//! Device models of the bhyve(8) side. The 16550 UART runs as a fast stage on the vCPU thread (its
//! register file is cheap; only its output may block, and that goes through [`console`]'s bounded
//! ring to a writer thread); other models run on the device-model thread, reached over the per-CPU
//! exit rings.

pub mod console;
pub mod uart;
