//! Our own small test guests, assembled from source by the build script.
