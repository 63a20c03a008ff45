//! loom models of every lock-free structure. Run with `RUSTFLAGS="--cfg loom" cargo test -p loom-tests --release`.
