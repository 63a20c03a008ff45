//! Guest loaders: Linux boot protocol (bzImage, ELF vmlinux), PVH and Multiboot v1.
#![warn(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap, clippy::cast_lossless)]
