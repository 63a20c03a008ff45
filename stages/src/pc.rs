//! The PC platform: the in-module devices wired together (being written).
