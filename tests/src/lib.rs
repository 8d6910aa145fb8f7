//! Tessera's cross-crate and end-to-end tests live in this crate's `tests/` directory.
