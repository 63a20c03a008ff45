//! Exit classification and the stages: the bus, fast (in-module) devices and slow device models.
#![cfg_attr(not(feature = "std"), no_std)]
#![warn(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap, clippy::cast_lossless)]

pub mod devices;
