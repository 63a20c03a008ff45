//! PCI passthrough: reservation of host devices (pptdevs) through sysfs and VFIO.
#![warn(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap, clippy::cast_lossless)]
