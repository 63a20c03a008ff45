//! The exit pipeline: the exit ABI records and the per-CPU SPSC rings that carry them.
#![cfg_attr(not(feature = "std"), no_std)]
#![warn(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap, clippy::cast_lossless)]
