//! The in-module ("in-kernel") device cores: register-level, no runtime dependencies.
