//! SPIFFE core types for Tessera.
//!
//! This crate is pure: it performs no I/O, reads no clock and draws no randomness of its own.
//! Time, keys and random sources are passed in by the caller, so every rule here can be tested
//! deterministically and reused by the server, the agent and the tests alike.
//!
//! Modules are named after the SPIFFE nouns:
//! - [`spiffe_id`]: [`SpiffeId`] and [`TrustDomain`] with the strict parser of the SPIFFE ID spec.
//! - [`selector`]: attestation selectors (`type:value`) and subset matching.
//! - [`x509`]: X.509-SVID and CA templates (rcgen) and the X.509-SVID validator (x509-parser).
//! - [`jwt`]: JWT-SVID signing and validation.
//! - [`bundle`]: SPIFFE trust bundles (JWKS), PEM and DER forms, and bundle maps.
//! - [`keys`]: signing key types (EC P-256/P-384, RSA-2048) and their JWK forms.
//! - [`ttl`]: lifetime capping and renewal-point maths.
//! - [`tls`]: SPIFFE mutual TLS on rustls (certificate verifiers, swappable SVID resolver).

pub mod bundle;
pub mod jwt;
pub mod keys;
pub mod selector;
pub mod spiffe_id;
pub mod tls;
pub mod ttl;
pub mod x509;

pub use selector::{Selector, SelectorError, SelectorSet};
pub use spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};
