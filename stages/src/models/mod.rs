//! Slow-stage device models (the bhyve(8) side): they run on the device-model thread, reached over the
//! per-CPU exit rings.

pub mod uart;
